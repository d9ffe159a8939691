"""Execute the numbered notebooks with papermill (the main job, and the notebook tests).

Executed copies go to ``runs/notebooks/`` (ignored); notebooks in ``notebooks/`` stay without outputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .notebook_support import OFFLINE_ENV, runs_dir

__all__ = ["NOTEBOOKS_DIR", "list_notebooks", "NotebookRun", "run_notebook"]

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def list_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


@dataclass
class NotebookRun:
    notebook: Path
    output: Path
    seconds: float


def run_notebook(
    notebook: Path,
    *,
    parameters: dict[str, Any] | None = None,
    output_dir: Path | None = None,
    timeout_per_cell: int = 900,
) -> NotebookRun:
    """Execute one notebook in its own folder with papermill; raises on the first failing cell.

    The kernel inherits the Hugging Face offline variables, so hub calls fail fast.
    """
    import papermill as pm

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("SHIQ_LAB_RUNS", str(runs_dir()))
    out_dir = output_dir or runs_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / notebook.name
    start = time.perf_counter()
    pm.execute_notebook(
        str(notebook),
        str(output),
        parameters=parameters or {},
        cwd=str(notebook.parent),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=timeout_per_cell,
    )
    return NotebookRun(notebook, output, time.perf_counter() - start)
