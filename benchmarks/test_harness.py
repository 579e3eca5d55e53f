"""Unit tests of the suite's pure parts (byte counts, statistics, targets, the writers, the
case grid), and of the CUDA timing/memory orchestration with fake events, so CI on a CPU
exercises what a GPU run relies on. Long (~670 lines) because it mirrors ``harness.py`` and
``report.py`` function by function."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from . import harness as H
from . import report as R
from .cases import (
    DTYPES,
    Case,
    cpu_grid,
    gpu_grid,
    grid_name,
    make_inputs,
    quick_grid,
)
from .providers import check_against_eager, make_op, provider_availability, wanted_providers

MiB = H.MiB


# --------------------------------------------------------------------------------- bytes
def test_min_bytes_formula_by_hand():
    # P = 2 pairs, N = 10 elements per sample → numel = 40; bf16 (2 bytes)
    numel, s, p = 40, 2, 2
    fwd_pred = H.min_bytes(numel=numel, elem_size=s, pairs=p, ref="ref_pred", mode="fwd")
    assert fwd_pred == 3 * 40 * 2 + p + 4  # pred, target, ref_pred; swap; loss
    fwd_err = H.min_bytes(numel=numel, elem_size=s, pairs=p, ref="ref_err", mode="fwd")
    assert fwd_err == 2 * 40 * 2 + 2 * p * 4 + p + 4  # pred, target; ref_err; swap; loss
    both = H.min_bytes(numel=numel, elem_size=s, pairs=p, ref="ref_pred", mode="fwdbwd")
    assert both - fwd_pred == numel * s + 4  # the gradient written once + grad_output
    weighted = H.min_bytes(
        numel=numel, elem_size=s, pairs=p, ref="ref_pred", mode="fwd", has_weight=True
    )
    assert weighted - fwd_pred == 4 * p
    unswapped = H.min_bytes(
        numel=numel, elem_size=s, pairs=p, ref="ref_pred", mode="fwd", has_swap=False
    )
    assert fwd_pred - unswapped == p


def test_split_bytes_adds_the_backward_reread():
    kw = {"numel": 40, "elem_size": 2, "pairs": 2, "ref": "ref_pred"}
    assert H.split_bytes(mode="fwd", **kw) == H.min_bytes(mode="fwd", **kw)
    extra = H.split_bytes(mode="fwdbwd", **kw) - H.min_bytes(mode="fwdbwd", **kw)
    assert extra == 2 * 40 * 2 + 2 * 4 * 4  # pred, target again; e and coefficients (2P each)
    c = Case("sd3", 32, "bf16", "ref_pred")
    # strict floor 4 tensors, split 6: at copy speed the split op reaches 4/6 of the floor rate
    assert c.split_bytes("fwdbwd") / c.min_bytes("fwdbwd") == pytest.approx(1.5, rel=1e-4)


def test_min_bytes_rejects_unknown_modes():
    with pytest.raises(ValueError):
        H.min_bytes(numel=4, elem_size=2, pairs=1, ref="ref", mode="fwd")
    with pytest.raises(ValueError):
        H.min_bytes(numel=4, elem_size=2, pairs=1, ref="ref_err", mode="bwd")


def test_case_bytes_for_sdxl_p8_bf16():
    c = Case("sdxl", 8, "bf16", "ref_pred")
    assert c.batch_shape == (16, 4, 128, 128)
    assert c.numel == 16 * 4 * 128 * 128
    assert c.pred_bytes == 2 * MiB
    assert c.min_bytes("fwdbwd") == 4 * 2 * MiB + 8 + 4 + 4
    assert c.min_bytes("fwd") == 3 * 2 * MiB + 8 + 4
    assert c.set_bytes == 3 * 2 * MiB + 8
    e = Case("sd3", 32, "fp32", "ref_err")
    assert e.pred_bytes == 64 * 16 * 128 * 128 * 4
    assert e.min_bytes("fwdbwd") == 3 * e.pred_bytes + 64 * 4 + 32 + 8


def test_bandwidth_and_fraction():
    assert H.bandwidth(1e9, 1.0) == pytest.approx(1e12)
    assert H.bandwidth(1e9, 0.0) is None
    assert H.bandwidth(1e9, None) is None
    assert H.fraction(2.0, 4.0) == 0.5
    assert H.fraction(None, 4.0) is None
    assert H.fraction(2.0, None) is None


def test_num_input_sets_covers_twice_the_cache_within_limits():
    l2 = 50 * MiB
    assert H.num_input_sets(6 * MiB, cache_bytes=l2, free_bytes=None) == math.ceil(100 / 6)
    assert H.num_input_sets(96 * MiB, cache_bytes=l2, free_bytes=None) == 2  # min_sets
    assert H.num_input_sets(1024, cache_bytes=l2, free_bytes=None) == 64  # max_sets
    # memory: only what fits after the reserve
    assert H.num_input_sets(10 * MiB, cache_bytes=l2, free_bytes=35 * MiB, reserve_bytes=0) == 3
    assert (
        H.num_input_sets(10 * MiB, cache_bytes=l2, free_bytes=15 * MiB, reserve_bytes=8 * MiB) == 0
    )
    assert H.num_input_sets(10 * MiB, cache_bytes=0, free_bytes=None) == 2
    with pytest.raises(ValueError):
        H.num_input_sets(0, cache_bytes=l2, free_bytes=None)


# ---------------------------------------------------------------------------- statistics
def test_quantile_and_timing_summary():
    assert H.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert H.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        H.quantile([], 0.5)
    t = H.Timing([1.0, 2.0, 3.0, 100.0], host_ms=[0.1, 0.3, 0.2], timer="cuda_events")
    s = t.summary()
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0 and s["repeats"] == 4
    assert s["host_ms"] == 0.2 and s["timer"] == "cuda_events"


def test_repeats_for_clamps():
    assert H.repeats_for(1.0, target_ms=100, lo=10, hi=500) == 100
    assert H.repeats_for(0.01, target_ms=100, lo=10, hi=500) == 500
    assert H.repeats_for(50.0, target_ms=100, lo=10, hi=500) == 10
    assert H.repeats_for(0.0, target_ms=100, lo=10, hi=500) == 500


def test_backlog_covers_twice_the_host_time():
    assert H.backlog_cycles_for(0.1, 1000.0) == int((0.2 + 0.02) * 1000)
    assert H.backlog_cycles_for(100.0, 1000.0, cap_ms=5.0) == 5000


# ------------------------------------------------------------------ timing on the CPU
def test_warm_up_and_wall_clock_on_cpu():
    calls = []

    def op(x):
        calls.append(x)
        return x * 2

    sets = [torch.ones(3), torch.ones(3) * 2, torch.ones(3) * 3]
    w = H.warm_up(op, sets, torch.device("cpu"), min_calls=2, min_ms=0.0)
    assert w.calls >= len(sets) and w.first_call_ms >= 0 and w.per_call_ms >= 0
    assert {id(c) for c in calls} == {id(s) for s in sets}  # every set touched
    t = H.time_op(op, sets, torch.device("cpu"), 7)
    assert len(t.times_ms) == 7 and t.timer == "wall_clock"
    assert calls[-7:] == [sets[i % 3] for i in range(7)]  # rotation order


def test_warm_up_stops_at_max_ms():
    def slow(x):
        time.sleep(0.002)
        return x

    w = H.warm_up(slow, [0], torch.device("cpu"), min_calls=10_000, min_ms=0.0, max_ms=20.0)
    assert 1 <= w.calls < 100


# ----------------------------------------------- CUDA orchestration with fake events
class _FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        _FakeEvent.clock[0] += 1.0
        self.t = _FakeEvent.clock[0]

    def elapsed_time(self, other):
        return other.t - self.t

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    sleeps = []
    mem = {"allocated": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: sleeps.append(cycles))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: mem.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: mem["peak"])
    return sleeps, mem


def test_cuda_event_timing_orchestration(fake_cuda):
    sleeps, _ = fake_cuda
    seen = []

    def op(x):
        seen.append(x)
        _FakeEvent.clock[0] += 10.0 * x  # "device time" of this call
        return x

    t = H.time_op(op, [1, 2], torch.device("cuda"), 4, cycles_per_ms=1000.0, host_ms=0.5)
    assert t.timer == "cuda_events"
    assert seen == [1, 2, 1, 2]
    # each event pair brackets exactly one call: end − start = 10·x + 1 (the end record)
    assert t.times_ms == [11.0, 21.0, 11.0, 21.0]
    assert sleeps == [H.backlog_cycles_for(0.5, 1000.0)] * 4
    assert len(t.host_ms) == 4


def test_peak_extra_memory_orchestration(fake_cuda):
    _, mem = fake_cuda

    def op(x):
        mem["peak"] = mem["allocated"] + 3 * MiB  # the call allocates 3 MiB at its peak
        return x

    assert H.peak_extra_memory(op, 0, torch.device("cuda")) == 3 * MiB
    assert H.peak_extra_memory(op, 0, torch.device("cpu")) is None


def test_copy_bandwidth_on_cpu():
    c = H.measure_copy_bandwidth(torch.device("cpu"), 4 * MiB, repeats=3)
    assert c["bytes_moved"] == 2 * c["buffer_bytes"] == 8 * MiB
    assert c["bytes_per_s"] > 0 and c["repeats"] == 3


# ------------------------------------------------------------------------------ targets
def _row(provider, shape="sdxl", pairs=8, mode="fwdbwd", median=1.0, **kw):
    r = {
        "case": f"{shape}-P{pairs}-bf16-ref_pred",
        "shape": shape,
        "pairs": pairs,
        "dtype": "bf16",
        "ref": "ref_pred",
        "mode": mode,
        "provider": provider,
        "status": "ok",
        "median_ms": median,
        "min_bytes": 8 * MiB,
        "pred_bytes": 2 * MiB,
        "frac_copy": None,
        "extra_mem_bytes": None,
    }
    r.update(kw)
    return r


def test_speedup_ratios_and_targets():
    rows = [
        _row("eager", median=3.3),
        _row("compile", median=1.2),
        _row("triton", median=1.0, extra_mem_bytes=2 * MiB + 4096),
        _row("cuda", median=1.0, extra_mem_bytes=5 * MiB),
        _row("triton", mode="fwd", median=0.1),  # forward rows are not judged
    ]
    rows = R.add_ratios(rows)
    tri = rows[2]
    assert tri["speedup_vs_eager"] == pytest.approx(3.3)
    assert tri["speedup_vs_compile"] == pytest.approx(1.2)
    assert rows[0]["speedup_vs_eager"] == 1.0
    assert rows[4]["speedup_vs_eager"] is None  # no eager fwd row
    checks = H.evaluate_targets(rows)
    by = {(c["target"], c["provider"]): c for c in checks}
    assert by[("vs_eager", "triton")]["pass"] is True
    assert by[("vs_compile", "triton")]["pass"] is False  # 1.2 < 1.3
    assert by[("vs_compile", "triton")]["by"] == pytest.approx(1.2 / 1.3 - 1)
    assert "short" in by[("vs_compile", "triton")]["text"]
    assert by[("extra_memory", "triton")]["pass"] is True  # 2 MiB + 4 KiB ≤ pred + slack
    assert by[("extra_memory", "cuda")]["pass"] is False
    assert by[("extra_memory", "cuda")]["by"] == -(5 * MiB - 2 * MiB - H.MEMORY_SLACK_BYTES)
    assert not any(c["provider"] in ("eager", "compile") for c in checks)
    summary = H.summarize_targets(checks)
    assert summary["vs_compile"]["all_pass"] is False
    assert summary["vs_compile"]["passed"] == 0  # triton and cuda both 1.2× compile
    assert summary["vs_compile"]["checks"] == 2
    assert summary["vs_eager"]["all_pass"] is True


def test_copy_fraction_target_only_at_large_shapes():
    small = _row("cuda", shape="sd3", pairs=8, frac_copy=0.5)
    big = _row("cuda", shape="sd3", pairs=32, frac_copy=0.80, min_bytes=H.LARGE_MIN_BYTES)
    bigger = _row("triton", shape="video", pairs=32, frac_copy=0.9, min_bytes=128 * MiB)
    checks = H.evaluate_targets([small, big, bigger])
    frac = [c for c in checks if c["target"] == "copy_fraction"]
    assert [(c["provider"], c["pass"]) for c in frac] == [("cuda", False), ("triton", True)]
    assert frac[0]["by"] == pytest.approx(-0.05)
    assert "miss by 5.0 points" in frac[0]["text"]
    assert all(c["target"] != "vs_eager" for c in checks)  # sd3/video are not speed-up cases


def test_targets_skip_failed_rows():
    rows = [_row("triton", status="skipped", frac_copy=0.1, min_bytes=1 << 40)]
    assert H.evaluate_targets(rows) == []


# ------------------------------------------------------------------------------ writers
def _results(claim: bool, rows):
    meta = {
        "date": "2026-01-02",
        "timestamp": "2026-01-02T03:04:05+00:00",
        "claim": claim,
        "device": {"name": "Fake | GPU", "slug": "fake-gpu", "detail": "test"},
        "versions": {"torch": "2.x", "cuda": "13.0", "triton": "3.x", "snpo": "0.1.0"},
        "grid": "quick",
        "n_cases": 1,
        "providers": {"eager": None, "cuda": "cannot import"},
        "copy": {
            "buffer_bytes": 1 << 30,
            "bytes_moved": 2 << 30,
            "median_ms": 0.7,
            "repeats": 30,
            "timer": "cuda_events",
            "bytes_per_s": 3.0e12,
        },
    }
    return R.build_results(meta, rows, ["sd15", "sdxl", "sd3", "video"])


def test_markdown_gpu_run_has_targets_and_rows(tmp_path):
    rows = [
        _row("eager", median=3.0, extra_mem_bytes=9 * MiB, frac_copy=0.1),
        _row("compile", median=1.0),
        _row("triton", median=0.5, extra_mem_bytes=2 * MiB, frac_copy=0.4),
        _row("triton", shape="sd3", pairs=32, status="skipped", reason="does not fit | at all"),
    ]
    res = _results(True, rows)
    assert res["targets"]["evaluated"]
    md = R.render_markdown(res)
    assert "NOT performance claims" not in md
    assert "## Targets" in md and "PASS (1/1)" in md
    assert "Fake \\| GPU" in md  # pipes escaped inside cells
    assert "does not fit \\| at all" in md
    assert "6.00×" in md  # triton vs eager: 3.0 / 0.5
    assert "3.00 TB/s" in md
    assert "cuda: not run — cannot import" in md
    # one table row per result row, each with the header's column count
    table = [ln for ln in md.splitlines() if ln.startswith("| sd")]
    assert len(table) == 4
    ncols = md.splitlines()[
        md.splitlines().index(next(ln for ln in md.splitlines() if ln.startswith("| case |")))
    ].count(" | ")
    assert all(ln.replace("\\|", "").count(" | ") == ncols for ln in table)
    j, m = R.write_results(res, tmp_path)
    assert j.name == "fake-gpu-2026-01-02.json" and m.name == "fake-gpu-2026-01-02.md"
    back = json.loads(j.read_text())
    assert back["rows"][0]["provider"] == "eager" and back["versions"]["torch"] == "2.x"


def test_markdown_cpu_run_is_labelled_not_a_claim():
    res = _results(False, [_row("eager"), _row("compile")])
    assert not res["targets"]["evaluated"]
    md = R.render_markdown(res)
    assert R.CPU_NOTE in md
    assert "Not evaluated: CPU run" in md


def test_formatters():
    assert R.fmt_us(0.0123) == "12.3"
    assert R.fmt_us(2.5) == "2500"
    assert R.fmt_us(None) == "—"
    assert R.fmt_bytes(3 * MiB) == "3.00 MiB"
    assert R.fmt_bytes(2048) == "2.0 KiB"
    assert R.fmt_rate(3.1e12) == "3.10 TB/s"
    assert R.fmt_rate(5e9) == "5.0 GB/s"
    assert R.fmt_pct(0.853) == "85.3%"


def test_plot_renders_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from . import plot

    rows = []
    for shape, pairs, size in (("sd15", 8, 0.5), ("sdxl", 8, 2.0), ("sd3", 32, 32.0)):
        for prov, t in (("eager", 3.0), ("compile", 1.5), ("triton", 1.0), ("cuda", 0.9)):
            for mode in ("fwd", "fwdbwd"):
                rows.append(
                    _row(
                        prov,
                        shape=shape,
                        pairs=pairs,
                        mode=mode,
                        median=t * size / 10,
                        frac_copy=0.8 / t,
                        pred_bytes=int(size * MiB),
                    )
                )
    res = _results(True, rows)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    assert plot.main([str(path), "-o", str(tmp_path / "r.png")]) == 0
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ------------------------------------------------------------------------ names, places
def test_slugify_and_results_dir(tmp_path):
    assert H.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert H.slugify("  ") == "unknown"
    root = tmp_path
    assert H.results_dir(on_gpu=True, env={}, repo_root=root)[0] == root / "benchmarks/results"
    assert H.results_dir(on_gpu=False, env={}, repo_root=root)[0] == root / ".benchmarks/snpo"
    saved = H.results_dir(on_gpu=False, env={"SNPO_BENCH_SAVE": "1"}, repo_root=root)
    assert saved[0] == root / "benchmarks/results"
    out = H.results_dir(on_gpu=True, env={"SNPO_BENCH_OUT": str(tmp_path / "o")}, repo_root=root)
    assert out == ((tmp_path / "o").resolve(), "SNPO_BENCH_OUT")


# ------------------------------------------------------------------------------- cases
def test_gpu_grid_covers_the_issue():
    grid = gpu_grid()
    ids = {c.id for c in grid}
    assert len(grid) == len(ids) == 4 * 3 * 2 + 2
    assert {c.shape for c in grid} == {"sd15", "sdxl", "sd3", "video"}
    assert {c.pairs for c in grid} == {1, 8, 32}
    assert {c.dtype for c in grid} == {"bf16", "fp32"}
    assert Case("video", 1, "bf16", "ref_err").sample_shape == (4, 16, 64, 64)
    assert Case("sd3", 1, "bf16", "ref_err").sample_shape == (16, 128, 128)
    # the target cases run first, the large ones next
    assert all(c.is_target_case for c in grid[:6])  # bf16 then fp32
    assert [c.dtype for c in grid[:6]] == ["bf16"] * 4 + ["fp32"] * 2
    assert {(c.shape, c.pairs) for c in grid[6:10]} == {("sd3", 32), ("video", 32)}
    q = quick_grid()
    assert {(c.shape, c.pairs) for c in q} == {
        ("sd15", 8),
        ("sdxl", 8),
        ("sd3", 32),
        ("video", 32),
    }
    assert max(c.pred_bytes for c in cpu_grid()) <= MiB


def test_grid_name_from_environment():
    assert grid_name(True, {}) == "full"
    assert grid_name(False, {}) == "cpu"
    assert grid_name(False, {"SNPO_BENCH_GRID": "quick"}) == "quick"
    with pytest.raises(ValueError):
        grid_name(True, {"SNPO_BENCH_GRID": "huge"})


@pytest.mark.parametrize("ref", ["ref_pred", "ref_err"])
def test_make_inputs(ref):
    case = Case("tiny", 2, "bf16", ref)
    x = make_inputs(case, torch.device("cpu"), seed=0)
    assert x.pred.shape == x.target.shape == (4, 4, 16, 16)
    assert x.pred.dtype == DTYPES["bf16"] and x.pred.requires_grad and x.pred.is_leaf
    assert x.swap.shape == (2,) and x.swap.dtype == torch.bool
    assert x.pred.abs().sum() > 0 and x.target.abs().sum() > 0
    if ref == "ref_pred":
        assert x.ref_err is None and x.ref_pred.shape == x.pred.shape
    else:
        assert x.ref_pred is None and x.ref_err.shape == (4,) and x.ref_err.dtype == torch.float32
    y = make_inputs(case, torch.device("cpu"), seed=1)
    assert not torch.equal(x.pred, y.pred)


# --------------------------------------------------------------------------- providers
def test_provider_selection():
    assert wanted_providers({}) == ["eager", "compile", "triton", "cuda"]
    assert wanted_providers({"SNPO_BENCH_PROVIDERS": "cuda, eager"}) == ["eager", "cuda"]
    with pytest.raises(ValueError):
        wanted_providers({"SNPO_BENCH_PROVIDERS": "numpy"})
    cpu = torch.device("cpu")
    all_ = ["eager", "compile", "triton", "cuda"]
    assert provider_availability("eager", cpu, torch.bfloat16, all_) is None
    assert "CPU" in provider_availability("triton", cpu, torch.bfloat16, all_)
    assert "not selected" in provider_availability("compile", cpu, torch.bfloat16, ["eager"])


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_eager_op_shapes(mode):
    case = Case("tiny", 2, "fp32", "ref_pred")
    x = make_inputs(case, torch.device("cpu"), seed=3)
    out = make_op("eager", mode)(x)
    if mode == "fwd":
        assert out.shape == () and out.requires_grad
    else:
        assert out.shape == x.pred.shape and out.dtype == x.pred.dtype
        assert x.pred.grad is None  # torch.autograd.grad: nothing accumulated
    assert check_against_eager("eager", case, x) is None


def test_check_against_eager_catches_a_wrong_provider(monkeypatch):
    from . import providers

    case = Case("tiny", 2, "fp32", "ref_pred")
    x = make_inputs(case, torch.device("cpu"), seed=4)
    good = providers.loss_fn

    def fake(provider):
        f = good("eager")
        return f if provider == "eager" else (lambda x: 1.5 * f(x))

    monkeypatch.setattr(providers, "loss_fn", fake)
    assert "loss" in providers.check_against_eager("triton", case, x)


def test_results_dir_default_is_not_the_repo(tmp_path):
    d, why = H.results_dir(on_gpu=False, env={}, repo_root=Path("/repo"))
    assert d == Path("/repo/.benchmarks/snpo") and "CPU" in why


def test_summary_lines(tmp_path, capsys):
    rows = [
        _row("eager", median=3.0),
        _row("compile", median=1.0),
        _row("cuda", median=0.5, frac_copy=0.5),
        _row("triton", status="error", reason="boom"),
    ]
    res = _results(True, rows)
    lines = R.summary_lines(res)
    body = [ln for ln in lines if ln.startswith("sdxl-P8")]
    assert len(body) == 1 and "3000" in body[0] and "error" in body[0] and "6.00×" in body[0]
    assert any(ln.startswith("target vs_eager: PASS") for ln in lines)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    assert R.main([str(path)]) == 0
    assert "sdxl-P8-bf16-ref_pred" in capsys.readouterr().out


# ------------------------------------------------------------------------ trainer rows
def _trainer_row(variant, median, mem=None, status="ok", model="sd15", pairs=8, cpu=None):
    from .trainer_cases import BASELINE, REFERENCE_ID, Variant

    if variant == REFERENCE_ID:
        kind = {"ref": "reference", "loss": "eager DPO", "branches": "batched"}
        baseline, backend = False, None
    else:
        v = Variant(*variant.split("-"))
        kind = {"ref": v.ref, "loss": v.loss, "branches": v.branches}
        baseline, backend = v == BASELINE, "triton" if v.loss == "fused" else "torch"
    return {
        "table": "trainer",
        "case": f"{model}-P{pairs}-{variant}",
        "model": model,
        "pairs": pairs,
        "variant": variant,
        **kind,
        "baseline": baseline,
        "reference": variant == REFERENCE_ID,
        "backend": backend,
        "device_type": "cuda" if model in ("sd15", "sdxl") else "cpu",
        "judged_on": "wall" if model in ("sd15", "sdxl") else "cpu",
        "dtype": "bfloat16" if model in ("sd15", "sdxl") else "float32",
        "status": status,
        "reason": None if status == "ok" else "out of memory",
        "median_ms": median,
        "min_ms": None if median is None else 0.9 * median,
        "cpu_median_ms": None if median is None else (cpu or median),
        "cpu_min_ms": None if median is None else 0.9 * (cpu or median),
        "repeats": 6,
        "pairs_per_s": None if median is None else pairs / (median * 1e-3),
        "pairs_per_hour": None if median is None else 3600 * pairs / (median * 1e-3),
        "peak_mem_bytes": mem,
        "resident_bytes": None if mem is None else mem // 2,
    }


def _trainer_meta(claim: bool) -> dict:
    return {"target_models": ["sd15-small", "sd15", "sdxl"], "note": "n", "timing": "t"}


def test_trainer_rows_get_their_own_section():
    trainer = [
        _trainer_row("reference", 400.0, mem=22 << 30),
        _trainer_row("live-fused-batched", 200.0, mem=20 << 30),
        _trainer_row("cached-fused-batched", 160.0, mem=18 << 30),
        _trainer_row("live-eager-split", None, status="skipped"),
    ]
    res = _results(True, [_row("eager", median=3.0), _row("triton", median=0.5), *trainer])
    assert [r["provider"] for r in res["rows"]] == ["eager", "triton"]  # kernel rows only
    tr = {r["variant"]: r for r in res["trainer_rows"]}
    assert tr["live-fused-batched"]["speedup_vs_baseline"] == 1.0
    assert tr["cached-fused-batched"]["speedup_vs_baseline"] == 1.25
    assert tr["cached-fused-batched"]["speedup_vs_reference"] == 2.5
    assert tr["live-fused-batched"]["cpu_speedup_vs_reference"] == 2.0
    assert tr["cached-fused-batched"]["mem_vs_baseline"] == pytest.approx(0.9)
    assert tr["live-eager-split"]["speedup_vs_baseline"] is None
    md = R.render_markdown(res)
    assert "## Targets" in md and "## Trainer step" in md
    body = [ln for ln in md.splitlines() if ln.startswith("| sd15 | 8 |")]
    assert len(body) == 4
    assert "| cache (latents, text, `ref_err`) | fused (triton) | one 2P forward | 160.0 |" in md
    assert "| 2.50× | 2.50× | — | 1.25× |" in md  # no per-round times: no paired column
    assert "18.00 GiB" in md and "skipped: out of memory" in md
    lines = R.summary_lines(res)
    assert "trainer step:" in lines and any("cached-fused-batched" in ln for ln in lines)

    only = _results(False, trainer)  # a trainer-only run: no kernel tables, no targets
    md = R.render_markdown(only)
    assert md.startswith("# snpo trainer-step benchmarks") and "## Targets" not in md
    assert "copy bandwidth" not in md and R.CPU_NOTE in md


def test_trainer_targets():
    rows = [
        _trainer_row("reference", 10_000.0, model="sd15-small", pairs=2, cpu=9_000.0),
        _trainer_row("live-fused-batched", 9_000.0, model="sd15-small", pairs=2, cpu=9_500.0),
        _trainer_row("cached-fused-batched", 7_000.0, model="sd15-small", pairs=2, cpu=5_000.0),
        _trainer_row("reference", 100.0, model="tiny-sd", pairs=2),  # never judged
        _trainer_row("cached-fused-batched", 100.0, model="tiny-sd", pairs=2),
        _trainer_row("reference", 1000.0, model="sd15", pairs=8),
        _trainer_row("cached-fused-batched", 600.0, model="sd15", pairs=8),
        _trainer_row("reference", 400.0, model="sd15", pairs=1),
        _trainer_row("cached-fused-batched", 250.0, model="sd15", pairs=1),
    ]
    meta = {"claim": False, "trainer": _trainer_meta(False)}
    res = R.build_results(
        {"device": {"name": "x", "slug": "x"}, "date": "d", **meta}, rows, ("sd15",)
    )
    checks = {(c["target"], c["case"]): c for c in res["trainer_targets"]["checks"]}
    # CPU rows are judged on CPU time: live 9000/9500 < 1 (miss) although its wall time wins
    live = checks[("trainer_live", "sd15-small-P2-live-fused-batched")]
    assert not live["pass"] and live["value"] == pytest.approx(9 / 9.5)
    assert live["judged_on"] == "cpu"
    cached = checks[("trainer_cached", "sd15-small-P2-cached-fused-batched")]
    assert cached["pass"] and cached["value"] == pytest.approx(1.8)
    assert not any(c["case"].startswith("tiny") for c in checks.values())
    gpu = checks[("trainer_cached", "sd15-P8-cached-fused-batched")]
    assert gpu["judged_on"] == "wall" and gpu["value"] == pytest.approx(1000 / 600)
    # pairs per GPU-hour: the best P (8 pairs in 0.6 s = 48,000/h ≥ 30,000)
    ph = checks[("sd15_pairs_per_hour", "sd15-P8-cached-fused-batched")]
    assert ph["pass"] and ph["value"] == pytest.approx(48_000)
    summ = res["trainer_targets"]["summary"]
    assert summ["trainer_live"]["all_pass"] is False and summ["trainer_cached"]["checks"] == 3
    md = R.render_markdown(res)
    assert "### Trainer targets" in md and "MISS: 0.95× vs ≥ 1.00×" in md


def test_interleaved_round_order():
    assert H.rotated("ABC", 0) == list("ABC")
    assert H.rotated("ABC", 1) == list("BCA") and H.rotated("ABC", 5) == list("CAB")
    assert H.rotated([], 3) == []
    s = H.step_summary([3.0, 1.0, 2.0, 10.0], [2.0, 1.0, 1.5, 9.0])
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0
    assert s["cpu_median_ms"] == 1.75 and s["cpu_min_ms"] == 1.0 and s["repeats"] == 4


def test_trainer_groups_and_variants():
    from .conftest import PLANS, trainer_plan
    from .trainer_cases import (
        BASELINE,
        CPU_FULL_GROUPS,
        CPU_GROUPS,
        GPU_GROUPS,
        MODELS,
        ROW_IDS,
        TARGET_MODELS,
        VARIANTS,
        trainer_groups,
    )

    assert len(VARIANTS) == 8 and VARIANTS[0] == BASELINE and len(set(VARIANTS)) == 8
    assert ROW_IDS[0] == "reference" and len(ROW_IDS) == 9
    assert trainer_groups(True, {}) == list(GPU_GROUPS)
    assert trainer_groups(False, {}) == list(CPU_GROUPS) + list(GPU_GROUPS)
    full = trainer_groups(False, {"SNPO_BENCH_TRAINER": "full"})
    assert full == list(CPU_FULL_GROUPS) + list(GPU_GROUPS)
    assert trainer_groups(False, {"SNPO_BENCH_TRAINER": "none"}) == []
    with pytest.raises(ValueError, match="SNPO_BENCH_TRAINER"):
        trainer_groups(False, {"SNPO_BENCH_TRAINER": "all"})
    assert all(MODELS[m].gpu_only for m, _ in GPU_GROUPS)
    assert not any(MODELS[m].gpu_only for m, _ in CPU_GROUPS + CPU_FULL_GROUPS)
    assert all(m in TARGET_MODELS for m, _ in CPU_FULL_GROUPS + GPU_GROUPS)
    assert not any(m in TARGET_MODELS for m, _ in CPU_GROUPS)
    p = trainer_plan(PLANS["cpu"], {"SNPO_BENCH_TRAINER": "full"})
    assert p["step_rounds_min"] == p["step_rounds_max"] == 6 and p["trainer_budget_s"] == 1500
    p = trainer_plan(PLANS["cuda"], {"SNPO_BENCH_ROUNDS": "3", "SNPO_BENCH_TRAINER_BUDGET_S": "9"})
    assert p["step_rounds_min"] == 3 and p["trainer_budget_s"] == 9.0


def test_real_unet_configs_have_the_real_size():
    """SD1.5 and SDXL UNet configs as written in trainer_cases: their published parameter
    counts (built on the meta device: no memory, no download)."""
    diffusers = pytest.importorskip("diffusers")
    from .trainer_cases import SD15_UNET, SDXL_UNET

    for config, n in ((SD15_UNET, 859_520_964), (SDXL_UNET, 2_567_463_684)):
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**config)
        assert sum(p.numel() for p in unet.parameters()) == n


def test_paired_speedup_over_rounds():
    """Per-round ratios reference / row: the drift of the machine between rounds cancels (both
    rows slow down together in round 3), the interval is exp of the t-interval of the log
    ratios, and it widens when the ratios disagree."""
    ref = [100.0, 110.0, 200.0, 105.0]
    row = [90.0, 100.0, 181.0, 95.0]
    p = H.paired_speedup(ref, row)
    q = [a / b for a, b in zip(ref, row)]
    logs = [math.log(x) for x in q]
    m = sum(logs) / 4
    s = math.sqrt(sum((x - m) ** 2 for x in logs) / 3)
    half = 3.182 * s / 2  # t_{0.975, 3}, √4
    assert p["rounds"] == 4 and p["median"] == pytest.approx(sorted(q)[1] / 2 + sorted(q)[2] / 2)
    assert p["geomean"] == pytest.approx(math.exp(m))
    assert p["lo"] == pytest.approx(math.exp(m - half)) and p["hi"] == pytest.approx(
        math.exp(m + half)
    )
    assert 1.0 < p["lo"] < p["geomean"] < p["hi"]  # faster in every round: the interval excludes 1
    noisy = H.paired_speedup(ref, [80.0, 130.0, 190.0, 100.0])
    assert noisy["lo"] < 1.0 < noisy["hi"]
    assert H.paired_speedup([1.0], [1.0]) is None  # one round: no interval
    assert H.paired_speedup([1.0, 2.0], [1.0]) is None  # rows not timed in the same rounds
    # through the report: the judged clock's interval goes into the row and the target's text
    rows = [
        _trainer_row("reference", 100.0, model="sd15-small", pairs=2, cpu=100.0),
        _trainer_row("live-fused-batched", 95.0, model="sd15-small", pairs=2, cpu=95.0),
    ]
    rows[0]["cpu_ms"], rows[1]["cpu_ms"] = ref, row
    rows[0]["wall_ms"], rows[1]["wall_ms"] = ref, row
    res = R.build_results(
        {"device": {"name": "x", "slug": "x"}, "date": "d", "claim": False,
         "trainer": _trainer_meta(False)}, rows, ("sd15",),
    )  # fmt: skip
    live = next(r for r in res["trainer_rows"] if r["variant"] == "live-fused-batched")
    assert live["paired_cpu_speedup_vs_reference"]["geomean"] == pytest.approx(p["geomean"])
    (check,) = res["trainer_targets"]["checks"]
    assert f"[{p['lo']:.2f}, {p['hi']:.2f}]" in check["text"]
    assert f"{p['geomean']:.2f}× [{p['lo']:.2f}, {p['hi']:.2f}]" in R.render_markdown(res)


def test_target_rows_only():
    from .trainer_cases import BASELINE, CACHED_DEFAULT, REFERENCE_ID, ROW_IDS, row_ids

    assert row_ids({}) == ROW_IDS
    assert row_ids({"SNPO_BENCH_TRAINER_ROWS": "targets"}) == (
        REFERENCE_ID, BASELINE.id, CACHED_DEFAULT.id,
    )  # fmt: skip
    with pytest.raises(ValueError, match="SNPO_BENCH_TRAINER_ROWS"):
        row_ids({"SNPO_BENCH_TRAINER_ROWS": "some"})
