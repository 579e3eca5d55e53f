"""The cache-build benchmark's harness (``cache_build.py``) on a tiny model in seconds: the
builder's break-even report (summary and final log line), its allocator setting, and the
benchmark's arithmetic and rendering. No timing claims: the measurement itself is
``python -m benchmarks.cache_build`` (benchmarks/README.md)."""

from __future__ import annotations

import pytest
import torch

from . import cache_build as CB
from . import trainer_cases as TC

pytestmark = pytest.mark.skipif(TC.diffusers_missing() is not None, reason="needs diffusers")


def test_build_reports_break_even(tmp_path, capsys) -> None:
    from snpo.cache import build_cache
    from snpo.config import load_config

    cfg_path = CB.make_inputs(tmp_path, pairs=6, model="tiny-sd", sizes=((24, 20), (20, 28)))
    cfg = load_config(cfg_path)
    summary = build_cache(cfg, tmp_path / "cache", num_workers=0, shard_size=4, batch_size=2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("snpo cache:")]
    assert lines[-1].startswith("snpo cache: break-even: this build cost")
    assert "one build serves a whole sweep over beta, lam and the learning rate" in lines[-1]
    be = summary["break_even"]
    assert set(be) == {"latents", "text", "ref", "total", "runs"}
    # both flip variants of every image are encoded: at least 2 epochs of live VAE work at the
    # build's own encode rate (the phase also decodes and writes; no timing claim here)
    assert summary["vae_encodes"] == 6 * 2 * 2
    assert be["latents"] >= 2.0 - 1e-6
    assert be["ref"] == summary["epochs"] == 2  # the reference forwards of the 2 epochs
    assert 0 < be["text"] <= 1.0  # each distinct prompt once: at most one epoch of text work
    assert be["runs"] == pytest.approx(be["total"] / 2, abs=1e-3)
    assert set(summary["phase_cpu_seconds"]) == {"text", "latents", "ref"}
    assert summary["allocator_tuned"] is _glibc()


def _glibc() -> bool:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


def test_allocator_setting_can_be_turned_off(monkeypatch) -> None:
    from snpo.cache import build_allocator

    monkeypatch.setenv("SNPO_CACHE_MALLOC", "0")
    with build_allocator(torch.device("cpu")) as tuned:
        assert tuned is False
    monkeypatch.delenv("SNPO_CACHE_MALLOC")
    with build_allocator(torch.device("cpu")) as tuned:
        assert tuned is _glibc()
        x = torch.ones(1 << 20)  # allocations work under the setting
        assert float(x.sum()) == float(1 << 20)


def test_break_even_arithmetic() -> None:
    be = CB.break_even(
        300.0, pairs=64, pairs_per_step=2, live_step_s=10.0, cached_step_s=6.0, epochs_per_run=2
    )
    assert be["saving_per_epoch_s"] == pytest.approx(128.0)  # 32 steps × 4 s
    assert be["epochs"] == pytest.approx(300 / 128) and be["runs"] == pytest.approx(150 / 128)
    none = CB.break_even(
        1.0, pairs=4, pairs_per_step=2, live_step_s=1.0, cached_step_s=2.0, epochs_per_run=1
    )
    assert none["epochs"] is None and none["runs"] is None


def test_summary_and_markdown() -> None:
    def build(kind, what, lat_cpu):
        return {
            "kind": kind,
            "what": what,
            "cpu_s": lat_cpu + 20,
            "sys_s": 1.0,
            "wall_s": lat_cpu + 25,
            "worker_cpu_s": 2.0,
            "summary": {
                "epochs": 2,
                "vae_encodes": 256,
                "phase_cpu_seconds": {"latents": lat_cpu, "text": 1.0, "ref": 90.0},
                "phase_sys_seconds": {"latents": 0.5, "text": 0.0, "ref": 0.1},
                "break_even": {"latents": 2.0, "total": 2.0, "runs": 1.0},
            },
        }

    results = [
        {"kind": "live", "cpu_s_per_image": 0.6, "sys_s_per_image": 0.2},
        {"kind": "live_tuned", "cpu_s_per_image": 0.4, "sys_s_per_image": 0.0},
        build("build_untuned", "latents", 200.0),
        build("build", "latents,text,ref", 102.0),
    ]
    trainer = {
        "file": "x.json",
        "pairs": 2,
        "reference_cpu_s": 10.0,
        "live-fused-batched_cpu_s": 9.5,
        "cached-fused-batched_cpu_s": 5.5,
    }
    s = CB.summarize(results, pairs=64, trainer=trainer)
    assert s["build"]["cpu_s_per_variant"] == pytest.approx(104.0 / 256)
    assert s["build"]["vs_live_tuned"] == pytest.approx(104.0 / 256 / 0.4)
    assert s["target"]["pass"] is (104.0 / 256 / 0.4 <= 1.1)
    assert s["break_even"]["build_cpu_s"] == pytest.approx(102 + 1 + 90 + 2)
    assert s["break_even"]["cache_vs_live"]["epochs"] == pytest.approx(195 / (32 * 4.0))
    md = CB.render(
        {
            "summary": s,
            "device": {"name": "CPU test", "detail": "2 cores"},
            "date": "2026-01-01",
            "pairs": 64,
            "rounds": 1,
            "live_sys": 0.2,
            "live_tuned_sys": 0.0,
        }
    )
    assert "| build (now): 256 variants |" in md and "Break-even" in md and "runs" in md
