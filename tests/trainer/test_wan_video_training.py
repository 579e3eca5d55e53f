"""Video preference pairs (``num_frames`` F > 1) through `snpo train` on a tiny Wan folder:
own pairs (JSONL) of 5-to-9-frame animated GIFs train snpo (full) and dpo (LoRA) with latents
(C, F', h, w); first loss ln 2; the export samples 5-frame videos in a stock WanPipeline; a
resume from a checkpoint continues exactly; the num_frames refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from snpo.models.tiny_wan import TINY_RESOLUTION

from .conftest import read_metrics, train_here, write_config

# ln 2 in float32: at policy = reference every margin is exactly 0 (as test_wan_training.py)
LN2_ABS = 4e-7
FRAMES = 5
FLOW = dict(beta=100.0, learning_rate=1e-4, resolution=TINY_RESOLUTION, num_frames=FRAMES)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from snpo.models.tiny_wan import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "m")


@pytest.fixture(scope="module")
def gif_pairs(tmp_path_factory):
    """4 pairs of animated GIFs (5 to 9 frames: the 9-frame ones are subsampled; one
    non-square), seeded noise over a moving colour ramp."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        names = []
        for side in ("w", "l"):
            n = 5 if (i + (side == "l")) % 2 else 9
            size = (40, 32) if i == 3 else (32, 32)
            frames = []
            for k in range(n):
                a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) // 4
                a[..., i % 3] += np.uint8(20 * k)
                frames.append(Image.fromarray(a, "RGB"))
            name = f"{side}{i}.gif"
            frames[0].save(root / name, save_all=True, append_images=frames[1:], duration=40)
            names.append(name)
        rows.append({"winner": names[0], "loser": names[1], "prompt": f"a red cube {i}"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, name, model, data, **kw):
    return write_config(
        tmp_path / f"{name}.yaml", model=model, train_data=data, output_dir=tmp_path / name,
        **{**FLOW, **kw},
    )  # fmt: skip


def _check_rows(rows, steps: int, pairs: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=LN2_ABS)  # policy == reference
    for r in rows:
        assert r["pairs"] == pairs and r["bad_images"] == 0
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


def _sample(pipe) -> np.ndarray:
    return pipe(
        "a red cube", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
        num_frames=FRAMES, output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip


def test_trainer_latent_shape_has_the_frame_axis(tmp_path, tiny_wan, gif_pairs):
    from snpo.config import load_config
    from snpo.data import collate_pairs
    from snpo.trainer.trainer import Trainer

    cfg = load_config(_config(tmp_path, "shape", tiny_wan, gif_pairs, objective="dpo"))
    t = Trainer(cfg)
    try:
        t.setup()
        side = TINY_RESOLUTION // 8
        assert t.latent_shape == (16, 2, side, side)  # F' = (5 − 1)/4 + 1
        batch = collate_pairs([t.inputs.latents.dataset[(0, i)] for i in range(2)])
        assert batch.pixels.shape == (2, 2, 3, FRAMES, TINY_RESOLUTION, TINY_RESOLUTION)
        assert t.inputs.latent_shape_of(batch) == (16, 2, side, side)
        from snpo.draws import pair_draws

        draws = pair_draws(0, 0, batch.indices, t.inputs.latent_shape_of(batch),
                           t.models.model.scheduler, 0.0)  # fmt: skip
        enc = t.inputs.encode(batch, draws)
        assert enc.latents.shape == (4, 16, 2, side, side)
        assert draws.noise.shape == (2, 16, 2, side, side)
        from snpo.data import PairBatch

        bucket = PairBatch(batch.indices, 0, torch.zeros(2, 2, 3, FRAMES, 32, 48), batch.prompts,
                           batch.original_size, batch.crop_top_left, [])  # fmt: skip
        assert t.inputs.latent_shape_of(bucket) == (16, 2, 4, 6)  # a 48×32 bucket's clips
    finally:
        t._held.close()


def test_wan_video_snpo_full_trains_and_samples_videos(tmp_path, tiny_wan, gif_pairs):
    from diffusers import WanPipeline, WanTransformer3DModel

    from snpo.models import read_export_meta

    cfg = _config(
        tmp_path, "full", tiny_wan, gif_pairs, objective="snpo", max_steps=2, uncond_prob=0.5,
        random_crop=True, validation_prompts=["a red cube"], validation_every=2,
        validation_steps=2, validation_cfg=[1.0],
    )  # fmt: skip
    assert train_here(cfg) == 0
    rows = read_metrics(tmp_path / "full")
    _check_rows(rows, 2, 2)
    from snpo.trainer.validation import grid_path

    for step in (0, 2):  # validation samples one frame per prompt (images), also for clips
        assert grid_path(tmp_path / "full", step).is_file()
    export = tmp_path / "full" / "export"
    meta = read_export_meta(export)
    assert (meta["family"], meta["kind"], meta["config"]["num_frames"]) == ("wan", "full", 5)
    stock = WanTransformer3DModel.from_pretrained(str(export / "transformer"))
    pipe = WanPipeline.from_pretrained(str(tiny_wan), transformer=stock)
    video = _sample(pipe)
    assert video.shape == (1, FRAMES, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(video).all()


def test_wan_video_dpo_lora_trains_and_loads(tmp_path, tiny_wan, gif_pairs):
    from diffusers import WanPipeline

    cfg = _config(
        tmp_path, "lora", tiny_wan, gif_pairs, objective="dpo", max_steps=2,
        lora_rank=4, lora_alpha=8, learning_rate=1e-3,
    )  # fmt: skip
    assert train_here(cfg) == 0
    _check_rows(read_metrics(tmp_path / "lora"), 2, 2)
    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    pipe.load_lora_weights(str(tmp_path / "lora" / "export"))
    assert np.isfinite(_sample(pipe)).all()


def test_wan_video_resume_is_exact(tmp_path, tiny_wan, gif_pairs, capsys):
    """4 steps straight against 2 steps, then the same run continued to 4 from its step-2
    checkpoint (a fresh Trainer in this process): the same metrics, bit for bit."""
    common = dict(objective="snpo", checkpoint_every=2, uncond_prob=0.5, random_crop=True,
                  lora_rank=4, learning_rate=1e-3)  # fmt: skip
    assert train_here(_config(tmp_path, "ref", tiny_wan, gif_pairs, max_steps=4, **common)) == 0
    cfg = _config(tmp_path, "cont", tiny_wan, gif_pairs, max_steps=2, **common)
    assert train_here(cfg) == 0
    capsys.readouterr()
    assert train_here(cfg, "--max_steps", "4") == 0
    log = capsys.readouterr()
    assert "resumed from step 2" in log.out + log.err
    want, got = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "cont")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        for k in ("loss", "grad_norm", "mse_policy", "mse_ref", "pairs_uncond"):
            assert a[k] == b[k], (a["step"], k)


def test_num_frames_refusals(tmp_path, tiny_wan, tiny_sd, gif_pairs):
    from snpo.config import ConfigError, load_config

    def load(name, model, check_files=True, **kw):
        return load_config(_config(tmp_path, name, model, gif_pairs, **kw), check_files=check_files)

    with pytest.raises(ConfigError, match=r"num_frames: 4 does not fit the wan.*4k \+ 1.*1 or 5"):
        load("four", tiny_wan, num_frames=4)
    with pytest.raises(ConfigError, match=r"num_frames: 5, but sd-class models are image models"):
        load("sd", tiny_sd, resolution=16)
    with pytest.raises(ConfigError, match="num_frames: must be ≥ 1"):
        load("zero", tiny_wan, check_files=False, num_frames=0)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"num_frames: 5 .*cache_dir, cache_use"):
        load("cache", tiny_wan, check_files=False, cache_dir=cache)
    with pytest.raises(ConfigError, match=r"num_frames.*cache_use \['latents', 'text'\]"):
        load("cache2", tiny_wan, check_files=False, cache_dir=cache, cache_use=["latents", "text"])
    # a text-only cache, or a live reference, is fine; F = 1 and F = 9 are fine
    load("text", tiny_wan, check_files=False, cache_dir=cache, cache_use=["text"])
    load("live", tiny_wan, check_files=False, cache_dir=cache, ref_mode="live")
    assert load("one", tiny_wan, num_frames=1).num_frames == 1
    assert load("nine", tiny_wan, num_frames=9).num_frames == 9
    from snpo.cache import build_cache

    with pytest.raises(ValueError, match="--what text"):
        build_cache(load("build", tiny_wan), cache, what=("latents", "text"), verbose=False)
