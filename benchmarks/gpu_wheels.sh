#!/usr/bin/env bash
# What the GPU check needs and the GPU image lacks, in parts that each fit one device call (make gpu-wheels):
# the cp312 wheels (liger-kernel, trl, datasets, papermill + ipykernel, plotly, gguf and their requirement closure,
# without what the image has) and notebook 04's assets (SmolLM2-135M GGUF, the IMDB reviews gzipped), split into
# .gpu-carry/1 .. .gpu-carry/N (ignored by git). It prints the device calls: call k carries [".gpu-carry/k"];
# the last runs the check. See benchmarks/gpu_carry.py.
#
#   bash benchmarks/gpu_wheels.sh                      # GPU_CARRY_ARGS="--include pyarrow" carries the image's pyarrow too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# shellcheck disable=SC2086
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m benchmarks.gpu_carry build ${GPU_CARRY_ARGS:-}
