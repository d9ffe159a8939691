"""Execute the numbered notebooks with papermill (the main job, and the notebook tests).

Executed copies go to ``runs/notebooks/`` (ignored); notebooks in ``notebooks/`` stay without outputs.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shiq_lab.infra.notebooks import OFFLINE_ENV, runs_dir
from shiq_lab.infra.paths import REPO_ROOT

__all__ = ["NOTEBOOKS_DIR", "list_notebooks", "NotebookRun", "run_notebook"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def list_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


@dataclass
class NotebookRun:
    notebook: Path
    output: Path
    seconds: float


def _poll_in_steps(channel: Any, step: float = 1.0) -> None:
    """Make ``channel.get_msg(timeout)`` re-poll every ``step`` seconds instead of waiting once.

    Under CPU load, a cell that opens ipywidgets comms can leave nbclient waiting forever for an
    ``execute_reply`` the kernel has already sent (seen here with notebook 02; nbclient issue 312):
    the single long poll misses its wake-up. A fresh poll sees the message at once.
    """
    original = channel.get_msg

    async def get_msg(timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = step if deadline is None else min(step, max(0.0, deadline - time.monotonic()))
            try:
                return await original(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def _install_polling_client() -> None:
    """Have papermill's engine build kernel clients whose shell channel polls in steps."""
    import papermill.engines
    from nbclient.util import run_sync
    from papermill.clientwrap import PapermillNotebookClient

    if getattr(papermill.engines.PapermillNotebookClient, "_shiq_lab_polling", False):
        return

    class SteppedPollingClient(PapermillNotebookClient):
        _shiq_lab_polling = True

        async def async_start_new_kernel_client(self):  # type: ignore[override]
            kc = await super().async_start_new_kernel_client()
            _poll_in_steps(kc.shell_channel)
            return kc

        start_new_kernel_client = run_sync(async_start_new_kernel_client)

        def create_kernel_manager(self):  # type: ignore[override]
            # local sockets (in the Jupyter runtime folder) instead of unencrypted TCP on localhost: no
            # "Kernel is running over TCP without encryption" warning for every notebook
            km = super().create_kernel_manager()
            if os.name == "posix":
                km.transport = "ipc"
            return km

    # the engine looks the client class up in its module at call time
    papermill.engines.PapermillNotebookClient = SteppedPollingClient


def run_notebook(
    notebook: Path,
    *,
    parameters: dict[str, Any] | None = None,
    output_dir: Path | None = None,
    timeout_per_cell: int = 900,
    progress: bool = False,
) -> NotebookRun:
    """Execute one notebook in its own folder with papermill; raises on the first failing cell.

    The kernel inherits the Hugging Face offline variables, so hub calls fail fast. ``progress``: a bar
    over the notebook's cells (``01_bellman_derivation: 12/24 cells``).
    """
    import papermill as pm

    _install_polling_client()
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
        progress_bar={"desc": f"   {notebook.stem}", "unit": "cell", "leave": False, "dynamic_ncols": True}
        if progress else False,
        execution_timeout=timeout_per_cell,
    )
    return NotebookRun(notebook, output, time.perf_counter() - start)
