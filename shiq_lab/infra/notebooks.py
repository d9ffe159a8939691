"""What every notebook does first, and how it reports the numbers it asserts.

Notebooks call :func:`setup_notebook` in their first code cell and :func:`record_summary` at the end;
``make demo`` (``python -m shiq_lab.infra.demo``) executes them with papermill and prints the summaries.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from shiq_lab.infra.paths import REPO_ROOT

__all__ = ["OFFLINE_ENV", "set_offline", "setup_notebook", "runs_dir", "record_summary", "read_summaries"]

#: Hub calls fail fast instead of hanging on a closed network; local folders still load.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def set_offline() -> None:
    """Set the Hugging Face offline variables unless the user chose otherwise."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def setup_notebook(seed: int = 0) -> None:
    """Offline mode, seeds, and plotly figures that work without a network."""
    set_offline()
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(seed)
    try:
        from shiq_lab.views.figures import configure_plotly

        configure_plotly()
    except ImportError:
        pass


def runs_dir() -> Path:
    """Where executed notebooks and their summaries go: ``$SHIQ_LAB_RUNS`` or ``runs/``."""
    return Path(os.environ.get("SHIQ_LAB_RUNS", REPO_ROOT / "runs"))


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record_summary(name: str, values: dict[str, Any]) -> Path:
    """Save the key numbers a notebook asserted, for ``make demo`` to print."""
    path = runs_dir() / "summaries" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_plain(values), indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def read_summaries() -> dict[str, dict[str, Any]]:
    """All recorded summaries, by notebook name."""
    folder = runs_dir() / "summaries"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
