#!/usr/bin/env bash
# The whole GPU measurement of issue 14 (< 8 minutes on one H200): one receipt in benchmarks/results/gpu_check.{json,md}.
#
#   make gpu-wheels                                        # here: the carry, split in parts: .gpu-carry/1 .. N
#   bash benchmarks/gpu_check.sh --unpack-only             # device calls 1 .. N-1 (carry [".gpu-carry/k"]): install
#   bash benchmarks/gpu_check.sh                           # device call N (carry [".gpu-carry/N"]): install + check
#   bash benchmarks/gpu_check.sh --dry-run                 # any CPU: toy sizes, writes runs/bench-quick/ (make test runs it)
#
# The carried wheels are installed into .gpu-site/ (ignored; kept by a warm device machine between calls), which is
# put on PYTHONPATH here. Extra arguments go to `python -m benchmarks.gpu_check` (--stages, --stage-budget STAGE=S,
# --budget-s, --out-dir).
set -uo pipefail
cd "$(dirname "$0")/.."
# (the offline variables are set by the script itself: benchmarks.common.offline_env)
export PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "${1:-}" = "--unpack-only" ]; then
  exec timeout --kill-after=10 300 "$PY" -m benchmarks.gpu_carry unpack
fi
# the script keeps to its own 480 s budget; this outer limit only catches a hang outside any stage
if [ -z "${OUT:-}" ]; then exec timeout --kill-after=10 500 "$PY" -m benchmarks.gpu_check "$@"; fi
# on the device machine ($OUT is what comes back): the log, and the receipt even after a timeout
timeout --kill-after=10 500 "$PY" -m benchmarks.gpu_check "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
cp benchmarks/results/gpu_check.json benchmarks/results/gpu_check.md "$OUT/" 2>/dev/null
exit "$rc"
