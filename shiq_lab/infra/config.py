"""One configuration system: a YAML file of ``field: value`` plus flags, every field a flag, flags win.

Used by ``shiq-lab train`` (:class:`~shiq_lab.train.config.RunArguments` + :class:`~shiq_lab.train.config.ShiQConfig`),
the IMDB sweep (its task config + ``ShiQConfig``) and the synthetic suite. A YAML value goes through the same
parser as a flag (it is turned into ``--field value`` first), so ``max_steps: 2.5`` is refused exactly like
``--max_steps 2.5``. Errors name the file (and line, for YAML syntax) and the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shiq_lab.errors import ConfigError, report_errors  # one error hierarchy (issue 12): ConfigError is a ShiQLabError

__all__ = ["ConfigError", "parse_config", "read_yaml", "report_errors", "yaml_to_flags"]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file, a syntax error (with its line) or a non-mapping is a ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (shipped configs: configs/train/, configs/sweep/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: YAML syntax error: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of field: value, not a {type(data).__name__}")
    return data


def yaml_to_flags(values: dict[str, Any]) -> list[str]:
    """``{"betas": [0.1, 0.5], "bf16": True}`` -> ``["--betas", "0.1", "0.5", "--bf16", "true"]``.

    ``null`` keeps the field's default; a mapping becomes one JSON string (the form dict fields take as flags).
    """
    flags: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags += [f"--{name}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{name}", *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [f"--{name}", json.dumps(value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


def _tuple_fields(cls: type) -> dict[str, type]:
    """``name -> item type`` of the ``tuple[X, ...]`` fields (HfArgumentParser knows only lists)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if typing.get_origin(tp) is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
            out[f.name] = typing.get_args(tp)[0]
    return out


def _with_list_fields(cls: type) -> type:
    """A twin of ``cls`` whose ``tuple[X, ...]`` fields are ``list[X]`` (parsed as ``--name a b c``)."""
    tuples = _tuple_fields(cls)
    if not tuples:
        return cls
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in tuples:
            default = f.default
            specs.append((f.name, list[tuples[f.name]], dataclasses.field(  # type: ignore[name-defined,valid-type]
                default_factory=(lambda d=default: list(d)), metadata=f.metadata)))
        else:
            kw = {"default": f.default} if f.default is not dataclasses.MISSING else {}
            if f.default_factory is not dataclasses.MISSING:
                kw = {"default_factory": f.default_factory}
            specs.append((f.name, f.type, dataclasses.field(metadata=f.metadata, **kw)))
    import typing

    hints = typing.get_type_hints(cls)
    specs = [(n, tp if n in tuples else hints[n], fl) for n, tp, fl in specs]
    return dataclasses.make_dataclass(cls.__name__, specs)


def _field_names(types: Sequence[type]) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t) if f.init]


def parse_config(
    types: Sequence[type],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    defaults: dict[str, Any] | None = None,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> tuple[Any, ...]:
    """One instance of each dataclass in ``types`` from ``--config FILE`` and flags (flags override the file).

    ``defaults`` (a task's own defaults for fields of another dataclass, e.g. the sweep's learning rate) sit
    under the file. Every field is a flag; ``--help`` lists them all.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    names = _field_names(types)
    file_values: dict[str, Any] = {}
    if known.config:
        file_values = read_yaml(known.config)
        unknown = [k for k in file_values if k not in names]
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, n=1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"{known.config}: unknown field(s) {', '.join(hints)}; `--help` lists the fields")
    parser = HfArgumentParser(tuple(_with_list_fields(t) for t in types), prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False,
                              parents=list(parents))  # parents: a command's own flags, listed by --help
    parser.add_argument("--config", default=None, help="YAML file of field: value (flags override it)")
    flags = yaml_to_flags({**(defaults or {}), **file_values}) + rest
    where = f"{known.config}: " if known.config else ""
    # argparse reports bad values on stderr and exits; catch that to name the file the value came from
    try:
        parsed = parser.parse_args_into_dataclasses(args=flags, look_for_args_file=False)[: len(types)]
        return tuple(
            p if isinstance(p, cls) else cls(**{k: tuple(v) if k in _tuple_fields(cls) else v
                                                 for k, v in dataclasses.asdict(p).items()})
            for p, cls in zip(parsed, types))
    except argparse.ArgumentError as err:  # a value of the wrong type, from the file or a flag
        raise ConfigError(f"{where}{err}") from None
    except ValueError as err:  # a dataclass's own validation (__post_init__)
        raise ConfigError(f"{where}{err}") from None
