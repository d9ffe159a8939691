"""The IMDB sweep on SmolLM2-135M-Instruct, CPU scale: ShiQ (token and sequence rewards), DPO, DRO, CoPG.

One command (``make bench-imdb-smollm2``) samples the offline data from SmolLM2, trains every
(run type, beta), evaluates each run every ``eval_every`` steps on held-out prompts (reward and
KL on the same fresh samples), and writes ``benchmarks/results/imdb_smollm2_cpu.{json,md,html}``.
The README block is generated from the JSON (``python -m shiq_lab.infra.readme --write``).

    python -m benchmarks.bench_imdb_smollm2            # the committed run (configs/sweep/imdb_smollm2_cpu.yaml)
    python -m benchmarks.bench_imdb_smollm2 --quick    # minutes-long smoke run, written under runs/ only
    python -m benchmarks.bench_imdb_smollm2 --config configs/sweep/imdb_sweep_smollm2.yaml --name imdb_smollm2_gpu  # one GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS_DIR, machine_info
from shiq_lab.tasks.imdb.smollm2_report import results_record, write_results
from shiq_lab.tasks.imdb.sweep import run_imdb_task, split_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sweep" / "imdb_smollm2_cpu.yaml"

#: a smoke run: the same code path at a size that runs in a few minutes
QUICK = dict(n_train_prompts=8, max_steps=4, per_device_train_batch_size=8, eval_every=2, n_eval_prompts=8,
             betas=[0.5], output_dir="runs/bench_imdb_smollm2_quick")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_imdb_smollm2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="YAML of ImdbTaskConfig fields")
    parser.add_argument("--quick", action="store_true", help="smoke run; results go under runs/, never benchmarks/results/")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results, or runs/ with --quick)")
    parser.add_argument("--name", default="imdb_smollm2_cpu", help="results file name (the GPU run: imdb_smollm2_gpu)")
    args = parser.parse_args(argv)
    values = yaml.safe_load(Path(args.config).read_text()) or {}
    if args.quick:
        values.update(QUICK)
    values["progress"] = True
    config, training = split_config(values)
    result = run_imdb_task(config, training)
    command = "make bench-imdb-smollm2" if Path(args.config).resolve() == CONFIG and not args.quick else \
        f"python -m benchmarks.bench_imdb_smollm2 --config {args.config}" + (" --quick" if args.quick else "") \
        + (f" --name {args.name}" if args.name != "imdb_smollm2_cpu" else "")
    out = Path(args.out) if args.out else (Path(training.output_dir) / "results" if args.quick else RESULTS_DIR)
    machine = machine_info(torch.device(config.device))
    record = results_record(result, command=command, machine=machine, name=args.name)
    paths = write_results(record, out, frontier=result.frontier)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
