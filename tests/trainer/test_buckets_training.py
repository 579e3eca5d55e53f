"""``resolution_buckets`` end to end on own pairs of mixed aspect ratios: a bucketed SDXL run
feeds the UNet one bucket per micro-batch with the SDXL time ids of the real original size and
crop; a bucketed run resumes bit-exactly after SIGKILL; two ZeRO-3 ranks train disjoint
single-bucket micro-batches, resume exactly after kill -9 and export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snpo.config import load_config
from snpo.data import image_bytes
from snpo.models import load_export, read_export_meta
from snpo.trainer.trainer import Trainer

from .conftest import (
    REPO,
    child_env,
    kill_when,
    read_metrics,
    start_deepspeed,
    train_here,
    write_config,
)

# (w, h) of the pairs' images: four aspect ratios, the tiny model's auto buckets at R 16
SIZES = [(24, 16), (16, 24), (20, 20), (32, 12)]


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory) -> Path:
    """24 own pairs (JSONL), six of each aspect ratio of SIZES; winner and loser of a pair have
    the same size (seeded colours)."""
    import random

    root = tmp_path_factory.mktemp("mixed")
    (root / "img").mkdir()
    rng = random.Random(0)
    recs = []
    for i in range(24):
        size = SIZES[i % len(SIZES)]
        for k, base in (("w", (210, 40, 40)), ("l", (40, 40, 210))):
            colour = (base[0], rng.randrange(256), base[2])
            (root / "img" / f"{i}{k}.png").write_bytes(image_bytes(colour, size))
        recs.append({"winner": f"img/{i}w.png", "loser": f"img/{i}l.png", "prompt": "a red cube"})
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def _common(model, data, **kw) -> dict:
    return dict(
        model=model,
        train_data=data,
        objective="snpo",
        resolution_buckets="auto",
        random_crop=True,
        train_batch_size_per_gpu=2,
        uncond_prob=0.4,
        **kw,
    )


def test_sdxl_bucketed_batches_carry_real_sizes_and_crops(tmp_path, tiny_sdxl, mixed_pairs):
    from snpo.data.buckets import Bucket, cover_size
    from snpo.draws import pair_draws

    out = tmp_path / "run"
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml", output_dir=out, max_steps=2, **_common(tiny_sdxl, mixed_pairs)
        )
    )
    t = Trainer(cfg)
    t.run()
    assert t.order.kind == "bucketed"
    hist = t.order.histogram()
    assert sum(hist.values()) == 24 and len(hist) == 4  # one bucket per aspect ratio
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["pairs"] == 2 for r in rows)
    shapes = set()
    for g, batch in enumerate(t.inputs.batches(0, 6)):
        bw, bh = t.order.size(g)
        assert batch.pixels.shape == (2, 2, 3, bh, bw)
        shapes.add((bh, bw))
        draws = pair_draws(
            cfg.seed,
            batch.epoch,
            batch.indices,
            t.inputs.latent_shape_of(batch),
            t.models.model.scheduler,
            cfg.uncond_prob,
        )
        enc = t.inputs.encode(batch, draws)
        assert enc.latents.shape[-2:] == (bh // 2, bw // 2)  # the tiny VAE's factor 2
        for k, i in enumerate(batch.indices.tolist()):
            w, h = SIZES[i % len(SIZES)]
            rw, rh = cover_size((w, h), Bucket(bw, bh))
            for j in range(2):  # winner row k, loser row P + k
                top, left = batch.crop_top_left[k, j].tolist()
                assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
                want = [h, w, top, left, bh, bw]  # diffusers: original, crop, target (h, w)
                assert enc.time_ids[k + j * 2].tolist() == want
    assert len(shapes) > 1  # mixed buckets over the micro-steps
    assert read_export_meta(out / "export")["config"]["resolution_buckets"] == "auto"


def test_bucketed_resume_after_sigkill_is_exact(tmp_path, tiny_sd, mixed_pairs, capsys, one_thread):
    common = _common(
        tiny_sd,
        mixed_pairs,
        max_steps=6,
        checkpoint_every=2,
        keep_checkpoints=0,
        gradient_accumulation_steps=2,
    )
    ref = tmp_path / "ref"
    assert train_here(write_config(tmp_path / "a.yaml", output_dir=ref, **common)) == 0
    want = {x["step"]: x for x in read_metrics(ref)}

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", output_dir=out, **common)
    cmd = [sys.executable, "-m", "snpo.train", "--config", str(cfg), "--debug_hang_at_step", "4"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "debug: hanging after step 4" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert "data order: bucketed" in "".join(lines)
    capsys.readouterr()
    assert train_here(cfg) == 0
    assert "resumed from step 4" in "".join(capsys.readouterr())
    got = {x["step"]: x for x in read_metrics(out)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (5, 6):
        for k in ("loss", "mse_policy", "mse_ref", "grad_norm"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])


# ---- 2 ranks, ZeRO-3 ---------------------------------------------------------------------------
def _finish(p: subprocess.Popen, timeout: float = 400) -> str:
    log = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
def test_two_rank_zero3_bucketed_run_resumes_after_kill9_and_exports(
    tmp_path, tiny_sd, mixed_pairs
):
    from snpo.data import PairOrder
    from snpo.data.order import bucket_options

    common = _common(
        tiny_sd, mixed_pairs, zero_stage=3, max_steps=6, checkpoint_every=2, keep_checkpoints=0
    )
    # what the two ranks train: single-bucket micro-batches, disjoint, sizes as assigned
    cfg0 = load_config(write_config(tmp_path / "probe.yaml", output_dir=tmp_path / "p", **common))
    from snpo.data import open_source
    from snpo.models import load_model

    src = open_source(cfg0)
    opts = bucket_options(cfg0, src, load_model(str(tiny_sd)))
    orders = [PairOrder(24, seed=cfg0.seed, rank=r, world=2, micro=2, **opts) for r in range(2)]
    seen = []
    for g in range(orders[0].batches_per_epoch):
        for o in orders:
            idx = [i for _, i in o.batch(g)]
            assert len({SIZES[i % 4] for i in idx}) == 1  # one aspect ratio: one bucket
            seen += idx
    assert len(seen) == len(set(seen))

    straight = tmp_path / "straight"
    log = _finish(start_deepspeed(write_config(tmp_path / "s.yaml", output_dir=straight, **common)))
    assert "data order: bucketed" in log
    want = {r["step"]: r for r in read_metrics(straight)}
    assert sorted(want) == [1, 2, 3, 4, 5, 6] and all(r["pairs"] == 4 for r in want.values())

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "k.yaml", output_dir=out, **common)
    kill_when(start_deepspeed(cfg, "--debug_hang_at_step", "4"), "hanging after step 4", 400)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    time.sleep(1)
    log = _finish(start_deepspeed(cfg))
    assert "resumed from step 4" in log, log[-3000:]
    got = {r["step"]: r for r in read_metrics(out)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (5, 6):
        for k in ("loss", "mse_policy", "mse_ref", "grad_norm"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
    model, _ = load_export(out / "export")
    meta = read_export_meta(out / "export")
    assert meta["step"] == 6 and meta["config"]["resolution_buckets"] == "auto"
    a = straight / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    b = out / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    del model
