"""Benchmark-suite plumbing: device detection, the case × mode × provider parametrization, the
session's measurements shared by every test (copy bandwidth, sleep calibration), results
collection, and the writer that runs when the session finishes.

Environment:
  SNPO_BENCH_DEVICE     cpu | cuda | cuda:N   (default: cuda when available)
  SNPO_BENCH_GRID       auto | full | quick | cpu   (see cases.py)
  SNPO_BENCH_PROVIDERS  comma list of eager,compile,triton,cuda   (default: all available)
  SNPO_BENCH_OUT        directory for the JSON/markdown (default: benchmarks/results on a GPU,
                        .benchmarks/snpo on a CPU)
  SNPO_BENCH_SAVE=1     CPU runs write to benchmarks/results too
  SNPO_BENCH_BUDGET_S   seconds after which remaining cases are skipped (recorded), so that a
                        time-limited run still writes its results (default 480 GPU, 60 CPU)
  SNPO_BENCH_TRAINER    auto | full | sd3 | none   the trainer-step rows (test_trainer_bench.py);
                        full on a CPU: the sd15-small measurement instead of the tiny rows;
                        sd3: the sd35m-small (SD3.5-M-structured) measurement
  SNPO_BENCH_TRAINER_ROWS  all | targets   every trainer row, or only the judged ones
                        (reference, live · fused · batched, cached · fused · batched)
  SNPO_BENCH_TRAINER_BUDGET_S  the same budget for the trainer-step rows, counted from their
                        first row (default 300 GPU, 30 CPU, 1500 CPU full)
  SNPO_BENCH_ROUNDS     interleaved rounds of the trainer-step rows (default 4–12 GPU, 4–8
                        CPU, 6 CPU full)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import datetime as _dt  # noqa: E402
import importlib.metadata as _md  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from . import cases as C  # noqa: E402
from . import harness as H  # noqa: E402
from . import providers as PR  # noqa: E402
from . import report as R  # noqa: E402
from . import trainer_cases as TC  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Per-device timing plans: warm-up, repeats of the event-timed loop, pytest-benchmark rounds.
PLANS: dict[str, dict[str, float]] = {
    "cuda": {
        "warmup_calls": 5,
        "warmup_ms": 25.0,
        "repeats_min": 50,
        "repeats_max": 300,
        "repeats_target_ms": 100.0,
        "rounds_min": 10,
        "rounds_max": 50,
        "rounds_target_ms": 50.0,
        "copy_bytes": 1 * H.GiB,
        "copy_repeats": 30,
        "budget_s": 480.0,
        # trainer-step rows: interleaved rounds of whole steps (see test_trainer_bench.py)
        "step_warmup_calls": 2,
        "step_rounds_min": 4,
        "step_rounds_max": 12,
        "step_rounds_target_ms": 20000.0,
        "trainer_budget_s": 300.0,
    },
    "cpu": {
        "warmup_calls": 2,
        "warmup_ms": 2.0,
        "repeats_min": 5,
        "repeats_max": 30,
        "repeats_target_ms": 30.0,
        "rounds_min": 3,
        "rounds_max": 10,
        "rounds_target_ms": 15.0,
        "copy_bytes": 32 * H.MiB,
        "copy_repeats": 5,
        "budget_s": 60.0,
        "step_warmup_calls": 1,
        "step_rounds_min": 4,
        "step_rounds_max": 8,
        "step_rounds_target_ms": 3000.0,
        "trainer_budget_s": 30.0,
    },
}


def detect_device() -> torch.device:
    name = os.environ.get("SNPO_BENCH_DEVICE", "")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def trainer_plan(plan: dict[str, float], env: dict[str, str] | None = None) -> dict[str, float]:
    """The plan with the trainer-step overrides: SNPO_BENCH_TRAINER=full or sd3 on a CPU (the
    opt-in sd15-small / sd35m-small measurements) gets 6 rounds and a 1500 s budget; SNPO_BENCH_ROUNDS=N fixes the
    number of rounds; SNPO_BENCH_TRAINER_BUDGET_S the budget."""
    env = dict(os.environ) if env is None else env
    out = dict(plan)
    if env.get("SNPO_BENCH_TRAINER") in ("full", "sd3") and plan is PLANS["cpu"]:
        out.update(step_rounds_min=6, step_rounds_max=6, trainer_budget_s=1500.0)
    if env.get("SNPO_BENCH_ROUNDS"):
        n = int(env["SNPO_BENCH_ROUNDS"])
        if n < 1:
            raise ValueError(f"SNPO_BENCH_ROUNDS={n}: at least 1")
        out.update(step_rounds_min=n, step_rounds_max=n, step_rounds_target_ms=0.0)
    if env.get("SNPO_BENCH_TRAINER_BUDGET_S"):
        out["trainer_budget_s"] = float(env["SNPO_BENCH_TRAINER_BUDGET_S"])
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_ident() -> str | None:
    """'family 25 model 1' from /proc/cpuinfo (the model name alone can be just 'AMD EPYC')."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        return None
    if not fields:
        return None
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        return {
            "type": "cuda",
            "name": props.name,
            "slug": H.slugify(props.name),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "total_memory_bytes": int(props.total_memory),
            "l2_bytes": l2,
            "detail": f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / H.GiB:.0f} GiB, L2 {l2 / H.MiB:.0f} MiB",
        }
    model = _cpu_model()
    ident = _cpu_ident()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    extra = "".join(f", {x}" for x in (ident, capability and f"torch {capability}") if x)
    return {
        "type": "cpu",
        "name": f"CPU {model}",
        "slug": "cpu-" + H.slugify(model, 40),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_ident": ident,
        "cpu_capability": capability,
        "l2_bytes": 0,
        "detail": f"{os.cpu_count()} logical cores, {torch.get_num_threads()} torch thread(s)"
        + extra,
    }


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def collect_versions() -> dict[str, Any]:
    import snpo_kernels

    triton = _version("triton")
    if triton is None:
        try:  # a triton without dist metadata (vendored builds)
            import triton as _triton

            triton = getattr(_triton, "__version__", None)
        except Exception:
            triton = None
    git = None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            )
            git = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "snpo": getattr(snpo_kernels, "__version__", None),
        "git": git,
        "python": platform.python_version(),
        "pytest_benchmark": _version("pytest-benchmark"),
        "platform": platform.platform(),
    }


