#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call, most telling first:
#   1. smoke      scripts/gpu_smoke.py: builds the CUDA extension (JIT, visible GPU's arch
#                 only), then one forward/backward per backend (torch, triton, cuda) in bf16
#                 and fp32 at β = 5000 against the float64 reference: "are the kernels right"
#                 even when the device is lent for a few minutes only
#   2. env        nvidia-smi, versions
#   3. tests      pytest tests -m gpu, without the compute-sanitizer runs
#   4. sanitizer  the compute-sanitizer runs (memcheck, racecheck), own stage and budget
#   5. bench      pytest benchmarks, and its plot
# Results and logs go to $OUT:
#
#   suite.log              each stage's exit status and time, the smoke lines, environment
#   smoke.log              scripts/gpu_smoke.py
#   tests-gpu.log          pytest tests -m gpu (sanitizer deselected)
#   sanitizer.log          the compute-sanitizer tests
#   bench.log              pytest benchmarks (pytest-benchmark tables included)
#   <device>-<date>.json   every row, versions, copy bandwidth, targets   (benchmarks/report.py)
#   <device>-<date>.md     the same as tables
#   <device>-<date>.png    time and fraction of copy bandwidth against size (benchmarks/plot.py)
#   pytest-benchmark.json  pytest-benchmark's own record (extra_info holds our numbers)
#
# From the device tool:  run(command="bash scripts/gpu_suite.sh", timeout_s=600)
# Elsewhere:             OUT=some/dir bash scripts/gpu_suite.sh   (default OUT: ./gpu-out)
#
# Installs nothing. The GPU image has torch, triton, pytest, pytest-benchmark and matplotlib;
# a missing or different package must be carried as wheels in .whl/ (see the device tool's
# README: `pip download --no-deps ... -d .whl NAME==VERSION`, name ".whl" in carry), and they
# are then installed into /tmp/site with --no-index --no-deps and put first on PYTHONPATH.
# The project itself is used from the checkout (PYTHONPATH), not installed.
#
# Every stage is bounded by `timeout` inside an overall budget (the device allows 600 s per
# command); a stage that fails does not stop the next one. Knobs:
#   SNPO_SUITE_BUDGET_S  overall seconds (default 560)
#   SNPO_SMOKE_S         cap of the smoke stage (default 120: the checks take seconds; the rest
#                        is a cold JIT build of the extension, cached in TORCH_EXTENSIONS_DIR)
#   SNPO_GPU_TESTS=0     skip `pytest tests -m gpu`         SNPO_TESTS_S   its cap (default 150)
#   SNPO_SANITIZER=0     skip the compute-sanitizer stage   SNPO_SANITIZER_S its cap (default 120)
#   SNPO_BENCH_GRID      full (default on a GPU) | quick    SNPO_BENCH_PROVIDERS  e.g. eager,cuda
#   SNPO_BENCH_TRAINER=none  skip the trainer-step rows   SNPO_BENCH_TRAINER_BUDGET_S (default 150)
#   PYTHON               interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${SNPO_SUITE_BUDGET_S:-560}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/suite.log"
: >"$LOG"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SNPO_BENCH_OUT="$OUT"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/snpo_torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET  # never time the interpreter

