"""Pure measurement helpers of the benchmark suite: byte counts, timing (CUDA events on a GPU,
the wall clock on a CPU), the copy-bandwidth ceiling, peak extra memory, the targets.

Length (~630 lines): the pure helpers of both suites (kernel and trainer) in one place, each a
small function; splitting would leave two modules importing each other's constants.

Nothing here knows about pytest; ``test_harness.py`` unit-tests the arithmetic on the CPU.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------------------------
# Targets of issue 5 (kernel part). Evaluated on GPU runs only, for the fused providers.
# ---------------------------------------------------------------------------------------------
FUSED_PROVIDERS = ("triton", "cuda")
TARGET_COPY_FRACTION = 0.85  # fused fwd+bwd, large shapes: achieved / copy bandwidth
LARGE_MIN_BYTES = 64 * MiB  # "large shape": the fwd+bwd moves at least this (> L2 of H100/H200)
TARGET_VS_COMPILE = 1.3  # fused fwd+bwd at P = 8, SD1.5 and SDXL latents
TARGET_VS_EAGER = 3.0
SPEEDUP_SHAPES = ("sd15", "sdxl")
SPEEDUP_PAIRS = 8
# extra memory ≤ one tensor the size of pred, plus this for the per-sample/per-pair vectors and
# the scalar loss (each a few bytes, rounded up to the allocator's 512-byte blocks).
MEMORY_SLACK_BYTES = 1 * MiB


# ---------------------------------------------------------------------------------------------
# Byte counts
# ---------------------------------------------------------------------------------------------
def min_bytes(
    *,
    numel: int,
    elem_size: int,
    pairs: int,
    ref: str,
    mode: str,
    ref_err_size: int = 4,
    has_swap: bool = True,
    has_weight: bool = False,
) -> int:
    """The fewest bytes ``preference_loss`` must move through device memory.

    Every input read once, every output written once (numel = elements of pred = 2P·N,
    s = elem_size):

        forward          (2 + r)·numel·s          pred, target (+ ref_pred when r = 1) read
                         + 2P·4 [ref_err]  + P·1 [swap]  + P·4 [weight]  + 4 (loss written)
        forward+backward the forward's bytes + numel·s (∂loss/∂pred written once)
                         + 4 (grad_output read)

    This is the strict floor the targets use. An autograd op whose backward runs after its
    forward (grad_output is only known then) must re-read pred and target: see
    :func:`split_bytes`.
    """
    if ref not in ("ref_pred", "ref_err"):
        raise ValueError(f"ref must be 'ref_pred' or 'ref_err', got {ref!r}")
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    big_reads = 3 if ref == "ref_pred" else 2
    total = big_reads * numel * elem_size
    if ref == "ref_err":
        total += 2 * pairs * ref_err_size
    if has_swap:
        total += pairs  # bool
    if has_weight:
        total += pairs * 4
    total += 4  # the float32 loss
    if mode == "fwdbwd":
        total += numel * elem_size + 4  # the gradient, and grad_output
    return total


def split_bytes(*, numel: int, elem_size: int, pairs: int, ref: str, mode: str, **kw) -> int:
    """The fewest bytes when forward and backward are separate passes (as under autograd):
    the strict floor plus, for "fwdbwd", pred and target read again by the backward
    (2·numel·s) and the per-sample errors/coefficients saved by the forward and read back
    (2·2P·4). Informational: it shows how close a kernel runs to the copy bandwidth for the
    traffic a forward/backward split cannot avoid."""
    total = min_bytes(numel=numel, elem_size=elem_size, pairs=pairs, ref=ref, mode=mode, **kw)
    if mode == "fwdbwd":
        total += 2 * numel * elem_size + 2 * (2 * pairs * 4)
    return total


def bandwidth(nbytes: float, ms: float | None) -> float | None:
    """Bytes per second moved by an operation of ``nbytes`` taking ``ms`` milliseconds."""
    if ms is None or ms <= 0 or not math.isfinite(ms):
        return None
    return nbytes / (ms * 1e-3)


def fraction(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return value / ceiling


def num_input_sets(
    set_bytes: int,
    *,
    cache_bytes: int,
    free_bytes: int | None,
    reserve_bytes: int = 0,
    cache_multiple: float = 2.0,
    min_sets: int = 2,
    max_sets: int = 64,
) -> int:
    """How many distinct input sets to rotate through so that consecutive calls do not find
    their inputs in the cache: enough to cover ``cache_multiple``× the cache, at least
    ``min_sets`` and at most ``max_sets``, and no more than fit in ``free_bytes`` after
    ``reserve_bytes`` (the op's own workspace). Returns 0 when not even one set fits.
    """
    if set_bytes <= 0:
        raise ValueError("set_bytes must be positive")
    want = max(min_sets, math.ceil(cache_multiple * cache_bytes / set_bytes))
    want = min(want, max_sets)
    if free_bytes is None:
        return want
    fit = (free_bytes - reserve_bytes) // set_bytes
    return int(max(0, min(want, fit)))


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call times in milliseconds and their summary."""

    times_ms: list[float]
    host_ms: list[float] = field(default_factory=list)
    timer: str = "wall_clock"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def quantile(self, q: float) -> float:
        return quantile(self.times_ms, q)

    @property
    def host_median_ms(self) -> float | None:
        return statistics.median(self.host_ms) if self.host_ms else None

    def summary(self) -> dict[str, Any]:
        return {
            "timer": self.timer,
            "repeats": len(self.times_ms),
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "q20_ms": self.quantile(0.2),
            "q80_ms": self.quantile(0.8),
            "host_ms": self.host_median_ms,
        }


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def repeats_for(per_call_ms: float, *, target_ms: float, lo: int, hi: int) -> int:
    """Repeats so that the timed loop lasts about ``target_ms``, clamped to [lo, hi]."""
    if per_call_ms <= 0 or not math.isfinite(per_call_ms):
        return hi
    return int(min(hi, max(lo, round(target_ms / per_call_ms))))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class WarmUp:
    first_call_ms: float  # the first call alone, synchronized: JIT / torch.compile included
    calls: int
    per_call_ms: float  # wall time per warm-up call after the first (pipelined)
    host_ms: float  # median host time to issue one call


def warm_up(
    op: Callable[[Any], Any],
    sets: Sequence[Any],
    device: torch.device,
    *,
    min_calls: int,
    min_ms: float,
    max_ms: float = 2000.0,
) -> WarmUp:
    """Run ``op`` until compilation, autotuning and allocator growth are behind us: the first
    call alone (timed, it holds any compile), then every input set at least once and at least
    ``min_calls`` calls and ``min_ms`` milliseconds (at most ``max_ms``)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = op(sets[0])
    del out
    synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3

    host: list[float] = []
    calls = 0
    start = time.perf_counter()
    while True:
        elapsed = (time.perf_counter() - start) * 1e3
        enough = calls >= max(min_calls, len(sets)) and elapsed >= min_ms
        if enough or (calls >= 1 and elapsed >= max_ms):
            break
        h0 = time.perf_counter()
        out = op(sets[calls % len(sets)])
        host.append((time.perf_counter() - h0) * 1e3)
        del out
        calls += 1
    synchronize(device)
    total_ms = (time.perf_counter() - start) * 1e3
    return WarmUp(first_ms, calls, total_ms / max(calls, 1), statistics.median(host))


def time_wall_clock(
    op: Callable[[Any], Any], sets: Sequence[Any], device: torch.device, repeats: int
) -> Timing:
    """Per-call wall-clock times (a synchronize inside each timed region on a GPU)."""
    times: list[float] = []
    synchronize(device)
    for i in range(repeats):
        x = sets[i % len(sets)]
        t0 = time.perf_counter()
        out = op(x)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    return Timing(times, list(times), timer="wall_clock")


def sleep_cycles_per_ms(device: torch.device, cycles: int = 2_000_000) -> float:
    """Calibrate ``torch.cuda._sleep``: GPU clock cycles per millisecond (timed with events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # the first launch loads the kernel
    synchronize(device)
    best = math.inf
    for _ in range(3):
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return cycles / best


def time_cuda_events(
    op: Callable[[Any], Any],
    sets: Sequence[Any],
    device: torch.device,
    repeats: int,
    *,
    backlog_cycles: int = 0,
) -> Timing:
    """Per-call device times from a CUDA event pair around each call, rotating ``sets``.

    Before each call a spin kernel of ``backlog_cycles`` (``torch.cuda._sleep``) keeps the GPU
    busy while the host issues the call, so the events measure the call's kernels back to back
    (device time, as ``triton.testing.do_bench`` does with its cache flush) rather than the
    host's launch gaps. The host time to issue each call is kept in ``host_ms``.
    """
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    host: list[float] = []
    synchronize(device)
    for i in range(repeats):
        x = sets[i % len(sets)]
        if backlog_cycles > 0:
            torch.cuda._sleep(backlog_cycles)
        starts[i].record()
        h0 = time.perf_counter()
        out = op(x)
        host.append((time.perf_counter() - h0) * 1e3)
        ends[i].record()
        del out
    synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(times, host, timer="cuda_events")


def backlog_cycles_for(host_ms: float, cycles_per_ms: float, *, cap_ms: float = 5.0) -> int:
    """Spin long enough to cover twice the host's issue time (plus 20 µs), capped."""
    ms = min(cap_ms, 2.0 * max(host_ms, 0.0) + 0.02)
    return int(ms * cycles_per_ms)


def time_op(
    op: Callable[[Any], Any],
    sets: Sequence[Any],
    device: torch.device,
    repeats: int,
    *,
    cycles_per_ms: float | None = None,
    host_ms: float = 0.0,
) -> Timing:
    """CUDA events (with a host backlog) on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        backlog = backlog_cycles_for(host_ms, cycles_per_ms) if cycles_per_ms else 0
        return time_cuda_events(op, sets, device, repeats, backlog_cycles=backlog)
    return time_wall_clock(op, sets, device, repeats)


# ---------------------------------------------------------------------------------------------
# Copy bandwidth and memory
# ---------------------------------------------------------------------------------------------
def copy_op(x: torch.Tensor) -> torch.Tensor:
    """The bandwidth ceiling's operation: a device-to-device copy into a fresh buffer."""
    return torch.empty_like(x).copy_(x)


def measure_copy_bandwidth(
    device: torch.device,
    nbytes: int,
    *,
    repeats: int,
    cycles_per_ms: float | None = None,
) -> dict[str, Any]:
    """Median time of ``torch.empty_like(x).copy_(x)`` on an ``nbytes`` buffer of random
    floats; bandwidth counts bytes read plus bytes written (2·nbytes)."""
    numel = max(1, nbytes // 4)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(numel, device=device, generator=gen)
    w = warm_up(copy_op, [x], device, min_calls=3, min_ms=10.0)
    t = time_op(copy_op, [x], device, repeats, cycles_per_ms=cycles_per_ms, host_ms=w.host_ms)
    moved = 2 * numel * 4
    del x
    return {
        "buffer_bytes": numel * 4,
        "bytes_moved": moved,
        "median_ms": t.median_ms,
        "repeats": len(t.times_ms),
        "timer": t.timer,
        "bytes_per_s": bandwidth(moved, t.median_ms),
    }


def peak_extra_memory(op: Callable[[Any], Any], x: Any, device: torch.device) -> int | None:
    """Peak bytes allocated during one call beyond what was allocated just before it (the
    inputs and everything else live): ``max_memory_allocated`` after a reset, minus the
    allocation at the reset. The call's outputs (loss, graph, gradient) count; None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = op(x)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def _check(
    target: str, row: dict[str, Any], value: float, threshold: float, unit: str
) -> dict[str, Any]:
    ok = value >= threshold if unit != "bytes_max" else value <= threshold
    if unit == "bytes_max":
        by = threshold - value  # headroom (>0) or overshoot (<0), bytes
        text = (
            f"{value / MiB:.2f} MiB ≤ {threshold / MiB:.2f} MiB"
            if ok
            else f"{value / MiB:.2f} MiB > {threshold / MiB:.2f} MiB: over by {-by / MiB:.2f} MiB"
            f" ({value / row['pred_bytes']:.2f}× pred)"
        )
    elif unit == "fraction":
        by = value - threshold
        text = f"{value:.1%} vs ≥ {threshold:.0%}: " + (
            f"pass by {by * 100:.1f} points" if ok else f"miss by {-by * 100:.1f} points"
        )
    else:  # speed-up
        by = value / threshold - 1.0
        text = f"{value:.2f}× vs ≥ {threshold:.2f}×: " + (
            f"pass by {by:.0%}" if ok else f"miss: {-by:.0%} short"
        )
    return {
        "target": target,
        "provider": row["provider"],
        "case": row["case"],
        "mode": row["mode"],
        "value": value,
        "threshold": threshold,
        "pass": bool(ok),
        "by": by,
        "text": text,
    }


TARGET_NAMES = {
    "copy_fraction": f"fused fwd+bwd ≥ {TARGET_COPY_FRACTION:.0%} of copy bandwidth "
    f"(large shapes: ≥ {LARGE_MIN_BYTES // MiB} MiB moved)",
    "vs_compile": f"fused fwd+bwd ≥ {TARGET_VS_COMPILE}× faster than compile "
    f"(P = {SPEEDUP_PAIRS}, SD1.5 and SDXL latents)",
    "vs_eager": f"fused fwd+bwd ≥ {TARGET_VS_EAGER:g}× faster than eager "
    f"(P = {SPEEDUP_PAIRS}, SD1.5 and SDXL latents)",
    "extra_memory": "fused fwd+bwd extra memory ≤ one tensor the size of pred "
    f"(+{MEMORY_SLACK_BYTES // MiB} MiB for vectors)",
}


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/miss of each target for every fused-provider fwd+bwd row that was measured.

    Rows need: provider, case, shape, pairs, mode, status, min_bytes, frac_copy,
    speedup_vs_eager, speedup_vs_compile, extra_mem_bytes, pred_bytes.
    """
    checks: list[dict[str, Any]] = []
    for row in rows:
        if row.get("provider") not in FUSED_PROVIDERS or row.get("mode") != "fwdbwd":
            continue
        if row.get("status") != "ok":
            continue
        if row["min_bytes"] >= LARGE_MIN_BYTES and row.get("frac_copy") is not None:
            checks.append(
                _check("copy_fraction", row, row["frac_copy"], TARGET_COPY_FRACTION, "fraction")
            )
        if row["shape"] in SPEEDUP_SHAPES and row["pairs"] == SPEEDUP_PAIRS:
            if row.get("speedup_vs_compile") is not None:
                checks.append(
                    _check("vs_compile", row, row["speedup_vs_compile"], TARGET_VS_COMPILE, "x")
                )
            if row.get("speedup_vs_eager") is not None:
                checks.append(
                    _check("vs_eager", row, row["speedup_vs_eager"], TARGET_VS_EAGER, "x")
                )
        if row.get("extra_mem_bytes") is not None:
            limit = row["pred_bytes"] + MEMORY_SLACK_BYTES
            checks.append(_check("extra_memory", row, row["extra_mem_bytes"], limit, "bytes_max"))
    return checks


def summarize_targets(checks: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target name: checks, passes, and the worst case (the one furthest from passing)."""
    out: dict[str, dict[str, Any]] = {}
    for name in TARGET_NAMES:
        mine = [c for c in checks if c["target"] == name]
        if not mine:
            continue
        worst = min(mine, key=lambda c: c["by"])
        out[name] = {
            "description": TARGET_NAMES[name],
            "checks": len(mine),
            "passed": sum(c["pass"] for c in mine),
            "all_pass": all(c["pass"] for c in mine),
            "worst": {k: worst[k] for k in ("provider", "case", "value", "threshold", "text")},
        }
    return out


# ---------------------------------------------------------------------------------------------
# Trainer-step rows: interleaved rounds, wall and CPU time, targets (issue 22)
# ---------------------------------------------------------------------------------------------
# against the reference step (the Diffusion-DPO-style row), same model, batch and device:
TARGET_TRAINER_LIVE = 1.0  # live-fused-batched (ref_mode live)
TARGET_TRAINER_CACHED = 1.5  # cached-fused-batched (ref_mode cache)
TARGET_SD15_PAIRS_PER_HOUR = 30_000.0  # GPU, SD1.5 at 512 px, bf16 (Diffusion-DPO: ≈ 10.7k)
TRAINER_TARGET_NAMES = {
    "trainer_live": f"live · fused · batched ≥ {TARGET_TRAINER_LIVE:g}× the reference step",
    "trainer_cached": f"cached · fused · batched ≥ {TARGET_TRAINER_CACHED:g}× the reference step",
    "sd15_pairs_per_hour": f"GPU, SD1.5 512 px bf16: ≥ {TARGET_SD15_PAIRS_PER_HOUR:,.0f} pairs "
    "per GPU-hour (the best P of cached · fused · batched)",
}


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    """The order of round ``r`` of an interleaved measurement: ``items`` rotated left by r
    (A B C, B C A, C A B, ...), so that every row takes every position in turn."""
    items = list(items)
    if not items:
        return []
    k = r % len(items)
    return items[k:] + items[:k]


def cpu_time_s() -> float:
    """CPU time of this process (user + system, all threads), seconds."""
    return time.process_time()


def step_summary(wall_ms: Sequence[float], cpu_ms: Sequence[float]) -> dict[str, Any]:
    """Median and min of per-step wall and process CPU times (ms), and how many there are."""
    return {
        "timer": "wall_clock+process_cpu",
        "repeats": len(wall_ms),
        "median_ms": statistics.median(wall_ms),
        "min_ms": min(wall_ms),
        "q20_ms": quantile(wall_ms, 0.2),
        "q80_ms": quantile(wall_ms, 0.8),
        "cpu_median_ms": statistics.median(cpu_ms),
        "cpu_min_ms": min(cpu_ms),
        "wall_ms": [round(x, 3) for x in wall_ms],
        "cpu_ms": [round(x, 3) for x in cpu_ms],
    }


def paired_speedup(ref_ms: Sequence[float], row_ms: Sequence[float]) -> dict[str, Any] | None:
    """The per-round speedups q_r = ref_r / row_r of a row and the reference row timed in the
    same interleaved rounds (index r = round r; > 1: the row is faster), which cancel the
    machine's drift between rounds: their median, and the geometric mean with its 95 %
    t-interval exp(m ± t_{0.975, n−1} · s / √n) over the log ratios (m, s their mean and sample
    std). None with fewer than 2 rounds or unequal counts."""
    from snpo.world.paired import t_interval

    n = len(row_ms)
    if n < 2 or len(ref_ms) != n or min(*ref_ms, *row_ms) <= 0:
        return None
    q = [a / b for a, b in zip(ref_ms, row_ms)]
    ci = t_interval([math.log(x) for x in q])
    return {
        "rounds": n,
        "median": statistics.median(q),
        "geomean": math.exp(ci.mean),
        "lo": math.exp(ci.lo),
        "hi": math.exp(ci.hi),
    }


def _trainer_check(
    target: str,
    row: dict[str, Any],
    value: float,
    threshold: float,
    paired: dict[str, Any] | None = None,
):
    ok = value >= threshold
    by = value / threshold - 1.0
    unit = " pairs/GPU-h" if target == "sd15_pairs_per_hour" else "×"
    fmt = (lambda v: f"{v:,.0f}") if target == "sd15_pairs_per_hour" else (lambda v: f"{v:.2f}")
    text = f"{fmt(value)}{unit} vs ≥ {fmt(threshold)}{unit}: " + (
        f"pass by {by:.0%}" if ok else f"miss: {-by:.0%} short"
    )
    if paired is not None:
        text += (
            f" (paired over {paired['rounds']} rounds: geometric mean "
            f"{paired['geomean']:.2f}× [{paired['lo']:.2f}, {paired['hi']:.2f}])"
        )
    return {
        "target": target,
        "provider": row.get("variant"),
        "case": row["case"],
        "judged_on": row.get("judged_on"),
        "value": value,
        "threshold": threshold,
        "pass": bool(ok),
        "by": by,
        "text": text,
    }


def evaluate_trainer_targets(
    rows: Sequence[dict[str, Any]], target_models: Sequence[str]
) -> list[dict[str, Any]]:
    """Pass/miss of the trainer targets for the measured rows of ``target_models``.

    Rows need: model, pairs, variant, status, judged_on ("cpu": process CPU time, on CPU rows;
    "wall": wall clock, on GPU rows), speedup_vs_reference / cpu_speedup_vs_reference (the
    judged medians' ratio; the per-round ``paired_*`` interval, where present, goes into the
    text), pairs_per_hour, device_type, dtype."""
    checks: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("model") not in target_models or row.get("status") != "ok":
            continue
        key = (
            "cpu_speedup_vs_reference" if row.get("judged_on") == "cpu" else "speedup_vs_reference"
        )
        x = row.get(key)
        paired = row.get(f"paired_{key}")
        if row.get("variant") == "live-fused-batched" and x is not None:
            checks.append(_trainer_check("trainer_live", row, x, TARGET_TRAINER_LIVE, paired))
        if row.get("variant") == "cached-fused-batched" and x is not None:
            checks.append(_trainer_check("trainer_cached", row, x, TARGET_TRAINER_CACHED, paired))
        if (
            row.get("variant") == "cached-fused-batched"
            and row.get("model") == "sd15"
            and row.get("device_type") == "cuda"
            and row.get("dtype") == "bfloat16"
            and row.get("pairs_per_hour") is not None
        ):
            if row["pairs_per_hour"] > best.get("sd15", {}).get("pairs_per_hour", -1.0):
                best["sd15"] = row
    if "sd15" in best:
        r = best["sd15"]
        checks.append(
            _trainer_check(
                "sd15_pairs_per_hour", r, r["pairs_per_hour"], TARGET_SD15_PAIRS_PER_HOUR
            )
        )
    return checks


def summarize_trainer_targets(checks: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, desc in TRAINER_TARGET_NAMES.items():
        mine = [c for c in checks if c["target"] == name]
        if not mine:
            continue
        worst = min(mine, key=lambda c: c["by"])
        out[name] = {
            "description": desc,
            "checks": len(mine),
            "passed": sum(c["pass"] for c in mine),
            "all_pass": all(c["pass"] for c in mine),
            "worst": {k: worst[k] for k in ("provider", "case", "value", "threshold", "text")},
        }
    return out


# ---------------------------------------------------------------------------------------------
# Naming and places
# ---------------------------------------------------------------------------------------------
def slugify(text: str, max_len: int = 48) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "unknown"


def results_dir(
    *, on_gpu: bool, env: dict[str, str] | None = None, repo_root: Path
) -> tuple[Path, str]:
    """Where a run writes its JSON and markdown, and why there.

    SNPO_BENCH_OUT=dir wins; else GPU runs (and CPU runs with SNPO_BENCH_SAVE=1) write to
    benchmarks/results/; other CPU runs to .benchmarks/snpo/ (git-ignored) so CI stays clean.
    """
    env = dict(os.environ) if env is None else env
    if env.get("SNPO_BENCH_OUT"):
        return Path(env["SNPO_BENCH_OUT"]).expanduser().resolve(), "SNPO_BENCH_OUT"
    if on_gpu:
        return repo_root / "benchmarks" / "results", "GPU run"
    if env.get("SNPO_BENCH_SAVE", "") not in ("", "0"):
        return repo_root / "benchmarks" / "results", "SNPO_BENCH_SAVE"
    return repo_root / ".benchmarks" / "snpo", "CPU run (set SNPO_BENCH_SAVE=1 to keep it)"
