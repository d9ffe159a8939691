"""Project-level invariants: environment.yml agrees with pyproject.toml, offline variables are set."""

import os
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# conda-forge / pytorch channel names of PyPI packages whose names differ
CONDA_NAME = {"torch": "pytorch", "kaleido": "python-kaleido"}


def _split(spec: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec)
    assert m, spec
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in ("notebooks", "dev"):
        specs += project["optional-dependencies"][extra]
    return dict(_split(s) for s in specs)


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return dict(_split(d) for d in env["dependencies"] if isinstance(d, str) and d not in ("pip",))


def test_environment_yml_matches_pyproject() -> None:
    py = _pyproject_requirements()
    conda = _conda_requirements()
    expected = {CONDA_NAME.get(name, name): spec for name, spec in py.items()}
    missing = sorted(set(expected) - set(conda))
    assert not missing, f"environment.yml lacks {missing} (declared in pyproject.toml)"
    differing = {n: (expected[n], conda[n]) for n in expected if expected[n] != conda[n]}
    assert not differing, f"version specs differ (pyproject, environment.yml): {differing}"
    extra = sorted(set(conda) - set(expected) - {"python"})
    assert not extra, f"environment.yml has packages pyproject.toml does not declare: {extra}"
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert conda["python"] == requires_python


def test_torch_is_a_range_and_the_lock_pins_the_cpu_build() -> None:
    assert _pyproject_requirements()["torch"].startswith(">="), "keep torch a range so GPU users keep their build"
    lock = (ROOT / "requirements-cpu.lock").read_text().splitlines()
    torch_pins = [line for line in lock if line.startswith("torch==")]
    assert torch_pins and "+cpu" in torch_pins[0], "the CI lock must pin the CPU torch build"


def test_offline_variables_are_set_for_tests() -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ.get(key) == "1"
    makefile = (ROOT / "Makefile").read_text()
    assert all(f"export {k}" in makefile for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
