"""Generated blocks of the README: every number that comes from a run is rendered from a committed results file.

The README holds blocks between marker lines::

    <!-- BEGIN generated: NAME -->
    ...markdown written by the renderer of NAME...
    <!-- END generated: NAME -->

:data:`SECTIONS` maps NAME to ``"module:function"``; the function takes the repository root and returns
the block's markdown, reading only committed results files, so the output is byte-deterministic.

::

    python -m shiq_lab.infra.readme --write    # rewrite every block from the results files
    python -m shiq_lab.infra.readme --check    # exit 1 naming the stale blocks (tests/test_readme_generated.py)
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["SECTIONS", "ROOT", "render", "find_blocks", "update", "main"]

ROOT = Path(__file__).resolve().parents[2]

SECTIONS: dict[str, str] = {
    "synthetic-run": "shiq_lab.tasks.synthetic.report:readme_run",
    "synthetic-headline": "shiq_lab.tasks.synthetic.report:readme_headline",
    "synthetic-efficiency": "shiq_lab.tasks.synthetic.report:readme_efficiency",
    "synthetic-findings": "shiq_lab.tasks.synthetic.report:readme_findings",
    "imdb-pieces": "shiq_lab.tasks.imdb.report:readme_pieces",
    "imdb-tiny": "shiq_lab.tasks.imdb.report:readme_tiny",
    "imdb-mid": "shiq_lab.tasks.imdb.report:readme_mid",
    "imdb-smollm2": "shiq_lab.tasks.imdb.smollm2_report:readme_section",
    "bfcl": "shiq_lab.tasks.bfcl.report:readme_section",
    # performance: renderers next to the benchmarks that write the results (benchmarks/ is importable from the root)
    "performance-cpu-goals": "benchmarks.readme_sections:cpu_goals",
    "performance-cpu-loss-kernel": "benchmarks.readme_sections:cpu_loss_kernel",
    "performance-cpu-train-step": "benchmarks.readme_sections:cpu_train_step",
    "performance-cpu-precompute-scaling": "benchmarks.readme_sections:cpu_precompute_scaling",
    "performance-gpu": "benchmarks.readme_sections:gpu_receipt",
}

_BLOCK = re.compile(r"^<!-- BEGIN generated: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- END generated: (?P=name) -->$",
                    re.MULTILINE | re.DOTALL)
_MARKER = re.compile(r"^<!-- (BEGIN|END) generated: ([\w.-]+) -->$", re.MULTILINE)


def _renderer(name: str) -> Callable[[Path], str]:
    try:
        target = SECTIONS[name]
    except KeyError:
        raise KeyError(f"README block {name!r} has no renderer: add it to SECTIONS in {__name__} "
                       f"(known: {', '.join(SECTIONS)})") from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def render(name: str, root: Path = ROOT) -> str:
    """The markdown of block ``name``, ending with one newline."""
    return _renderer(name)(Path(root)).rstrip("\n") + "\n"


def find_blocks(text: str) -> dict[str, str]:
    """``{name: body}`` of the generated blocks of ``text``; a marker without its partner is an error."""
    blocks = {m["name"]: m["body"] for m in _BLOCK.finditer(text)}
    paired = {n for m in _BLOCK.finditer(text) for n in [m["name"]]}
    lonely = sorted({name for _, name in _MARKER.findall(text)} - paired)
    if lonely:
        raise ValueError(f"README: marker(s) without a matching BEGIN/END line: {lonely}; "
                         "each block is '<!-- BEGIN generated: NAME -->' ... '<!-- END generated: NAME -->'")
    return blocks


def update(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``(text with every block re-rendered, names of the blocks that changed)``."""
    find_blocks(text)  # validates the markers
    stale: list[str] = []

    def fill(match: re.Match) -> str:
        name = match["name"]
        body = render(name, root)
        if body != match["body"]:
            stale.append(name)
        return f"<!-- BEGIN generated: {name} -->\n{body}<!-- END generated: {name} -->"

    return _BLOCK.sub(fill, text), stale


def main(argv: list[str] | None = None) -> int:
    """``--write`` rewrites the README's blocks, ``--check`` exits 1 naming the stale ones."""
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.infra.readme", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from its results file")
    parser.add_argument("--readme", default=None, help="file to process (default: README.md of the repository)")
    parser.add_argument("--root", default=None, help="repository root the renderers read (default: this checkout)")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else ROOT
    path = Path(args.readme) if args.readme else root / "README.md"
    text = path.read_text(encoding="utf-8")
    missing = sorted(set(SECTIONS) - set(find_blocks(text)))
    new, stale = update(text, root)
    if args.write:
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: {len(stale)} block(s) rewritten" + (f": {', '.join(stale)}" if stale else ""))
        if missing:
            print(f"note: no block in {path} for {', '.join(missing)}")
        return 0
    if stale:
        print(f"{path}: stale generated block(s): {', '.join(stale)}; run `python -m shiq_lab.infra.readme --write` "
              "(the results files are the source)", file=sys.stderr)
        return 1
    if missing:
        print(f"{path}: no block for SECTIONS entr(y/ies) {', '.join(missing)}: add the marker lines", file=sys.stderr)
        return 1
    print(f"{path}: every generated block matches its results file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
