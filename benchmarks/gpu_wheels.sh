#!/usr/bin/env bash
# Download the cp312 wheels the GPU check needs and the GPU image lacks, into .gpu-wheels/ (ignored by git),
# which the device tool carries next to the working tree (64 MiB cap on carried files).
#
#   bash benchmarks/gpu_wheels.sh            # then: run the device command with carry [".gpu-wheels"]
#
# The GPU image has Python 3.12, torch 2.11 (CUDA 13), transformers, accelerate, peft, triton, tensorboard and
# pandas, and no network. Wheels are fetched with --no-deps, one group at a time, in priority order; a group that
# would take the folder over the cap is dropped whole and listed in .gpu-wheels/MANIFEST.json ("skipped"), which
# benchmarks/gpu_check.py copies into its receipt. Measured (Dec 2026): liger-kernel 0.9 MiB, trl + rich 2.5 MiB,
# datasets 1.5 MiB + pyarrow 52.5 MiB, gguf 0.1 MiB, papermill + ipykernel stack 14 MiB, plotly 9 MiB: with pyarrow
# the last two do not fit (notebook 04 is then skipped on the GPU); GPU_WHEELS_SKIP=pyarrow makes room for them. On the GPU, gpu_check installs only the wheels whose
# distribution is not installed there (pip --no-index --no-deps), so the image's own packages are never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS_DIR:-.gpu-wheels}
CAP_MIB=${GPU_WHEELS_CAP_MIB:-60}   # under the 64 MiB carry cap, leaving room for the tree's own untracked files
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/MANIFEST.json

# group name | wheels (pure deps the image is unlikely to have included); priority order
WHEEL_GROUPS=(
  "liger-kernel|liger-kernel"
  "trl|trl rich markdown-it-py mdurl pygments"
  "datasets|datasets dill multiprocess xxhash fsspec pyarrow"
  "gguf|gguf"
  "papermill|papermill nbclient nbformat jupyter-client jupyter-core traitlets fastjsonschema jsonschema jsonschema-specifications referencing rpds-py attrs entrypoints tenacity click ipykernel ipython ipython-pygments-lexers comm debugpy matplotlib-inline nest-asyncio pyzmq tornado platformdirs jedi parso prompt-toolkit wcwidth pexpect ptyprocess decorator stack-data executing asttokens pure-eval"
  "plotly|plotly narwhals"
)

included=() skipped=()
for entry in "${WHEEL_GROUPS[@]}"; do
  name=${entry%%|*}; pkgs=${entry#*|}
  # GPU_WHEELS_SKIP="pyarrow ...": leave out what the image is known to have (pyarrow alone is 55 MiB)
  for s in ${GPU_WHEELS_SKIP:-}; do pkgs=$(echo " $pkgs " | sed "s/ $s / /g"); done
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any -d "$tmp" $pkgs; then
    echo "gpu_wheels: $name: download failed" >&2; skipped+=("$name: download failed"); rm -rf "$tmp"; continue
  fi
  add=$(du -sk "$tmp" | cut -f1); have=$(du -sk "$DEST" | cut -f1)
  if (( (have + add) / 1024 > CAP_MIB )); then
    echo "gpu_wheels: $name: $((add / 1024)) MiB would exceed ${CAP_MIB} MiB: skipped" >&2
    skipped+=("$name: $((add / 1024)) MiB, over the ${CAP_MIB} MiB carry budget"); rm -rf "$tmp"; continue
  fi
  mv "$tmp"/*.whl "$DEST"/; rm -rf "$tmp"; included+=("$name")
done

"$PY" - "$DEST" "${#included[@]}" "${included[@]}" "${skipped[@]}" <<'PY'
import json, sys
from pathlib import Path
dest, n = Path(sys.argv[1]), int(sys.argv[2])
included, skipped = sys.argv[3:3 + n], sys.argv[3 + n:]
wheels = sorted(p.name for p in dest.glob("*.whl"))
size = sum(p.stat().st_size for p in dest.glob("*.whl"))
manifest = {"python": "cp312", "platform": "manylinux2014_x86_64", "groups_included": included, "skipped": skipped,
            "wheels": wheels, "total_bytes": size}
(dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"gpu_wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}; included {included}; skipped {skipped}")
PY