say() { echo "[gpu_suite +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_stage NAME CAP LOGFILE CMD...: run CMD under `timeout -s INT` (pytest then still writes its
# results) for at most min(CAP, what is left of the budget minus RESERVE seconds).
RESERVE=30
run_stage() {
  local name=$1 cap=$2 logfile=$3
  shift 3
  local t
  t=$(left)
  t=$((t - RESERVE))
  if [ "$t" -gt "$cap" ]; then t=$cap; fi
  if [ "$t" -lt 10 ]; then
    say "$name: SKIPPED (budget spent)"
    return 0
  fi
  say "$name: start (limit ${t}s): $*"
  local s0=$(date +%s)
  timeout -s INT -k 20 "$t" "$@" >>"$logfile" 2>&1
  local rc=$?
  say "$name: exit $rc after $(($(date +%s) - s0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  return $rc
}

# ---- wheels, if carried ------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels into /tmp/site: $(ls .whl | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    say "wheel install FAILED (see above); going on with the image's packages"
  fi
fi

# ---- smoke: build + one forward/backward per backend and dtype (first: answers soonest) ---
# Backends in the order torch, triton, cuda, one flushed line each, so that a smoke stage cut
# short by its cap still reports the ones before.
run_stage smoke "${SNPO_SMOKE_S:-120}" "$OUT/smoke.log" "$PY" scripts/gpu_smoke.py
rc=$?
grep -E "^(smoke|SMOKE)" "$OUT/smoke.log" | tee -a "$LOG"
[ $rc -eq 1 ] && say "smoke: A KERNEL DISAGREES WITH THE REFERENCE (see above)"

# ---- environment ---------------------------------------------------------------------------
{
  echo "== nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  echo "== python and packages"
  "$PY" - <<'PYEOF' 2>&1
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "pytest", "pytest-benchmark", "pytest-timeout", "matplotlib", "numpy",
             "diffusers"):
    try:
        print(f"{name:18s}", md.version(name))
    except md.PackageNotFoundError:
        print(f"{name:18s}", "MISSING")
import torch
print("cuda available", torch.cuda.is_available(), "| torch.version.cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB", "L2", getattr(p, "L2_cache_size", "?"))
PYEOF
  echo "== nvcc"
  nvcc --version 2>&1 | tail -2 || echo "no nvcc"
} >>"$LOG" 2>&1
say "environment written to $LOG"

# ---- GPU tests (compiled Triton: `-m gpu` alone selects it, see tests/conftest.py) ---------
if [ "${SNPO_GPU_TESTS:-1}" != "0" ]; then
  run_stage tests "${SNPO_TESTS_S:-150}" "$OUT/tests-gpu.log" \
    "$PY" -m pytest tests -m gpu -k "not compute_sanitizer" -q -p no:cacheprovider
  rc=$?
  [ $rc -eq 5 ] && say "tests: no test is marked gpu"
  tail -n 15 "$OUT/tests-gpu.log"
else
  say "tests: skipped (SNPO_GPU_TESTS=0)"
fi

# ---- compute-sanitizer (memcheck, racecheck: slow, so after the tests, with their own cap) --
if [ "${SNPO_SANITIZER:-1}" != "0" ]; then
  run_stage sanitizer "${SNPO_SANITIZER_S:-120}" "$OUT/sanitizer.log" \
    "$PY" -m pytest tests/kernels/test_cuda.py -m gpu -k compute_sanitizer -q -p no:cacheprovider
  tail -n 8 "$OUT/sanitizer.log"
else
  say "sanitizer: skipped (SNPO_SANITIZER=0)"
fi

# ---- benchmarks ----------------------------------------------------------------------------
# pytest's own budget ends 40 s before the hard limit: the remaining cases are recorded as
# skipped and the results written; the hard limit (SIGINT) is the fallback. The trainer-step
# rows (test_trainer_bench.py, after the kernel rows; they need diffusers: carry its wheel)
# get SNPO_BENCH_TRAINER_BUDGET_S of it (default 150 s, +30 s for building the UNets).
t=$(($(left) - RESERVE))
TRAINER_S=${SNPO_BENCH_TRAINER_BUDGET_S:-150}
[ "${SNPO_BENCH_TRAINER:-auto}" = "none" ] && TRAINER_S=0
export SNPO_BENCH_TRAINER_BUDGET_S=$TRAINER_S
[ "$TRAINER_S" -gt 0 ] && TRAINER_S=$((TRAINER_S + 30))
kb=$((t - 40 - TRAINER_S))
export SNPO_BENCH_BUDGET_S=$((kb > 40 ? kb : 40))
run_stage bench 9999 "$OUT/bench.log" \
  "$PY" -m pytest benchmarks -q -p no:cacheprovider \
  --benchmark-json="$OUT/pytest-benchmark.json" --benchmark-columns=median,iqr,rounds
sed -n '/snpo benchmark results/,/^plot:/p' "$OUT/bench.log" | tee -a "$LOG"

# ---- plot and summary ----------------------------------------------------------------------
results=$(ls -t "$OUT"/*-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9].json 2>/dev/null | head -n 1)
if [ -n "$results" ]; then
  run_stage plot 60 "$LOG" "$PY" benchmarks/plot.py "$results"
  echo
  "$PY" -m benchmarks.report "$results" || true
else
  say "no results JSON was written (see $OUT/bench.log)"
  tail -n 30 "$OUT/bench.log"
fi
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