class BenchSession:
    """Everything the benchmark tests share; one per pytest session."""

    def __init__(self) -> None:
        self.started = time.monotonic()  # before the backends load (a JIT build counts)
        self.device = detect_device()
        self.on_gpu = self.device.type == "cuda"
        if not self.on_gpu:
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        self.plan = trainer_plan(PLANS["cuda" if self.on_gpu else "cpu"])
        self.grid = C.grid_name(self.on_gpu)
        self.cases = C.select_grid(self.grid)
        wanted = PR.wanted_providers()
        self.availability: dict[tuple[str, str], str | None] = {}
        for dtype in sorted({c.dtype for c in self.cases}):
            for p in PR.PROVIDERS:
                why = PR.provider_availability(p, self.device, C.DTYPES[dtype], wanted)
                self.availability[(p, dtype)] = why
        self.items = [
            (case, mode, p)
            for case in self.cases
            for mode in C.MODES
            for p in PR.PROVIDERS
            if self.availability[(p, case.dtype)] is None
        ]
        self.budget_s = float(os.environ.get("SNPO_BENCH_BUDGET_S", self.plan["budget_s"]))
        self.trainer_groups = TC.trainer_groups(self.on_gpu)
        self.trainer_budget_s = float(self.plan["trainer_budget_s"])
        self.trainer_started: float | None = None
        self.extra_meta: dict[str, Any] = {}  # sections other suites add to the results
        self.rows: list[dict[str, Any]] = []
        self.written: tuple[Path, Path] | None = None
        self._info: dict[str, Any] | None = None
        self._copy: dict[str, Any] | None = None
        self._cycles: float | None = None
        self.out_dir, self.out_why = H.results_dir(on_gpu=self.on_gpu, repo_root=REPO_ROOT)

    # -- lazily measured, once per session ---------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = describe_device(self.device)
        return self._info

    @property
    def cache_bytes(self) -> int:
        return int(self.info.get("l2_bytes") or 0)

    @property
    def cycles_per_ms(self) -> float | None:
        if self.on_gpu and self._cycles is None:
            self._cycles = H.sleep_cycles_per_ms(self.device)
        return self._cycles

    @property
    def copy(self) -> dict[str, Any]:
        if self._copy is None:
            nbytes = int(self.plan["copy_bytes"])
            if self.on_gpu:
                free, _ = torch.cuda.mem_get_info(self.device)
                nbytes = max(64 * H.MiB, min(nbytes, free // 8))
            self._copy = H.measure_copy_bandwidth(
                self.device,
                nbytes,
                repeats=int(self.plan["copy_repeats"]),
                cycles_per_ms=self.cycles_per_ms,
            )
        return self._copy

    def cpu_note(self) -> str:
        full = any(
            m in TC.TARGET_MODELS for m, _ in self.trainer_groups if not TC.MODELS[m].gpu_only
        )
        if not full:
            return R.CPU_NOTE
        models = sorted(
            {
                m
                for m, _ in self.trainer_groups
                if m in TC.TARGET_MODELS and not TC.MODELS[m].gpu_only
            }
        )
        return R.CPU_FULL_NOTE.format(models=", ".join(models))

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    # -- results ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        now = _dt.datetime.now(_dt.timezone.utc)
        providers = {}
        for p in PR.PROVIDERS:
            whys = {d: self.availability[(p, d)] for (q, d) in self.availability if q == p}
            if all(w is None for w in whys.values()):
                providers[p] = None
            elif len(set(whys.values())) == 1:
                providers[p] = next(iter(whys.values()))
            else:
                providers[p] = "; ".join(f"{d}: {w or 'ran'}" for d, w in whys.items())
        lo, hi = int(self.plan["repeats_min"]), int(self.plan["repeats_max"])
        if self.on_gpu:
            timing = (
                "CUDA events around each call after a warm-up (compile and autotuning kept "
                f"out); median of {lo}–{hi} calls rotating among input sets that together "
                "cover ≥ 2× the L2 cache (up to 64 sets); a spin kernel before each call "
                "keeps the GPU busy while the host issues it, so the events see device time"
            )
        else:
            timing = (
                f"wall clock (perf_counter) after a warm-up; median of {lo}–{hi} calls "
                "alternating between 2 input sets"
            )
        return {
            "date": now.date().isoformat(),
            "timestamp": now.isoformat(timespec="seconds"),
            "claim": self.on_gpu,
            "note": None if self.on_gpu else self.cpu_note(),
            "device": self.info,
            "versions": collect_versions(),
            "grid": self.grid,
            "n_cases": len(self.cases),
            "shape_labels": {
                s: C.SHAPES[s][1] for s in C.SHAPE_ORDER if any(c.shape == s for c in self.cases)
            },
            "providers": providers,
            "copy": self._copy,
            "timing_note": timing,
            "loss_settings": (
                f"beta={C.BETA:g}, lam={C.LAM:g}, swap ~ Bernoulli({C.SWAP_PROB:g}), weight=None, "
                "reduction='mean'; fwd+bwd = loss + torch.autograd.grad(loss, pred)"
            ),
            "plan": self.plan,
            "output": {"dir": str(self.out_dir), "why": self.out_why},
            "elapsed_s": round(self.elapsed_s(), 1),
            "budget_s": self.budget_s,
            **self.extra_meta,
        }

    def write(self) -> tuple[Path, Path]:
        results = R.build_results(self.meta(), self.rows, C.SHAPE_ORDER)
        self.written = R.write_results(results, self.out_dir)
        self.results = results
        return self.written


_KEY = pytest.StashKey[BenchSession]()


def get_session(config: pytest.Config) -> BenchSession:
    if _KEY not in config.stash:
        config.stash[_KEY] = BenchSession()
    return config.stash[_KEY]


def _item_id(item: tuple[C.Case, str, str]) -> str:
    case, mode, provider = item
    return f"{case.id}-{mode}-{provider}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_item" in metafunc.fixturenames:
        s = get_session(metafunc.config)
        metafunc.parametrize("bench_item", s.items, ids=[_item_id(i) for i in s.items])
    if "trainer_group" in metafunc.fixturenames:
        s = get_session(metafunc.config)
        ids = [f"{m}-P{p}" for m, p in s.trainer_groups]
        metafunc.parametrize("trainer_group", s.trainer_groups, ids=ids)


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> BenchSession:
    return get_session(request.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    s = session.config.stash.get(_KEY, None)
    if s is not None and s.rows:
        s.write()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    s = config.stash.get(_KEY, None)
    if s is None or s.written is None:
        return
    tr = terminalreporter
    tr.section("snpo benchmark results")
    if not s.on_gpu:
        tr.write_line(s.cpu_note())
    kernel = [r for r in s.rows if r.get("table") != "trainer"]
    trainer = [r for r in s.rows if r.get("table") == "trainer"]
    if kernel:
        ok = sum(r["status"] == "ok" for r in kernel)
        tr.write_line(
            f"{ok}/{len(kernel)} rows measured on {s.info['name']} in {s.elapsed_s():.0f} s "
            f"(grid {s.grid}); copy bandwidth {R.fmt_rate((s._copy or {}).get('bytes_per_s'))}"
        )
    if trainer:
        ok = sum(r["status"] == "ok" for r in trainer)
        tr.write_line(f"trainer step: {ok}/{len(trainer)} rows measured")
        for line in R.trainer_summary_lines(s.results):
            tr.write_line("  " + line)
    for p, why in s.results["providers"].items():
        tr.write_line(f"  {p}: {'ran' if why is None else 'not run — ' + why}")
    t = s.results["targets"]
    if t["evaluated"]:
        for name, summ in t["summary"].items():
            verdict = "PASS" if summ["all_pass"] else "MISS"
            w = summ["worst"]
            tr.write_line(
                f"  target {name}: {verdict} {summ['passed']}/{summ['checks']}; "
                f"worst {w['provider']} {w['case']}: {w['text']}"
            )
    else:
        tr.write_line(f"  targets not evaluated: {t['why_not']}")
    json_path, md_path = s.written
    tr.write_line(f"wrote {json_path}")
    tr.write_line(f"wrote {md_path}   ({s.out_why})")
    tr.write_line(f"plot: python benchmarks/plot.py {json_path}")
