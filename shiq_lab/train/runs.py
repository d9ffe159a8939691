"""Runs are never lost or mixed: output folders, valid checkpoints and run fingerprints (issue 12).

A run folder (``output_dir``) holds ``shiq_run.json``, the *run record*: the fields that decide
what is trained (loss, beta, optimiser, data, model, ...) and their sha256, the fingerprint. Every
checkpoint gets a copy, so a copied checkpoint still says which run it belongs to.

- :func:`preflight` (the CLI calls it before loading a model): the folder is writable; a fresh run
  into a folder that holds another run's outputs is refused, with the fixes (a new ``output_dir``,
  ``--resume_from_checkpoint last``, ``--overwrite_output_dir true``); a resume takes the newest
  *valid* checkpoint (:func:`last_valid_checkpoint`: one a SIGKILL left empty, without or with a
  truncated ``trainer_state.json``, is skipped with a warning) and must belong to this run's config
  (:func:`check_checkpoint`: the differing fields are named).
- :func:`begin` (``ShiQTrainer.train`` calls it): the same resume checks, then the actions: an
  overwrite deletes the old run's checkpoints and log, a resume removes the broken checkpoints
  newer than the one it resumes (they would be mixed into by the next save), and the record is
  written. The Python API does not refuse a folder holding another run (sweeps and notebooks
  retrain into their own folders); it warns when that folder holds another run's checkpoints.
- :func:`whole_run_loss`: after a resume, ``TrainOutput.training_loss`` is the mean over the whole
  run (the steps before the checkpoint come from its log history), not over the resumed segment.

``max_steps`` / ``num_train_epochs`` are recorded but may differ on resume (extending a run), except
that a checkpoint past ``max_steps`` is refused (it belongs to a longer run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from shiq_lab.errors import RunDirectoryError

__all__ = ["RUN_FILE", "run_record", "run_fields", "read_record", "record_diff", "checkpoint_problem",
           "checkpoint_step", "list_checkpoints", "last_valid_checkpoint", "resolve_resume", "check_checkpoint",
           "run_outputs", "check_output_dir", "check_writable", "preflight", "begin", "whole_run_loss",
           "RunRecordCallback"]

logger = logging.getLogger(__name__)

RUN_FILE = "shiq_run.json"
RECORD_VERSION = 1
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")
#: files of a finished or running run; a folder holding any of them (or a checkpoint) holds a run
_OUTPUT_FILES = _WEIGHTS + ("log_history.json", TRAINER_STATE)

#: ShiQConfig / TrainingArguments fields that decide the trained weights (the fingerprint covers them)
_CONFIG_FIELDS = (
    "loss_type", "beta", "horizon", "detach_bootstrap", "loss_reduction", "max_length", "truncation", "add_eos",
    "reward_normalization", "chosen_reward", "rejected_reward", "reference_id", "value_head_learning_rate",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "neftune_noise_alpha", "seed",
    "data_seed", "dataloader_drop_last", "cast_lm_head_to_fp32",
)
#: recorded, but a resume may change them (training a run further)
_EXTENDABLE = ("max_steps", "num_train_epochs")


def _implied_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """What a record written before a field existed implies for it (read as the behaviour of that version).

    ``cast_lm_head_to_fp32``: before it, the output layer ran in fp32 under bf16 / fp16 (the new default is the
    autocast dtype), so a resume of such a run with the default would change its precision silently.
    """
    implied = {}
    if "cast_lm_head_to_fp32" not in fields and (fields.get("bf16") or fields.get("fp16")):
        implied["cast_lm_head_to_fp32"] = True
    return implied


# ---------------------------------------------------------------------------------------------
# run records
# ---------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """A JSON-comparable form of a config value (enums by value, JSON strings parsed)."""
    if hasattr(v, "value") and not isinstance(v, (int, float, str)):
        v = v.value
    return json.loads(json.dumps(v, default=str, sort_keys=True))


def run_fields(run: Any) -> dict[str, Any]:
    """The CLI's ``RunArguments`` as record fields (``dataset_kwargs`` parsed, so key order does not matter)."""
    fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
    if isinstance(fields.get("dataset_kwargs"), str):
        try:
            fields["dataset_kwargs"] = json.loads(fields["dataset_kwargs"])
        except json.JSONDecodeError:
            pass
    return fields


