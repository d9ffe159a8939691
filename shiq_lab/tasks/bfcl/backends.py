"""Fresh, isolated BFCL API back-ends: every :class:`Backends` gets its own copy of the back-end modules.

Why not import the package: its executor caches instances in module globals (state leaks from one entry to
the next), and the back-end modules themselves hold mutable module-level data that methods mutate or hand
out (``LONG_WEATHER_EXTENSION`` is written by ``get_outside_temperature_from_weather_com``, the long-context
credit cards of ``TravelAPI`` are shared dicts that bookings charge). So the back-end sources are compiled once
(code objects are immutable) and executed into new module objects for every :class:`Backends`: their
``from ...long_context import X`` resolves inside that private set, nothing is added to ``sys.modules``,
``subprocess`` (imported but unused by the file system) is replaced by an empty stub, and imports outside a
short allowlist fail. The numeric contexts that MathAPI sets globally (``decimal`` precision,
``mpmath.mp.dps``) are kept per :class:`Backends` and restored for the caller after every call.

The ``exec`` below runs the wheel's own back-end source (pinned by sha256), never model text: calls reach the
back-ends only as :class:`~shiq_lab.tasks.bfcl.calls.ParsedCall` objects with literal arguments.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import decimal
import inspect
import json
import types
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from shiq_lab.tasks.bfcl.asset import backend_source_dir
from shiq_lab.tasks.bfcl.calls import InvalidCall, ParsedCall, parse_call
from shiq_lab.tasks.bfcl.episodes import CLASS_FILES

__all__ = ["Backends", "canonical_state"]

_PKG = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
_STATELESS = {"MathAPI"}  # the package loads no scenario into these
_ALLOWED_IMPORTS = {"copy", "datetime", "decimal", "math", "mpmath", "random", "typing", "json", "re"}


@lru_cache(maxsize=4)
def _compiled(version: str) -> dict[str, types.CodeType]:
    folder = backend_source_dir(version)
    return {p.stem: compile(p.read_text(), str(p), "exec") for p in sorted(folder.glob("*.py")) if p.stem != "__init__"}


class _ModuleSet:
    """A private copy of the back-end modules (executed on first use, never registered in ``sys.modules``)."""

    def __init__(self, version: str) -> None:
        self._code = _compiled(version)
        self._modules: dict[str, types.ModuleType] = {}
        self._builtins = dict(builtins.__dict__)
        self._builtins["__import__"] = self._import
        self._stub_subprocess = types.ModuleType("subprocess")

    def get(self, stem: str) -> types.ModuleType:
        if stem not in self._modules:
            if stem not in self._code:
                raise ImportError(f"the BFCL back-end module {stem!r} is not in the asset; refetch it")
            module = types.ModuleType(f"{_PKG}.{stem}")
            module.__dict__["__builtins__"] = self._builtins
            module.__file__ = self._code[stem].co_filename
            self._modules[stem] = module
            exec(self._code[stem], module.__dict__)  # the pinned wheel's back-end source, never model text
        return self._modules[stem]

    def _import(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and name.startswith(_PKG + ".") and fromlist:
            return self.get(name[len(_PKG) + 1:])
        if level == 0 and name == _PKG and fromlist:
            package = types.ModuleType(_PKG)
            for stem in fromlist:
                setattr(package, stem, self.get(stem))
            return package
        top = name.split(".")[0]
        if level == 0 and top == "subprocess":
            return self._stub_subprocess
        if level == 0 and top in _ALLOWED_IMPORTS:
            return builtins.__import__(name, globals, locals, fromlist, level)
        raise ImportError(f"BFCL back-end tried to import {name!r}, which is outside the allowlist "
                          f"{sorted(_ALLOWED_IMPORTS)}: the asset changed; check shiq_lab/tasks/bfcl/backends.py")


def canonical_state(value: Any) -> Any:
    """Plain-data form of a back-end attribute, equal exactly when the package's ``==`` says equal.

    The file system's ``File`` / ``Directory`` compare by name and content (``Directory.parent`` is ignored by
    their ``__eq__``); two module copies have distinct classes, so they are compared through this form.
    """
    kind = type(value).__name__
    module = getattr(type(value), "__module__", "")
    if module.startswith(_PKG):
        if kind == "File":
            return ("File", value.name, value.content)
        if kind == "Directory":
            return ("Directory", value.name, {k: canonical_state(v) for k, v in value.contents.items()})
        raise TypeError(f"no canonical form for back-end object {kind}: extend canonical_state")
    if isinstance(value, dict):
        return {k: canonical_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(canonical_state(v) for v in value)
    return value


def _format_result(result: Any) -> str:
    """The package's rendering of a call's return value (strings as is, dicts as JSON when they can be)."""
    if type(result) is str:
        return result
    if type(result) is dict:
        try:
            return json.dumps(result)
        except Exception:  # noqa: BLE001 - the package falls back to str for anything json refuses
            return str(result)
    return str(result)


class Backends:
    """The API instances of one episode side (the model's, or the ground truth's), fresh and private."""

    def __init__(self, involved_classes: list[str], initial_config: dict[str, Any], *, long_context: bool = False,
                 version: str = "v3") -> None:
        self._modules = _ModuleSet(version)
        self.instances: dict[str, Any] = {}
        self.signatures: dict[str, inspect.Signature] = {}
        self._owner: dict[str, str] = {}
        self._decimal = decimal.Context()  # the default context, private to this side
        self._mp_prec: int | None = None
        with self._numeric_context():
            for class_name in involved_classes:
                if class_name not in CLASS_FILES:
                    raise ValueError(f"unknown BFCL API class {class_name!r}; known: {', '.join(CLASS_FILES)}")
                instance = getattr(self._modules.get(CLASS_FILES[class_name]), class_name)()
                if class_name not in _STATELESS:
                    instance._load_scenario(copy.deepcopy(initial_config.get(class_name, {})), long_context=long_context)
                self.instances[class_name] = instance
                # a later class wins a shared method name, as in the package's executor
                for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                    if not name.startswith("_"):
                        self._owner[name] = class_name
                        self.signatures[name] = inspect.signature(method)

    @contextlib.contextmanager
    def _numeric_context(self) -> Iterator[None]:
        import mpmath  # MathAPI's dependency; only the precision is touched here

        saved_decimal, saved_prec = decimal.getcontext(), mpmath.mp.prec
        decimal.setcontext(self._decimal)
        mpmath.mp.prec = self._mp_prec if self._mp_prec is not None else 53
        try:
            yield
        finally:
            self._mp_prec = mpmath.mp.prec
            decimal.setcontext(saved_decimal)
            mpmath.mp.prec = saved_prec

    def parse(self, text: Any) -> ParsedCall | InvalidCall:
        """Check a call string against these back-ends' methods (see :func:`~.calls.parse_call`)."""
        return parse_call(text, self.signatures)

    def execute(self, call: ParsedCall) -> str:
        """Run one parsed call; returns the package's result string (``Error during execution: ...`` on error)."""
        method = getattr(self.instances[self._owner[call.name]], call.name)
        args, kwargs = copy.deepcopy(call.args), copy.deepcopy(call.kwargs_dict())
        with self._numeric_context():
            try:
                return _format_result(method(*args, **kwargs))
            except Exception as err:  # noqa: BLE001 - back-ends report bad arguments by raising; the text is the result
                return f"Error during execution: {err}"

    def state(self) -> dict[str, dict[str, Any]]:
        """Public attributes of every instance in plain-data form (what the official state check compares)."""
        return {c: {k: canonical_state(v) for k, v in vars(inst).items() if not k.startswith("_")}
                for c, inst in self.instances.items()}
