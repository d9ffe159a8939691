"""Strip a notebook to what the repository stores: no outputs, no execution counts, fixed metadata.

A git clean filter (stdlib only, so any ``python3`` runs it). The set-up (``make setup``) registers it::

    git config filter.strip-notebook.clean "python3 shiq_lab/infra/strip_notebook.py"

and ``.gitattributes`` applies it to ``*.ipynb``: running a notebook in JupyterLab writes outputs into
the working copy, and git sees the stripped text, so the tree stays clean. By hand::

    python3 shiq_lab/infra/strip_notebook.py < in.ipynb > out.ipynb
    python3 shiq_lab/infra/strip_notebook.py notebooks/*.ipynb          # in place

Kept: cell sources, ids, ``tags`` (the papermill ``parameters`` cell), attachments; the kernel is
recorded as the project's ``python3`` kernel. Text that is not a notebook passes through unchanged
(a filter must never lose a file, e.g. one with merge-conflict markers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["KERNELSPEC", "strip", "strip_text", "main"]

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a notebook dict (a new dict; the input is not modified)."""
    cells = []
    for cell in nb.get("cells", []):
        out = {k: v for k, v in cell.items() if k not in ("outputs", "execution_count", "metadata")}
        tags = cell.get("metadata", {}).get("tags")
        out["metadata"] = {"tags": list(tags)} if tags else {}
        if cell.get("cell_type") == "code":
            out["outputs"], out["execution_count"] = [], None
        cells.append(out)
    language = nb.get("metadata", {}).get("language_info", {}).get("name", "python")
    return {**{k: v for k, v in nb.items() if k not in ("cells", "metadata")}, "cells": cells,
            "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": {"name": language}}}


def strip_text(text: str) -> str:
    """:func:`strip` on notebook JSON text, written as JupyterLab writes it; other text unchanged."""
    try:
        nb = json.loads(text)
    except ValueError:
        return text
    if not isinstance(nb, dict) or "cells" not in nb:
        return text
    return json.dumps(strip(nb), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """stdin -> stdout (the git filter), or the files named, in place."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        # bytes, not the locale's text: notebooks are UTF-8 whatever LANG the filter runs under
        data = sys.stdin.buffer.read()
        try:
            out = strip_text(data.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            out = data
        sys.stdout.buffer.write(out)
        return 0
    for name in args:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        new = strip_text(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
