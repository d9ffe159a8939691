"""README numbers come from committed results files: every generated block matches its renderer."""

import json
import re
import shutil
from pathlib import Path

import pytest

from shiq_lab.infra import readme

ROOT = Path(__file__).resolve().parent.parent


def test_readme_blocks_match_the_committed_results():
    assert readme.main(["--check"]) == 0
    assert set(readme.find_blocks((ROOT / "README.md").read_text(encoding="utf-8"))) == set(readme.SECTIONS)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copytree(ROOT / "benchmarks" / "results", root / "benchmarks" / "results")
    shutil.copy(ROOT / "README.md", root / "README.md")
    return root


def test_a_changed_result_makes_its_block_stale_and_write_fixes_it(tmp_path, capsys):
    root = _copy(tmp_path)
    path = root / "benchmarks" / "results" / "imdb_sweep_tiny.json"
    data = json.loads(path.read_text())
    shiq = next(r for r in data["frontier"] if r["loss_type"] == "shiq" and r["beta"] == 0.1 and r["step"] == 40)
    shiq["kl_states_mean"] = 9.87654
    path.write_text(json.dumps(data))
    assert readme.main(["--check", "--root", str(root)]) == 1
    assert "stale generated block(s): imdb-tiny" in capsys.readouterr().err
    assert readme.main(["--write", "--root", str(root)]) == 0
    text = (root / "README.md").read_text(encoding="utf-8")
    assert "| ShiQ | 0.503 | 9.88 |" in text
    assert readme.main(["--check", "--root", str(root)]) == 0


def test_a_hand_edited_number_is_caught(tmp_path, capsys):
    root = _copy(tmp_path)
    readme_path = root / "README.md"
    text = readme_path.read_text(encoding="utf-8")
    body = readme.find_blocks(text)["synthetic-run"]
    edited = re.sub(r"\d+ s wall", lambda m: f"{int(m.group(0).split()[0]) + 1} s wall", body, count=1)
    assert edited != body
    readme_path.write_text(text.replace(body, edited), encoding="utf-8")
    assert readme.main(["--check", "--root", str(root)]) == 1
    assert "synthetic-run" in capsys.readouterr().err


def test_markers_without_a_partner_or_a_renderer_are_errors():
    with pytest.raises(ValueError, match="without a matching"):
        readme.find_blocks("<!-- BEGIN generated: imdb-tiny -->\nx\n")
    with pytest.raises(KeyError, match="no renderer"):
        readme.update("<!-- BEGIN generated: nope -->\n<!-- END generated: nope -->\n")
