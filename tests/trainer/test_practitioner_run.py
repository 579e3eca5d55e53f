"""The practitioner's run, all features at once (issue 20's judged run): two DeepSpeed ranks under
ZeRO-3 train the tiny SD1.5 model on own pairs of mixed aspect ratios with
``resolution_buckets: auto``, validation grids every 2 steps into TensorBoard, an EMA of the
weights and Adafactor; the run is killed with SIGKILL after step 4's checkpoint, resumed, and
must end with the losses of an uninterrupted run step by step; the EMA export carries a model
card and loads in a stock ``StableDiffusionPipeline``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import kill_when, launch_deepspeed, read_metrics, start_deepspeed, write_config

# (width, height) of each pair's images: 2:1, 1:2 and square (three buckets at 16 px)
SIZES = [(40, 20), (20, 40), (24, 24)]
PROMPTS = ["a photo of a red cube", "a photo of a blue cat"]
STEPS, KILL_AT = 6, 4


def _own_pairs(folder) -> str:
    """18 pairs (6 per aspect ratio) of seeded noise images and a JSONL naming them."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    lines = []
    words = ["red cube", "green ball", "blue cat", "red dog"]
    for i in range(18):
        size = SIZES[i % 3]
        names = []
        for side in ("w", "l"):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            name = f"{i:02d}{side}.png"
            Image.fromarray(pixels).save(folder / name)
            names.append(name)
        prompt = f"a photo of a {words[i % 4]}"
        lines.append(json.dumps({"winner": names[0], "loser": names[1], "prompt": prompt}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "pairs.jsonl")


def _config(tmp_path, name, tiny_sd, pairs):
    return write_config(
        tmp_path / f"{name}.yaml",
        model=tiny_sd,
        train_data=pairs,
        output_dir=tmp_path / name,
        objective="snpo",
        zero_stage=3,
        resolution=16,
        resolution_buckets="auto",
        optimizer="adafactor",
        learning_rate=1e-3,
        ema_decay=0.9,
        validation_prompts=PROMPTS,
        validation_every=2,
        validation_cfg=[1.0, 3.0],
        validation_steps=2,
        report_to="tensorboard",
        max_steps=STEPS,
        checkpoint_every=2,
        keep_checkpoints=0,
        train_batch_size_per_gpu=2,
    )


def _tensorboard_images(out) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((out / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if "validation" in acc.Tags()["images"]:
            steps += [e.step for e in acc.Images("validation")]
    return sorted(steps)


@pytest.mark.slow
def test_zero3_buckets_validation_ema_adafactor_resume_after_sigkill(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pairs = _own_pairs(tmp_path / "pairs")
    ref = tmp_path / "ref"
    launch_deepspeed(_config(tmp_path, "ref", tiny_sd, pairs), timeout=600)
    want = {r["step"]: r for r in read_metrics(ref)}
    assert sorted(want) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    cfg = _config(tmp_path, "killed", tiny_sd, pairs)
    # the launcher and both ranks SIGKILLed once step KILL_AT's checkpoint is written
    kill_when(start_deepspeed(cfg, "--debug_hang_at_step", str(KILL_AT)), f"after step {KILL_AT}")
    assert (out / "checkpoints" / f"step_{KILL_AT:08d}").is_dir()
    assert not (out / "export").exists()
    launch_deepspeed(cfg, timeout=600)  # resume: auto

    got = {r["step"]: r for r in read_metrics(out)}
    assert sorted(got) == sorted(want)
    keys = ("loss", "mse_policy", "mse_ref", "grad_norm", "pairs_cond", "pairs_uncond")
    for step in want:  # exact resume: the same numbers, bit for bit
        assert [got[step][k] for k in keys] == [want[step][k] for k in keys], step

    for run in (ref, out):
        grids = sorted(p.name for p in (run / "samples").glob("step_*.png"))
        assert grids == [f"step_{s:08d}.png" for s in (0, 2, 4, 6)]
    assert _tensorboard_images(ref) == [0, 2, 4, 6]
    assert _tensorboard_images(out) == [0, 2, 4, 6]  # the resumed part adds 6 once, not 4 again
    for s in (0, 2, 4, 6):
        a = (ref / "samples" / f"step_{s:08d}.png").read_bytes()
        assert a == (out / "samples" / f"step_{s:08d}.png").read_bytes(), s

    card = (out / "export" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "snpo" in card
    assert 'subfolder="unet"' in card  # the card's recipe, followed below
    ema = UNet2DConditionModel.from_pretrained(str(out / "export"), subfolder="unet")
    raw = UNet2DConditionModel.from_pretrained(str(out / "export-raw"), subfolder="unet")
    e, r = ema.state_dict(), raw.state_dict()
    assert any(not torch.equal(e[k], r[k]) for k in e)  # export/ is the EMA, not the raw weights
    ref_ema = UNet2DConditionModel.from_pretrained(str(ref / "export"), subfolder="unet")
    assert all(torch.equal(e[k], v) for k, v in ref_ema.state_dict().items())  # EMA resumed too
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), unet=ema, safety_checker=None)
    image = pipe(
        "a photo of a red cube", num_inference_steps=2, height=16, width=16, output_type="np"
    ).images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
