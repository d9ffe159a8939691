"""Config validation before any expensive work: ranges, types, YAML syntax (issue 12).

One place decides whether a run's fields are usable, so a bad value is refused with its name, its
value and the fix before a model is loaded or a reference pass runs:

- :func:`validate_config`: the :class:`~shiq_lab.train.trainer.ShiQConfig` fields (called from its
  ``__post_init__``, so the Python API gets the same checks as the CLI).
- :func:`validate_run`: the CLI's ``RunArguments`` fields (model, data, LoRA).
- :func:`validate`: both.

YAML files are read by :mod:`shiq_lab.infra.config` (syntax errors name the file and line; values go
through the flag parser, so ``max_steps: 2.5`` is refused as ``--max_steps 2.5`` is); the ranges
are checked here, for YAML, flags and Python alike.

Every problem raises :class:`shiq_lab.errors.ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from shiq_lab.errors import ConfigError

__all__ = ["validate", "validate_config", "validate_run"]

_DTYPES = ("float32", "bfloat16", "float16", "auto")


# ---------------------------------------------------------------------------------------------
# field checks
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(name: str, v: Any, *, low: int | None = 1, optional: bool = False, extra: str = "") -> None:
    if v is None and optional:
        return
    what = f"an integer >= {low}" if low is not None else "an integer"
    if optional:
        what += " or None"
    if not _is_int(v):
        raise ConfigError(f"{name}={v!r}: must be {what}{extra}")
    if low is not None and v < low:
        raise ConfigError(f"{name}={v!r}: must be {what}{extra}")


def _real(name: str, v: Any, *, low: float | None = None, low_open: bool = False, high: float | None = None,
          high_open: bool = False, optional: bool = False, why: str = "") -> None:
    if v is None and optional:
        return
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
    rng = " and ".join(x for x in (lo, hi) if x)
    what = "a finite number" + (f" {rng}" if rng else "") + (" or None" if optional else "") + (f" ({why})" if why else "")
    if not _is_real(v) or not math.isfinite(float(v)):
        raise ConfigError(f"{name}={v!r}: must be {what}")
    x = float(v)
    if low is not None and (x <= low if low_open else x < low):
        raise ConfigError(f"{name}={v!r}: must be {what}")
    if high is not None and (x >= high if high_open else x > high):
        raise ConfigError(f"{name}={v!r}: must be {what}")


def _choice(name: str, v: Any, choices: tuple[str, ...] | list[str]) -> None:
    if v not in choices:
        raise ConfigError(f"{name}={v!r}: choose one of {', '.join(repr(c) for c in choices)}")


def _steps(name: str, v: Any, *, optional: bool = False) -> None:
    """Trainer step intervals: a float in (0, 1) is a fraction of the run, larger values whole steps."""
    _real(name, v, low=0, low_open=True, optional=optional)
    if v is not None and float(v) > 1 and not float(v).is_integer():
        raise ConfigError(f"{name}={v!r}: a value above 1 counts steps and must be whole (a value in (0, 1) is a "
                          "fraction of the run)")


def validate_config(cfg: Any) -> None:
    """Refuse a ``ShiQConfig`` whose fields are out of range or of the wrong type (:class:`ConfigError`).

    Called before ``TrainingArguments.__post_init__``; checks the ShiQ fields and the numeric
    ``TrainingArguments`` fields a run depends on (everything finite, rates > 0, counts integral).
    """
    from shiq_lab.data.formats import TRUNCATION_POLICIES
    from shiq_lab.lm.stats import LOGITS_MODES
    from shiq_lab.losses import LOSS_TYPES

    _choice("loss_type", cfg.loss_type, LOSS_TYPES)
    _real("beta", cfg.beta, low=0, low_open=True, why="the KL weight; inf would make every parameter NaN")
    _real("learning_rate", cfg.learning_rate, low=0, low_open=True,
          why="0 would train nothing; a negative rate ascends the loss")
    _real("value_head_learning_rate", cfg.value_head_learning_rate, low=0, low_open=True, optional=True)
    _integer("horizon", cfg.horizon, optional=True, extra=" (None = the full-path ShiQ loss)")
    if cfg.horizon is not None and cfg.loss_type != "shiq":
        raise ConfigError(f"horizon={cfg.horizon!r}: only for loss_type='shiq' (got {cfg.loss_type!r})")
    _choice("loss_reduction", cfg.loss_reduction, ("token", "sequence"))
    _choice("truncation", cfg.truncation, TRUNCATION_POLICIES)
    _choice("reward_normalization", cfg.reward_normalization, ("none", "zscore"))
    _choice("logits_mode", cfg.logits_mode, LOGITS_MODES)
    _integer("max_length", cfg.max_length)
    _integer("ref_batch_size", cfg.ref_batch_size)
    _integer("logits_chunk_size", cfg.logits_chunk_size, optional=True)
    _real("chosen_reward", cfg.chosen_reward)
    _real("rejected_reward", cfg.rejected_reward)
    for name in ("detach_bootstrap", "add_eos", "use_ref_cache", "overwrite_output_dir"):
        v = getattr(cfg, name, False)
        if not isinstance(v, bool):
            raise ConfigError(f"{name}={v!r}: must be true or false")
    # TrainingArguments fields that decide what is trained
    if not _is_int(cfg.max_steps) or not (cfg.max_steps == -1 or cfg.max_steps >= 1):
        raise ConfigError(f"max_steps={cfg.max_steps!r}: must be a whole number of steps >= 1, or -1 to train "
                          "num_train_epochs epochs")
    if cfg.max_steps == -1:
        _real("num_train_epochs", cfg.num_train_epochs, low=0, low_open=True)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _integer(name, getattr(cfg, name))
    _integer("seed", cfg.seed, low=None)
    _integer("data_seed", getattr(cfg, "data_seed", None), low=None, optional=True)
    _integer("save_total_limit", getattr(cfg, "save_total_limit", None), optional=True)
    _real("weight_decay", cfg.weight_decay, low=0)
    _real("max_grad_norm", cfg.max_grad_norm, low=0, optional=True, why="0 or None: no clipping")
    _real("adam_epsilon", cfg.adam_epsilon, low=0, low_open=True)
    for name in ("adam_beta1", "adam_beta2"):
        _real(name, getattr(cfg, name), low=0, high=1, high_open=True)
    _real("warmup_steps", cfg.warmup_steps, low=0, why="a fraction of the run below 1, else whole steps")
    _steps("logging_steps", cfg.logging_steps)
    _steps("save_steps", cfg.save_steps)
    _steps("eval_steps", getattr(cfg, "eval_steps", None), optional=True)


def validate_run(run: Any) -> None:
    """Refuse ``RunArguments`` (model, data, LoRA fields of the CLI) that are out of range (:class:`ConfigError`)."""
    if not isinstance(run.model, str) or not run.model.strip():
        raise ConfigError(f"model={run.model!r}: give a registered name (shiq-lab models list), a folder or a hub id")
    _choice("dtype", run.dtype, _DTYPES)
    _real("eval_fraction", run.eval_fraction, low=0, high=1, high_open=True,
          why="the fraction of prompts held out for evaluation")
    _integer("max_rows", run.max_rows, optional=True)
    _integer("lora_r", run.lora_r)
    _real("lora_alpha", run.lora_alpha, low=0, low_open=True)
    _real("lora_dropout", run.lora_dropout, low=0, high=1, high_open=True)
    if run.dataset_kwargs:
        try:
            kwargs = json.loads(run.dataset_kwargs)
        except json.JSONDecodeError as err:
            raise ConfigError(f"dataset_kwargs={run.dataset_kwargs!r}: not JSON ({err.msg} at character {err.pos}); "
                              "give a JSON object, e.g. '{\"n\": 64}', or a YAML mapping in the config") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"dataset_kwargs={run.dataset_kwargs!r}: must be a JSON object / YAML mapping of "
                              "keyword arguments")


def validate(run: Any, cfg: Any) -> None:
    """Both :func:`validate_run` and :func:`validate_config`."""
    validate_run(run)
    validate_config(cfg)
