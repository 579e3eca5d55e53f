"""End to end, one process: `python -m snpo.train` trains, logs, exports (diffusers-loadable),
resumes bit-exactly after SIGKILL, and stops on a non-finite loss keeping the last checkpoint."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import torch

from snpo.models import encode_prompts, generate, load_export, null_embedding, read_export_meta

from .conftest import REPO, child_env, read_metrics, train_here, write_config


def test_train_export_then_nonfinite_guard(tmp_path, tiny_sd, pickapic, capsys):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        model=tiny_sd,
        train_data=pickapic,  # includes the tie and the truncated JPEG (skipped, counted)
        objective="snpo",
        max_steps=4,
        checkpoint_every=2,
        train_batch_size_per_gpu=3,
        gradient_accumulation_steps=2,
        random_crop=True,
        gradient_checkpointing=True,
        report_to="tensorboard",
        output_dir=out,
    )
    assert train_here(cfg) == 0
    log = capsys.readouterr()
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    for x in rows:
        assert math.isfinite(x["loss"]) and x["lr"] == 1e-4 and x["grad_norm"] > 0
        for k in ("accuracy_cond", "logp_proxy", "pairs_per_s", "mse_policy", "mse_ref"):
            assert k in x
    assert rows[-1]["bad_images"] >= 1 and "skipping a bad pair" in log.out + log.err
    assert (out / "tb").is_dir() and list((out / "tb").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    meta = read_export_meta(out / "export")
    assert meta["objective"] == "snpo" and meta["lam"] == 0.9 and meta["step"] == 4
    assert meta["uncond_prob"] == 0.3 and meta["kind"] == "full" and meta["config"]["beta"] == 500
    model, _ = load_export(out / "export")
    imgs = generate(
        model, encode_prompts(model, ["a red cube"]), null_embedding(model), [0], steps=2
    )
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()

    # continue the same run to 8 steps with a NaN injected at step 6
    assert train_here(cfg, "--max_steps", "8", "--debug_nan_at_step", "6") == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 6" in err
    assert "step_00000004" in err  # names the last good checkpoint
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [x["step"] for x in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_resume_after_sigkill_is_exact(tmp_path, tiny_sd, pickapic_clean, capsys, one_thread):
    common = dict(
        model=tiny_sd,
        train_data=pickapic_clean,
        objective="snpo",
        max_steps=6,
        checkpoint_every=2,
        keep_checkpoints=0,
        train_batch_size_per_gpu=2,
        gradient_accumulation_steps=2,
        lr_warmup_steps=2,
        lr_schedule="cosine",
        random_crop=True,
        uncond_prob=0.4,
        lora_rank=4,
    )
    ref = tmp_path / "ref"
    assert train_here(write_config(tmp_path / "a.yaml", output_dir=ref, **common)) == 0
    want = {x["step"]: x for x in read_metrics(ref)}

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.yaml", output_dir=out, **common)
    cmd = [sys.executable, "-m", "snpo.train", "--config", str(cfg), "--debug_hang_at_step", "4"]
    # the killed run is a real `python -m snpo.train` process
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = time.time() + 180
    for line in proc.stdout:  # wait until step 4's checkpoint is written and the run hangs
        lines.append(line)
        if "debug: hanging after step 4" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    capsys.readouterr()
    assert train_here(cfg) == 0  # a fresh Trainer: everything comes from the checkpoint
    log = capsys.readouterr()
    assert "resumed from step 4" in log.out + log.err
    got = {x["step"]: x for x in read_metrics(out)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in (5, 6):
        for k in ("loss", "mse_policy", "mse_ref", "grad_norm", "lr"):
            assert got[s][k] == want[s][k] or abs(got[s][k] - want[s][k]) <= 1e-6, (s, k)
    from safetensors.torch import load_file

    a = load_file(ref / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # changing a trajectory option refuses to resume (exit code 4, names the option)
    assert train_here(cfg, "--max_steps", "7", "--beta", "123") == 4
    assert "beta" in capsys.readouterr().err
