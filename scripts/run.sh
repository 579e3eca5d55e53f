#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh) and runs the embedded default demo.
# Extra arguments go to the demo (see `python -m snpo demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m snpo demo "$@"
