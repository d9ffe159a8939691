#!/usr/bin/env bash
# The whole GPU measurement of issue 14 (< 8 minutes on one H200): one receipt in benchmarks/results/gpu_check.{json,md}.
#
#   bash benchmarks/gpu_wheels.sh                          # here, once: cp312 wheels the GPU image lacks -> .gpu-wheels/
#   bash benchmarks/gpu_check.sh                           # on the GPU machine (carry .gpu-wheels)
#   bash benchmarks/gpu_check.sh --dry-run                 # any CPU: toy sizes, writes runs/bench-quick/ (make test runs it)
#
# Extra arguments go to `python -m benchmarks.gpu_check` (--stages, --stage-budget STAGE=S, --budget-s, --out-dir).
set -uo pipefail
cd "$(dirname "$0")/.."
# (the offline variables are set by the script itself: benchmarks.common.offline_env)
export PYTHONHASHSEED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# the script keeps to its own 480 s budget; this outer limit only catches a hang outside any stage
exec timeout --kill-after=10 500 "$PY" -m benchmarks.gpu_check "$@"
