"""Every numbered notebook executes with papermill in its tiny default parameters and records a summary.

The notebooks assert the numbers they show, so a run that finishes is a run whose claims held.
"""

import json

import nbformat
import pytest

from shiq_lab.infra.notebook_runner import list_notebooks, run_notebook

NOTEBOOKS = list_notebooks()


def test_notebooks_exist() -> None:
    names = [p.stem[:2] for p in NOTEBOOKS]
    assert names[:4] == ["01", "02", "03", "04"], f"expected notebooks 01-04, found {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean_with_parameters_cell(path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} has outputs: strip them (executed copies belong under runs/)"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and code.index(tagged[0]) <= 1, f"{path.name}: one early code cell must be tagged 'parameters'"
    assert "setup_notebook" in "".join(c.source for c in code), f"{path.name} must call setup_notebook()"
    assert "record_summary" in "".join(c.source for c in code), f"{path.name} must record_summary() its numbers"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_RUNS", str(tmp_path))
    run = run_notebook(path, output_dir=tmp_path / "notebooks")
    summary = tmp_path / "summaries" / f"{path.stem}.json"
    assert summary.exists(), f"{path.name} ran but recorded no summary"
    values = json.loads(summary.read_text())
    assert values, f"{path.name} recorded an empty summary"
    executed = nbformat.read(run.output, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # figures follow their output area: no fixed width, and no PNG, which JupyterLab would show first at its own size
    for i, cell in enumerate(executed.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = out.get("data", {})
            if "application/vnd.plotly.v1+json" in data:
                layout = data["application/vnd.plotly.v1+json"].get("layout", {})
                assert "image/png" not in data, f"{path.name} cell {i}: a figure carries a PNG copy"
                assert not layout.get("width"), f"{path.name} cell {i}: a figure has a fixed width {layout.get('width')}"


