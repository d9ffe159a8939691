"""The main job (``make demo``): run every notebook in its tiny CPU mode and print what each one asserts.

    python -m shiq_lab.infra.demo [--only 01 03]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from shiq_lab.infra.notebook_runner import list_notebooks, run_notebook
from shiq_lab.infra.notebooks import read_summaries, runs_dir


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) < 90 else text[:87] + "..."
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.infra.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="notebook number prefixes to run (default: all)")
    args = parser.parse_args(argv)
    notebooks = list_notebooks()
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
    if not notebooks:
        print("demo: no notebooks to run", file=sys.stderr)
        return 1
    start = time.perf_counter()
    failures = []
    for nb in notebooks:
        print(f"== {nb.name}: running ...", flush=True)
        (runs_dir() / "summaries" / f"{nb.stem}.json").unlink(missing_ok=True)  # never report a stale run
        try:
            run = run_notebook(nb, progress=True)
        except Exception as err:  # noqa: BLE001 -- any failure of one notebook is reported, the others still run
            failures.append(nb.name)
            print(f"   FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
            continue
        print(f"   done in {run.seconds:.0f} s -> {run.output}")
    summaries = read_summaries()
    print("\n== Key numbers asserted by each notebook")
    for nb in notebooks:
        values = summaries.get(nb.stem)
        print(f"\n{nb.stem}")
        if values is None:
            print("   (no summary recorded)")
            continue
        for key, value in values.items():
            print(f"   {key:40s} {_format(value)}")
    print(f"\nexecuted notebooks and summaries: {runs_dir()}  ({time.perf_counter() - start:.0f} s in all)")
    if failures:
        print(f"demo: {len(failures)} notebook(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
