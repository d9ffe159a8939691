"""The notebook stripper: stored notebooks are fixed points, outputs are removed, and with the git filter a
notebook run in place never reaches a diff or a commit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shiq_lab.infra.strip_notebook import KERNELSPEC, strip_text

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCRIPT = ROOT / "shiq_lab" / "infra" / "strip_notebook.py"


def _executed(text: str) -> str:
    """What JupyterLab saves after running every cell: outputs, counts, timing metadata, widget state."""
    nb = json.loads(text)
    for n, cell in enumerate(nb["cells"]):
        cell["metadata"]["execution"] = {"iopub.status.busy": "2026-12-01T10:00:00.000Z"}
        cell["metadata"]["scrolled"] = True
        if cell["cell_type"] == "code":
            cell["execution_count"] = n + 1
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["x" * 1000 + "\n"]},
                               {"output_type": "display_data", "metadata": {},
                                "data": {"image/png": "iVBORw0KGgo=" * 200, "text/plain": ["<Figure>"]}}]
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3"
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_notebooks_are_fixed_points_and_outputs_are_stripped(path):
    stored = path.read_text(encoding="utf-8")
    assert strip_text(stored) == stored  # the filter never changes a stored notebook
    executed = _executed(stored)
    assert len(executed) > len(stored) + 1000
    assert strip_text(executed) == stored
    nb = json.loads(stored)
    assert nb["metadata"]["kernelspec"] == KERNELSPEC
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"])  # tags survive


def test_text_that_is_not_a_notebook_passes_through():
    conflicted = '{\n<<<<<<< HEAD\n "cells": []\n=======\n>>>>>>> other\n}\n'
    assert strip_text(conflicted) == conflicted
    assert strip_text('["not", "a", "notebook"]') == '["not", "a", "notebook"]'


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_run_notebook_leaves_a_git_tree_with_the_filter_clean(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    # the same registration as `make setup`, with this interpreter (the test must not depend on python3)
    git("config", "filter.strip-notebook.clean", f"'{sys.executable}' '{SCRIPT}'")
    shutil.copy(ROOT / ".gitattributes", tmp_path / ".gitattributes")
    nb = tmp_path / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], nb)
    git("add", ".")
    git("commit", "-qm", "notebook without outputs")
    nb.write_text(_executed(nb.read_text(encoding="utf-8")), encoding="utf-8")
    # git compares the stripped text: no diff, and staging everything stages nothing (a size change alone
    # still makes `git status` list the file until then; `make lab` saves notebooks stripped, see test_lab.py)
    assert git("diff") == ""
    git("add", "-A")
    assert git("status", "--porcelain") == ""
    assert nb.stat().st_size > NOTEBOOKS[0].stat().st_size  # the working copy keeps its outputs
    # a real edit still shows
    nb.write_text(nb.read_text(encoding="utf-8").replace("From the Bellman equation", "From Bellman"), encoding="utf-8")
    assert git("status", "--porcelain").split() == ["M", nb.name]
