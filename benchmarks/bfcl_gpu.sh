#!/usr/bin/env bash
# BFCL-V3 sweep at GPU scale (configs/sweep/bfcl_gpu.yaml): fetches the assets it needs, then runs the sweep
# under a hard 8-minute limit and writes benchmarks/results/bfcl_gpu.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
PY=${PY:-.venv/bin/python}
$PY -m shiq_lab.infra.assets fetch bfcl smollm2
timeout 480 $PY -m shiq_lab.tasks.bfcl.sweep --config configs/sweep/bfcl_gpu.yaml "$@"
