"""Where tasks plug into the core: CLI sub-commands and task evaluators, discovered, never imported by name.

A task is a sub-package of :mod:`shiq_lab.tasks` (or any package named by a ``shiq_lab.tasks`` entry point of an
installed distribution). Importing it registers what it provides: models (``infra.models.register_model``),
sub-commands (:func:`register_command`) and an ``evaluate`` handler (:func:`register_evaluator`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points

__all__ = ["COMMANDS", "EVALUATORS", "load_tasks", "register_command", "register_evaluator"]

CommandMain = Callable[[list[str]], int]

#: sub-command name -> (main(argv) -> exit code, one-line help), filled by tasks
COMMANDS: dict[str, tuple[CommandMain, str]] = {}
#: task name -> ``shiq-lab evaluate`` handler for that task
EVALUATORS: dict[str, CommandMain] = {}
_loaded = False


def register_command(name: str, main: CommandMain, help_: str) -> None:
    """Add ``shiq-lab NAME`` (a task's own sub-command)."""
    COMMANDS[name] = (main, help_)


def register_evaluator(task: str, main: CommandMain) -> None:
    """Make ``shiq-lab evaluate --task TASK`` run ``main(argv)``."""
    EVALUATORS[task] = main


def load_tasks() -> None:
    """Import every task package once (built-in sub-packages of ``shiq_lab.tasks``, then entry points)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import shiq_lab.tasks as tasks

    for info in sorted(pkgutil.iter_modules(tasks.__path__), key=lambda m: m.name):
        if info.ispkg:
            importlib.import_module(f"{tasks.__name__}.{info.name}")
    for ep in entry_points(group="shiq_lab.tasks"):
        importlib.import_module(ep.value)