def run_record(cfg: Any, extra: dict[str, Any] | None = None, *, train_dataset: Any = None) -> dict[str, Any]:
    """The record of a run: the fields that decide its weights, their fingerprint, and ``max_steps``.

    ``extra``: more fields (the CLI's model and data fields, :func:`run_fields`). ``train_dataset``:
    a tokenised dataset, whose token fingerprint is recorded too (skipped when it cannot be computed).
    """
    fields = {name: _plain(getattr(cfg, name)) for name in _CONFIG_FIELDS if hasattr(cfg, name)}
    fields.update({k: _plain(v) for k, v in (extra or {}).items()})
    if train_dataset is not None:
        try:
            from shiq_lab.reference.cache import dataset_fingerprint

            fields["train_data"] = dataset_fingerprint(train_dataset)
        except Exception:  # noqa: BLE001 - grouped (pairwise) rows or raw data: no token fingerprint
            pass
    blob = json.dumps(fields, sort_keys=True).encode()
    return {"version": RECORD_VERSION, "fingerprint": hashlib.sha256(blob).hexdigest()[:16], "fields": fields,
            "extendable": {k: _plain(getattr(cfg, k)) for k in _EXTENDABLE if hasattr(cfg, k)}}


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run record in ``folder`` (None when there is none or it is unreadable)."""
    path = Path(folder) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fields"), dict) else None


def record_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: A there, B now"`` for every field both records have and that differs."""
    a, b = stored.get("fields", {}), current.get("fields", {})
    a = {**_implied_fields(a), **a}
    out = []
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            there = "a dataset with other tokens" if k == "train_data" else repr(a[k])
            now = "other tokens" if k == "train_data" else repr(b[k])
            out.append(f"{k}: {there} there, {now} now")
    return out


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{RUN_FILE}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / RUN_FILE)  # never a half-written record


class RunRecordCallback(TrainerCallback):
    """Writes the run record into every checkpoint, so a checkpoint says which run it belongs to."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            _write_record(folder, self.record)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a resumable checkpoint (None when it is one).

    ``Trainer`` writes ``trainer_state.json`` last, after the weights, optimizer and RNG states, so a
    checkpoint whose state file parses is complete; a SIGKILL during the save leaves it absent or cut.
    """
    path = Path(path)
    if not path.is_dir():
        return "does not exist" if not path.exists() else "is not a folder"
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"has no {TRAINER_STATE} (its save was interrupted)" if any(path.iterdir()) \
            else "is empty (its save was interrupted)"
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return f"has a damaged {TRAINER_STATE} (its save was interrupted)"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
        return f"has a damaged {TRAINER_STATE} (no global_step)"
    if not any((path / w).is_file() for w in _WEIGHTS):
        return "has no model weights"
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    """``global_step`` of a valid checkpoint."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["global_step"])


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, newest first (valid or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p.name) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))
             and p.is_dir()]
    return sorted(found, reverse=True)


def last_valid_checkpoint(folder: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The newest checkpoint that can be resumed; newer broken ones are skipped with a warning."""
    for _, path in list_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            logger.warning("skipping %s: it %s; resuming from an older checkpoint", path, problem)
    return None


