"""Call strings -> checked calls, with :mod:`ast` only: a model's text is data and never reaches ``eval``/``exec``.

A call string is valid when it parses as exactly one call ``name(arg, ..., key=value, ...)`` where ``name`` is a
public method of the episode's back-ends and every argument is a literal (numbers, strings, booleans, None,
and lists / tuples / dicts / sets of literals). Anything else (attribute access, names, nested calls,
lambdas, comprehensions, ``*args`` / ``**kwargs``, operators, over-long text) is an :class:`InvalidCall`
with the reason; parsing never raises and never executes anything.

The package's own executor prefixes method names with an instance and calls ``eval`` on the result, guarded
only by a name blocklist; this module replaces that step.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_CALLS_PER_TURN",
    "MAX_CALL_CHARS",
    "MAX_INT",
    "InvalidCall",
    "ParsedCall",
    "format_call",
    "parse_call",
]

# The longest ground-truth call of the 800 V3 entries has 6,839 characters (an echo of a long text).
MAX_CALL_CHARS = 16_384
MAX_CALLS_PER_TURN = 64  # the ground truth has at most 18 calls in a turn
# Integer arguments beyond this are refused: MathAPI computes with them (``base**exponent``, ``mp.dps =
# precision``), so a short string could otherwise hang the process. The ground truth's largest is 987,654.
MAX_INT = 10**15
_BOUNDED = {"exponent": 1_000, "precision": 1_000, "decimal_places": 1_000}  # parameters with a tighter bound


@dataclass(frozen=True)
class ParsedCall:
    """A validated call: method name, positional and keyword literal arguments, and the original text."""

    name: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    text: str

    def kwargs_dict(self) -> dict[str, Any]:
        return dict(self.kwargs)


@dataclass(frozen=True)
class InvalidCall:
    """A call string that was refused (never executed), with the reason."""

    text: str
    reason: str


def _int_out_of_range(value: Any, bound: int) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > bound
    if isinstance(value, float):
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_int_out_of_range(v, bound) for v in value)
    if isinstance(value, dict):
        return any(_int_out_of_range(k, bound) or _int_out_of_range(v, bound) for k, v in value.items())
    return False


def parse_call(text: Any, methods: Mapping[str, inspect.Signature | None]) -> ParsedCall | InvalidCall:
    """Parse one call string against the known ``methods`` (name -> signature, or None to skip bound checks).

    Never raises and never executes anything: a refused string comes back as :class:`InvalidCall`.
    """
    if not isinstance(text, str):
        return InvalidCall(repr(text)[:200], f"a call must be a string, got {type(text).__name__}")
    if len(text) > MAX_CALL_CHARS:
        return InvalidCall(text[:200], f"call string has {len(text)} characters, more than {MAX_CALL_CHARS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return InvalidCall(text, f"not a Python call expression ({type(err).__name__}: {err})")
    call = tree.body
    if not isinstance(call, ast.Call):
        return InvalidCall(text, f"not a call but {type(call).__name__}")
    if not isinstance(call.func, ast.Name):
        return InvalidCall(text, f"the called object must be a plain function name, got {type(call.func).__name__}")
    name = call.func.id
    if name.startswith("_") or name not in methods:
        return InvalidCall(text, f"{name!r} is not a method of the episode's API classes")
    args: list[Any] = []
    for i, node in enumerate(call.args):
        if isinstance(node, ast.Starred):
            return InvalidCall(text, "star-arguments (*args) are not allowed")
        try:
            args.append(ast.literal_eval(node))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as err:
            return InvalidCall(text, f"positional argument {i} is not a literal ({type(err).__name__})")
    kwargs: list[tuple[str, Any]] = []
    for kw in call.keywords:
        if kw.arg is None:
            return InvalidCall(text, "keyword unpacking (**kwargs) is not allowed")
        try:
            kwargs.append((kw.arg, ast.literal_eval(kw.value)))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as err:
            return InvalidCall(text, f"argument {kw.arg!r} is not a literal ({type(err).__name__})")
    if _int_out_of_range(args, MAX_INT) or _int_out_of_range([v for _, v in kwargs], MAX_INT):
        return InvalidCall(text, f"an integer argument exceeds {MAX_INT:.0e} in magnitude")
    signature = methods[name]
    if signature is not None:
        try:
            bound = signature.bind(*args, **dict(kwargs)).arguments
        except TypeError:
            bound = {}  # wrong arguments: the method itself reports it, as the official harness does
        for param, limit in _BOUNDED.items():
            if param in bound and _int_out_of_range(bound[param], limit):
                return InvalidCall(text, f"argument {param!r} exceeds {limit} in magnitude")
    return ParsedCall(name, tuple(args), tuple(kwargs), text)


def format_call(name: str, kwargs: Mapping[str, Any] | None = None, args: tuple[Any, ...] = ()) -> str:
    """Render a call string from literal arguments (the inverse of :func:`parse_call`)."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in (kwargs or {}).items()]
    return f"{name}({', '.join(parts)})"
