"""A run is never lost, mixed with another or silently corrupted; untrusted checkpoints are not
loaded; every failure exits with its documented code and one line (snpo.train's docstring)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from snpo.models import save_tiny_model
from snpo.train import classify
from snpo.trainer import guard_decision, keep_metrics_until
from snpo.trainer.checkpoints import CHECKSUM_FILE, complete_tags

from .conftest import REPO, WORDS, child_env, read_metrics, train_here, write_config


def _cfg(tmp_path, model, data, out, **kw):
    values = dict(model=model, train_data=data, output_dir=out, objective="dpo", max_steps=2)
    values.update(kw)
    return write_config(tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml", **values)


def _said(err: str) -> list[str]:
    """The trainer's own lines on stderr (progress bars of the model loaders aside)."""
    return [x for x in err.replace("\r", "\n").splitlines() if x.startswith("snpo train:")]


# ---- checkpoints: checksums, corruption, trust, fallback ------------------------------------
def test_checkpoint_sealed_then_corruption_refused_naming_the_file(
    tmp_path, tiny_sd, pickapic_clean, capsys
):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_sd, pickapic_clean, out, checkpoint_every=1)
    assert train_here(cfg) == 0
    tag_dir = out / "checkpoints" / "step_00000002"
    listed = json.loads((tag_dir / CHECKSUM_FILE).read_text())["files"]
    assert listed and all(len(v["sha256"]) == 64 for v in listed.values())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    victim = next(tag_dir / n for n in sorted(listed) if n.endswith("model_states.pt"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit, same size: torch.load would not notice
    victim.write_bytes(bytes(raw))
    capsys.readouterr()
    assert train_here(cfg, "--max_steps", "3") == 4
    err = capsys.readouterr().err
    assert victim.name in err and "corrupt" in err and "nothing was loaded" in err
    assert len(_said(err)) == 1


def test_resume_from_outside_output_dir_needs_trust(tmp_path, tiny_sd, pickapic_clean, capsys):
    first = tmp_path / "first"
    assert train_here(_cfg(tmp_path, tiny_sd, pickapic_clean, first)) == 0
    other = tmp_path / "second"
    cfg = _cfg(tmp_path, tiny_sd, pickapic_clean, other, resume=str(first / "checkpoints"))
    capsys.readouterr()
    assert train_here(cfg, "--max_steps", "3") == 4
    err = capsys.readouterr().err
    assert "outside output_dir" in err and "--trust_checkpoint" in err
    assert not (other / "metrics.jsonl").exists()
    assert train_here(cfg, "--max_steps", "3", "--trust_checkpoint") == 0
    assert [r["step"] for r in read_metrics(other)] == [3]


def test_interrupted_save_and_empty_latest_fall_back_to_newest_complete(
    tmp_path, tiny_sd, pickapic_clean, capsys
):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_sd, pickapic_clean, out, checkpoint_every=1, keep_checkpoints=0)
    assert train_here(cfg) == 0
    ck = out / "checkpoints"
    (ck / "step_00000002" / CHECKSUM_FILE).unlink()  # the save of step 2 "died" before sealing
    (ck / "latest").write_text("")  # and latest is empty
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # a torn last line
    capsys.readouterr()
    with pytest.warns(UserWarning) as rec:
        assert train_here(cfg, "--max_steps", "3") == 0
    said = " ".join(str(w.message) for w in rec)
    assert "newest complete checkpoint step_00000001" in said
    assert "unreadable line" in said
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # step 2 redone, torn line gone
    assert complete_tags(ck)[-1] == "step_00000003"


def test_keep_metrics_until_is_atomic_and_skips_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n[1, 2]\n{"step": 3}\n{"ste')
    with pytest.warns(UserWarning, match="2 unreadable"):
        assert keep_metrics_until(p, 2) == 2
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


# ---- the base model and the data position ---------------------------------------------------
def test_resume_refuses_another_base_model(tmp_path, pickapic_clean, capsys):
    model = save_tiny_model(tmp_path / "m", family="sd", words=WORDS, seed=0)
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, model, pickapic_clean, out)
    assert train_here(cfg) == 0
    save_tiny_model(tmp_path / "m2", family="sd", words=WORDS, seed=1)
    for part in ("unet",):  # the same folder now holds other weights
        for f in (tmp_path / "m2" / part).iterdir():
            f.replace(model / part / f.name)
    capsys.readouterr()
    assert train_here(cfg, "--max_steps", "3") == 4
    err = capsys.readouterr().err
    assert "not the base model" in err and str(model) in err


def test_full_finetune_starts_exactly_at_ln2_in_one_mode(tmp_path, tiny_sd, pickapic_clean):
    from snpo.config import load_config
    from snpo.trainer import build_models

    cfg = load_config(
        None, {"model": str(tiny_sd), "train_data": [str(pickapic_clean)], "objective": "dpo"}
    )
    models = build_models(cfg, torch.device("cpu"))
    assert models.reference is not None
    assert models.reference.training == models.model.unet.training  # the same mode
    out = tmp_path / "run"
    assert train_here(_cfg(tmp_path, tiny_sd, pickapic_clean, out, max_steps=1)) == 0
    first = read_metrics(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=4e-7)  # ln 2 in float32
    assert first["accuracy_cond"] in (0.5, None) or math.isnan(first["accuracy_cond"])


def test_bad_images_count_survives_resume(tmp_path, tiny_sd, pickapic):
    # the fixture file has one truncated JPEG: bad_images is cumulative over the whole run
    common = dict(train_batch_size_per_gpu=3, max_steps=4, checkpoint_every=2, objective="snpo")
    straight, split = tmp_path / "a", tmp_path / "b"
    assert train_here(_cfg(tmp_path, tiny_sd, pickapic, straight, **common)) == 0
    cfg = _cfg(tmp_path, tiny_sd, pickapic, split, **{**common, "max_steps": 2})
    assert train_here(cfg) == 0
    assert train_here(cfg, "--max_steps", "4") == 0
    want = [r["bad_images"] for r in read_metrics(straight)]
    assert want[-1] >= 1
    assert [r["bad_images"] for r in read_metrics(split)] == want


# ---- output folder: never mix, never lose, never delete inputs -------------------------------
def test_fresh_start_on_a_run_is_refused_then_overwrite_moves_it_aside(
    tmp_path, tiny_sd, pickapic_clean, capsys
):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_sd, pickapic_clean, out)
    assert train_here(cfg) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train_here(cfg, "--resume", "never") == 4
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and len(_said(err)) == 1
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    # other options and nothing to resume (auto): refused as well
    (out / "checkpoints").rename(tmp_path / "gone")
    assert train_here(cfg, "--beta", "300") == 4
    assert train_here(cfg, "--resume", "never", "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_same_run_killed_before_its_first_checkpoint_restarts(tmp_path, tiny_sd, pickapic_clean):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_sd, pickapic_clean, out)
    assert train_here(cfg) == 0
    import shutil

    shutil.rmtree(out / "checkpoints")  # as if killed before any checkpoint
    assert train_here(cfg) == 0  # run.json says: the same options, start again
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.parametrize("field", ["model", "train_data", "cache_dir"])
def test_inputs_inside_export_or_checkpoints_refused(
    tmp_path, tiny_sd, pickapic_clean, capsys, field
):
    import shutil

    out = tmp_path / "run"
    inside = out / "export" / "inputs"
    inside.mkdir(parents=True)
    model, data, extra, name = tiny_sd, pickapic_clean, {}, field
    if field == "model":
        model = inside / "m"
        shutil.copytree(tiny_sd, model)
    elif field == "train_data":
        data = inside / "d.parquet"
        shutil.copy(pickapic_clean, data)
    else:
        (inside / "cache").mkdir()
        extra = {"cache_dir": inside / "cache", "ref_mode": "auto"}
        name = "cache"
    assert train_here(_cfg(tmp_path, model, data, out, **extra)) == 4
    err = capsys.readouterr().err
    assert f"{field}:" in err and "rewrites" in err
    assert (inside / {"model": "m", "train_data": "d.parquet"}.get(field, name)).exists()


def test_second_process_on_the_same_output_dir_is_refused(
    tmp_path, tiny_sd, pickapic_clean, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from snpo.cache import exclusive_lock\n"
            f"with exclusive_lock({str(out)!r}, 'training run'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train_here(_cfg(tmp_path, tiny_sd, pickapic_clean, out)) == 4
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and str(out) in err
    finally:
        holder.kill()
        holder.wait()
    assert train_here(_cfg(tmp_path, tiny_sd, pickapic_clean, out)) == 0  # free again


# ---- the non-finite guard and exit codes -----------------------------------------------------
def test_guard_skips_routine_fp16_overflow_and_stops_after_the_limit():
    state, actions = 0, []
    for overflow in [False, True, True, False, True, True, True]:
        action, state = guard_decision(
            finite_norm=not overflow, overflow=overflow, skipped_in_a_row=state, limit=2
        )
        actions.append(action)
    assert actions == ["ok", "skipped", "skipped", "ok", "skipped", "skipped", "stop"]
    # without an overflow report, a non-finite norm stops at once
    assert guard_decision(finite_norm=False, overflow=False, skipped_in_a_row=0, limit=20)[0] == (
        "stop"
    )


def test_every_failure_maps_to_a_documented_code():
    from snpo.cache import CacheError, FolderLocked
    from snpo.config import ConfigError
    from snpo.trainer import ModelLoadError, NonFiniteError, PeerFailed, ResumeError
    from snpo.trainer.checkpoints import CheckpointError
    from snpo.trainer.run_dir import RunFolderError

    doc = sys.modules["snpo.train"].__doc__
    cases = {
        ConfigError("x"): 2,
        CacheError("x"): 2,
        NonFiniteError("x"): 3,
        ResumeError("x"): 4,
        CheckpointError("x"): 4,
        RunFolderError("x"): 4,
        FolderLocked("x", REPO, []): 4,
        ModelLoadError("x"): 5,
        OSError(28, "No space left on device"): 6,
        RuntimeError("[enforce fail at inline_container.cc] file write failed"): 6,
        PeerFailed("x"): 7,
        KeyError("surprise"): 1,
    }
    for err, code in cases.items():
        got, line = classify(err)
        assert got == code, (err, got)
        assert "\n" not in line
        assert f"    {code}  " in doc  # each code is documented


def test_model_load_error_is_one_line_exit_5(tmp_path, pickapic_clean, capsys):
    broken = tmp_path / "m"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text("{}")
    assert train_here(_cfg(tmp_path, broken, pickapic_clean, tmp_path / "run")) == 5
    err = _said(capsys.readouterr().err)
    assert len(err) == 1 and "cannot load" in err[0] and str(broken) in err[0]


@pytest.mark.slow
def test_rank0_failing_alone_does_not_leave_the_other_hanging(tmp_path, tiny_sd, pickapic_clean):
    import shutil

    from .conftest import free_port

    exe = shutil.which("deepspeed", path=str(REPO / ".venv" / "bin")) or shutil.which("deepspeed")
    out = tmp_path / "run"
    cfg = _cfg(
        tmp_path, tiny_sd, pickapic_clean, out, max_steps=3, checkpoint_every=1,
        train_batch_size_per_gpu=1, debug_fail_at_step=2,
    )  # fmt: skip
    cmd = [exe, "--master_port", str(free_port()), "--num_gpus", "2", "snpo/train.py"]
    t0 = time.monotonic()
    r = subprocess.run(
        [*cmd, "--config", str(cfg)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stdout[-2000:]
    assert "snpo train: I/O error" in r.stderr and "No space left on device" in r.stderr
    assert took < 150, took  # not a collective timeout (30 min)
    assert complete_tags(out / "checkpoints") == ["step_00000001"]  # the good one is intact


# ---- host synchronisation: once per optimizer step, not per micro-step ----------------------
_STEP_CODE = ("snpo/trainer/", "snpo/step.py", "snpo_kernels/")


def _syncs_per_step(tmp_path, model, data, accum: int, monkeypatch) -> float:
    """Tensor → Python conversions (item, float, int, bool, tolist) made by the step's own code
    (the loop, the step, the loss), per optimizer step, setup excluded. The data loader's and
    the draws' conversions of host tensors are not device syncs and are not counted, nor are
    torch's AdamW step counters (host tensors on a GPU too)."""
    from snpo.trainer import MetricsLogger

    counts = {"n": 0, "on": False}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            if counts["on"]:
                caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                counts["n"] += any(part in caller for part in _STEP_CODE)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    steps = {"seen": 0}
    real_log = MetricsLogger.log

    def log(self, record):
        steps["seen"] += 1
        counts["on"] = steps["seen"] < 4  # count over steps 2..4 (after step 1's logging)
        return real_log(self, record)

    monkeypatch.setattr(MetricsLogger, "log", log)
    cfg = _cfg(
        tmp_path, model, data, tmp_path / f"run{accum}", max_steps=4, objective="snpo",
        train_batch_size_per_gpu=1, gradient_accumulation_steps=accum,
    )  # fmt: skip
    assert train_here(cfg) == 0
    return counts["n"] / 3


def test_host_syncs_do_not_grow_with_accumulation(tmp_path, tiny_sd, pickapic_clean, monkeypatch):
    one = _syncs_per_step(tmp_path, tiny_sd, pickapic_clean, 1, monkeypatch)
    four = _syncs_per_step(tmp_path, tiny_sd, pickapic_clean, 4, monkeypatch)
    assert four == one, (one, four)
    assert one <= 20, one  # a fixed number per optimizer step


@pytest.mark.gpu
def test_fp16_overflow_is_skipped_not_fatal_on_cuda(tmp_path, tiny_sd, pickapic_clean, capsys):
    """GPU suite: DeepSpeed's fp16 loss scaling skips an overflowing step; the guard lets it
    pass, and stops only past max_skipped_steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "run"
    cfg = _cfg(
        tmp_path, tiny_sd, pickapic_clean, out, precision="fp16", device="cuda", max_steps=4,
        debug_overflow_at_step=2,
    )  # fmt: skip
    assert train_here(cfg) == 0, capsys.readouterr().err
    rows = read_metrics(out)
    assert [r["skipped_step"] for r in rows][1] is True
    assert "loss-scale overflow" in capsys.readouterr().out
    cfg = _cfg(
        tmp_path, tiny_sd, pickapic_clean, tmp_path / "strict", precision="fp16", device="cuda",
        max_steps=4, debug_overflow_at_step=2, max_skipped_steps=0,
    )  # fmt: skip
    assert train_here(cfg) == 3
