"""Command line of the benchmarks.

    python -m shiq_lab.tasks.synthetic synthetic [--quick] [--out DIR] [--config FILE] [--any_SuiteConfig_field ...]
    python -m shiq_lab.tasks.synthetic synthetic-data [--out data/synthetic] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from shiq_lab.infra.config import parse_config, report_errors
from shiq_lab.tasks.synthetic.suite import SuiteConfig, run_suite, with_overrides, write_results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.tasks.synthetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="ShiQ vs ablations vs DPO/DRO/CoPG on token trees with exact optima")
    syn.add_argument("--quick", action="store_true", help="small trees, one seed, short budget (< 1 min on one core)")
    syn.add_argument("--out", default="benchmarks/results", help="folder for synthetic.json and synthetic.md (default: %(default)s)")
    syn.add_argument("--budget", type=int, help="optimiser steps per run, the same for every method (default: 200, or 60 with --quick)")
    syn.add_argument("--name", default=None, help="file stem of the results (default: synthetic, or synthetic_quick with --quick)")
    data = sub.add_parser("synthetic-data", help="write the synthetic tasks' trees and behaviour datasets")
    data.add_argument("--out", default="data/synthetic", help="target folder (default: %(default)s)")
    data.add_argument("--quick", action="store_true", help="the quick suite's small trees instead of the full ones")
    data.add_argument("--seeds", type=int, nargs="+", help="seeds (default: those of the suite)")
    return parser


@report_errors
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthetic"] and not {"-h", "--help"} & set(argv):
        # the suite's fields come from the one config system: --config FILE and a flag per SuiteConfig field
        args, rest = _parser().parse_known_args(argv)
    else:
        args, rest = _parser().parse_args(argv), []
    preset = SuiteConfig.quick() if args.quick else SuiteConfig()
    if args.command == "synthetic-data":
        from shiq_lab.tasks.synthetic.problems import write_datasets

        seeds = list(args.seeds if args.seeds else preset.seeds)
        path = write_datasets(args.out, scale=preset.scale, seeds=seeds, size=preset.largest_size)
        print(f"wrote {path.parent} ({preset.scale} trees, seeds {seeds}, {preset.largest_size} paths per behaviour)")
        return 0
    try:
        (cfg,) = parse_config((SuiteConfig,), rest, defaults=asdict(preset), prog="python -m shiq_lab.tasks.synthetic synthetic")
        cfg = with_overrides(cfg, budget=args.budget)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run_suite(cfg)
    name = args.name or ("synthetic_quick" if args.quick else "synthetic")
    json_path, md_path = write_results(results, args.out, name=name)
    print(f"wrote {json_path} and {md_path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
