#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh), checks lint and format, and runs the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # 2-core machines: oversubscription is ~100x slower
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest tests "$@"
# on a CUDA machine the GPU tests run on their own (compiled Triton; tests/conftest.py)
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  .venv/bin/python -m pytest tests -m gpu -q -p no:cacheprovider
fi
# the benchmark harness on the CPU subset (numbers here are not claims; GPU: scripts/gpu_suite.sh)
exec .venv/bin/python -m pytest benchmarks -q -p no:cacheprovider
