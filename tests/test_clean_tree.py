"""Documented commands leave `git status` as it was: they write only ignored folders, and the generators
rewrite tracked files byte for byte (whatever PYTHONHASHSEED the shell has)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs git and a git checkout")


def _state() -> tuple[str, str]:
    """`git status --porcelain` and the diff of tracked files (so a second change to a dirty file shows)."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, check=True, capture_output=True, text=True)
    diff = subprocess.run(["git", "diff", "--binary"], cwd=ROOT, check=True, capture_output=True)
    return status.stdout, diff.stdout.hex()


def _run(args: list[str], **env: str) -> None:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("hashseed", ["12345"])
def test_synthetic_data_outside_make_rewrites_the_tracked_files_byte_for_byte(hashseed):
    before = _state()
    _run(["-m", "shiq_lab.tasks.synthetic", "synthetic-data"], PYTHONHASHSEED=hashseed)
    assert _state() == before


@pytest.mark.notebook
def test_running_a_notebook_with_the_runner_writes_only_ignored_files(tmp_path):
    before = _state()
    _run(["-c", "from shiq_lab.infra.notebook_runner import list_notebooks, run_notebook; run_notebook(list_notebooks()[0])"],
         OMP_NUM_THREADS="1")
    assert _state() == before
    assert (ROOT / "runs" / "notebooks" / "01_bellman_derivation.ipynb").exists()
