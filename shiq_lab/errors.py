"""The project's own errors: one base class, so the CLI prints them as one message (exit code 2).

Each message names what is wrong (file, row, field, folder) and the fix; ``shiq-lab --debug`` (or
``SHIQ_LAB_DEBUG=1``) shows the traceback behind it. The concrete classes live next to the code
that raises them and keep their historical bases (``DataValidationError`` is a ``ValueError``,
``StaleReferenceCacheError`` a ``RuntimeError``), so existing ``except`` clauses still catch them:

- :class:`shiq_lab.data.formats.DataValidationError`: an unusable dataset row or file.
- :class:`shiq_lab.reference.cache.StaleReferenceCacheError`: reference statistics of other data / model.
- :class:`ConfigError`: a config field out of range, of the wrong type, or a YAML file that does not parse
  (also importable as ``shiq_lab.infra.config.ConfigError``).
- :class:`ModelNotFoundError`: a model name, folder or hub id that cannot be loaded.
- :class:`RunDirectoryError`: an ``output_dir`` / checkpoint that would lose or mix runs.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["ShiQLabError", "ConfigError", "ModelNotFoundError", "RunDirectoryError", "report_errors", "debug_requested"]


class ShiQLabError(Exception):
    """Base of every error shiq_lab raises on purpose (a bad input or a refused action, not a bug)."""


class ConfigError(ShiQLabError, ValueError):
    """A config field (YAML, flag or Python argument) is out of range or of the wrong type."""


class ModelNotFoundError(ShiQLabError, KeyError):
    """A model name, local folder or hub id that cannot be resolved."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunDirectoryError(ShiQLabError):
    """Training into this ``output_dir`` / from this checkpoint would lose or mix runs."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``SHIQ_LAB_DEBUG=1``: show tracebacks instead of one-line messages."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SHIQ_LAB_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def report_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command-line ``main(argv) -> int``: the project's errors become one message and exit code 2.

    A :class:`ShiQLabError` (and a ``SystemExit`` carrying a message) prints ``error: <message>`` on
    stderr and returns 2. ``--debug`` (removed from ``argv`` before ``main`` sees it) or
    ``SHIQ_LAB_DEBUG=1`` re-raises instead, so the traceback shows. Bugs (any other exception)
    always keep their traceback.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args: Any, **kwargs: Any) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv, *args, **kwargs)
        except ShiQLabError as err:
            if debug:
                raise
            print(f"error: {err}\n(--debug or SHIQ_LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 2
        except SystemExit as err:
            if debug or not isinstance(err.code, str):  # argparse's own exits (help, usage) keep their code
                raise
            print(f"error: {err.code}", file=sys.stderr)
            return 2

    return wrapper
