"""The layout's promises: the core imports no task, old module paths still resolve to the new modules."""

import subprocess
import sys
import warnings

CORE = ["shiq_lab", "shiq_lab.losses", "shiq_lab.exact.tree", "shiq_lab.exact.fit", "shiq_lab.data", "shiq_lab.lm.stats",
        "shiq_lab.lm.kernel", "shiq_lab.lm.modes", "shiq_lab.reference", "shiq_lab.train.config", "shiq_lab.train.trainer",
        "shiq_lab.train.simple_fit", "shiq_lab.train.sweep", "shiq_lab.evaluation", "shiq_lab.views.token_values",
        "shiq_lab.views.figures", "shiq_lab.views.explorer", "shiq_lab.infra.models", "shiq_lab.infra.assets",
        "shiq_lab.infra.config", "shiq_lab.cli"]


def test_the_core_imports_no_task():
    code = ("import importlib, sys\n"
            f"for m in {CORE!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('shiq_lab.tasks.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_tasks_register_themselves_when_discovered():
    code = ("from shiq_lab.infra import registry, models\n"
            "assert 'imdb-small' not in models.MODEL_BUILDERS\n"
            "registry.load_tasks()\n"
            "print('imdb-small' in models.MODEL_BUILDERS, sorted(registry.EVALUATORS))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[0] == "True" and "'imdb'" in out.stdout


def test_old_module_paths_are_the_new_modules():
    import importlib

    from shiq_lab import _legacy

    for old, new in _legacy.LEGACY_MODULES.items():
        if old.endswith("__main__"):
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"shiq_lab.{old}")
        assert module is importlib.import_module(f"shiq_lab.{new}"), old
        if f"shiq_lab.{old}" not in sys.modules or caught:
            assert not caught or f"shiq_lab.{new}" in str(caught[0].message)
    from shiq_lab.imdb_task import offline_dataset  # what 0.1 configs name
    from shiq_lab.tasks.imdb.sweep import offline_dataset as new

    assert offline_dataset is new


def test_python_m_of_an_old_path_runs_the_new_entry_point():
    out = subprocess.run([sys.executable, "-m", "shiq_lab.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "synthetic" in out.stdout