def resolve_resume(resume: Any, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a ``resume_from_checkpoint`` value means: ``True`` / ``"last"`` = newest valid one in ``output_dir``."""
    if resume is None or resume is False:
        return None
    if isinstance(resume, str) and resume.strip().lower() in ("", "false", "none", "no"):
        return None
    if resume is True or (isinstance(resume, str) and resume.strip().lower() in ("true", "last")):
        ckpt = last_valid_checkpoint(output_dir)
        if ckpt is None:
            broken = [f"{p.name} {checkpoint_problem(p)}" for _, p in list_checkpoints(output_dir)]
            raise RunDirectoryError(
                f"resume_from_checkpoint={resume}: no checkpoint to resume in {output_dir}"
                + (f"; the checkpoint folders there are unusable: {'; '.join(broken)}" if broken
                   else " (no checkpoint-* folder)")
                + ". Drop --resume_from_checkpoint to start the run afresh, or point it at a checkpoint folder")
        return str(ckpt)
    problem = checkpoint_problem(resume)
    if problem is not None:
        valid = last_valid_checkpoint(Path(resume).parent, warn=False)
        raise RunDirectoryError(f"resume_from_checkpoint={resume}: that checkpoint {problem}"
                                + (f"; the newest valid one there is {valid}" if valid else "")
                                + " (or resume with --resume_from_checkpoint last)")
    return str(resume)


def check_checkpoint(checkpoint: str | os.PathLike, record: dict[str, Any], max_steps: int | None = None) -> None:
    """Refuse a checkpoint of another run: its record's fields differ from ``record``, or it is past ``max_steps``."""
    checkpoint = Path(checkpoint)
    stored = read_record(checkpoint) or read_record(checkpoint.parent)
    if stored is None:
        logger.warning("%s has no %s (written by an older shiq_lab or another tool): cannot check that it belongs "
                       "to this run's config", checkpoint, RUN_FILE)
    else:
        diff = record_diff(stored, record)
        if diff:
            raise RunDirectoryError(
                f"{checkpoint} belongs to another run: {'; '.join(diff)}. Resume with that run's config, or train "
                "this config into a new output_dir")
    step = checkpoint_step(checkpoint)
    if max_steps is not None and max_steps > 0 and step > max_steps:
        raise RunDirectoryError(f"{checkpoint} is at step {step}, past max_steps={max_steps}: it belongs to a longer "
                                "run. Raise max_steps, or train into a new output_dir")


# ---------------------------------------------------------------------------------------------
# output folders
# ---------------------------------------------------------------------------------------------


def run_outputs(folder: str | os.PathLike) -> list[str]:
    """Names of the run outputs in ``folder`` (checkpoints, weights, logs): empty when no run is there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [p.name for _, p in list_checkpoints(folder)]
    return sorted(names) + [n for n in _OUTPUT_FILES if (folder / n).exists()]


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write a probe file, so a read-only place fails before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".shiq-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirectoryError(f"output_dir {folder} is not writable ({err.strerror or err}): choose a writable "
                                "--output_dir") from None


def check_output_dir(folder: str | os.PathLike, record: dict[str, Any], *, resuming: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding another run's outputs (unless ``overwrite``)."""
    folder = Path(folder)
    outputs = run_outputs(folder)
    if not outputs or overwrite:
        return
    stored = read_record(folder)
    if resuming:
        diff = record_diff(stored, record) if stored is not None else []
        if not diff:
            return
        what = f"the outputs of another run ({'; '.join(diff)})"
    else:
        what = f"the outputs of {'another' if stored is None or record_diff(stored, record) else 'an earlier'} run"
    shown = ", ".join(outputs[:6]) + (", ..." if len(outputs) > 6 else "")
    raise RunDirectoryError(
        f"output_dir {folder} holds {what}: {shown}. Training into it would replace its model and log and mix "
        f"or delete its checkpoints. Either train into a new --output_dir, continue that run with "
        f"--resume_from_checkpoint last, or replace it with --overwrite_output_dir true")


def preflight(cfg: Any, extra: dict[str, Any] | None = None) -> str | None:
    """Every output-folder and resume check, before a model is loaded; returns the checkpoint to resume (or None)."""
    out = Path(cfg.output_dir)
    check_writable(out)
    resume = resolve_resume(cfg.resume_from_checkpoint, out)
    record = run_record(cfg, extra)
    if resume is not None:
        check_checkpoint(resume, record, cfg.max_steps)
    check_output_dir(out, record, resuming=resume is not None, overwrite=bool(getattr(cfg, "overwrite_output_dir", False)))
    return resume


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def begin(cfg: Any, record: dict[str, Any], resume: str | None) -> None:
    """Start a run in ``cfg.output_dir``: check the resume, clear what an overwrite replaces, write the record.

    Only the process that saves (``cfg.should_save``) changes files.
    """
    out = Path(cfg.output_dir)
    if resume is not None:
        check_checkpoint(resume, record, cfg.max_steps)
    if not getattr(cfg, "should_save", True):
        return
    if resume is not None:
        step = checkpoint_step(resume)
        for s, path in list_checkpoints(out):
            if s > step and checkpoint_problem(path) is not None:
                logger.warning("removing %s (%s): the resumed run will save that step again", path,
                               checkpoint_problem(path))
                _remove(path)
    elif not getattr(cfg, "overwrite_output_dir", False):
        # the Python API does not refuse (sweeps and notebooks retrain into their folders); it says so
        stored = read_record(out)
        if list_checkpoints(out) and (stored is None or record_diff(stored, record)):
            logger.warning("output_dir %s holds checkpoints of another run: this run's checkpoints will be mixed with "
                           "them (save_total_limit may delete them). Use a new output_dir, or overwrite_output_dir=True",
                           out)
    else:
        old = [p for _, p in list_checkpoints(out)] + [out / n for n in ("log_history.json", TRAINER_STATE, RUN_FILE)]
        old = [p for p in old if p.exists()]
        if old:
            logger.warning("overwrite_output_dir: deleting the earlier run's %s in %s", ", ".join(p.name for p in old), out)
            for p in old:
                _remove(p)
    _write_record(out, record)


def whole_run_loss(output: Any, log_history: list[dict[str, Any]], start_step: int) -> Any:
    """``TrainOutput`` whose ``training_loss`` is the whole run's mean loss, after a resume at ``start_step``.

    ``Trainer`` averages over the resumed segment only. The steps before the checkpoint are taken
    from its log history: each logged ``loss`` is the mean over the steps since the previous log.
    The final ``train_loss`` entry of ``log_history`` is corrected in place.
    """
    if start_step <= 0:
        return output
    segment = output.global_step - start_step
    earlier = sorted((h for h in log_history if "loss" in h and "step" in h and h["step"] <= start_step),
                     key=lambda h: h["step"])
    total, covered = 0.0, 0
    for h in earlier:
        total += float(h["loss"]) * (h["step"] - covered)
        covered = h["step"]
    steps = covered + segment
    if steps <= 0:
        return output
    loss = (total + output.training_loss * segment) / steps
    for h in reversed(log_history):
        if "train_loss" in h:
            h["train_loss"] = loss
            break
    metrics = {**output.metrics, "train_loss": loss} if output.metrics else output.metrics
    return output._replace(training_loss=loss, metrics=metrics)
