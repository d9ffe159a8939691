"""The project's own errors: one base class, so the CLI prints them as one message (exit code 2).

Each message names what is wrong (file, row, field, folder) and the fix; ``shiq-lab --debug`` (or
``SHIQ_LAB_DEBUG=1``) shows the traceback behind it. The concrete classes live next to the code
that raises them and keep their historical bases (``DataValidationError`` is a ``ValueError``,
``StaleReferenceCacheError`` a ``RuntimeError``), so existing ``except`` clauses still catch them:

- :class:`shiq_lab.data.formats.DataValidationError`: an unusable dataset row or file.
- :class:`shiq_lab.reference.cache.StaleReferenceCacheError`: reference statistics of other data / model.
- :class:`ConfigError`: a config field out of range, of the wrong type, or a YAML file that does not parse.
- :class:`ModelNotFoundError`: a model name, folder or hub id that cannot be loaded.
- :class:`RunDirectoryError`: an ``output_dir`` / checkpoint that would lose or mix runs.
"""

from __future__ import annotations

__all__ = ["ShiQLabError", "ConfigError", "ModelNotFoundError", "RunDirectoryError"]


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
