"""Where things live: the repository checkout and its ignored working folders."""

from __future__ import annotations

from pathlib import Path

#: the checkout holding ``shiq_lab/`` (editable installs; a wheel install has no notebooks or assets here)
REPO_ROOT = Path(__file__).resolve().parents[2]
