"""Training you can watch: compact log lines, one progress bar over a sweep, TensorBoard run folders.

- :func:`format_logs` turns a Trainer log dict into one short line (``step 12/40  loss 0.123  kl 0.56 ...``).
- :class:`CompactProgressCallback` / :class:`CompactPrinterCallback` replace transformers' progress and
  printer callbacks: the same bar, but one short line per logging step written above it (not a dict
  tangled with the bar). :class:`~shiq_lab.trainer.ShiQTrainer` installs them (:func:`install`).
- :class:`SweepProgress` advances one shared bar (``tqdm.auto``: a widget in notebooks) over runs x steps.
- :func:`install` also points TensorBoard at the run's own folder, so ``tensorboard --logdir runs/`` names
  each run by its path (``imdb_sweep_tiny/shiq-beta0.1``) instead of a timestamp.
"""

from __future__ import annotations

import math
import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["format_logs", "CompactProgressCallback", "CompactPrinterCallback", "SweepProgress", "install", "run_name",
           "quiet_library_bars"]

# the keys worth a glance, in this order; everything else stays in log_history / TensorBoard
_SHOWN = ("loss", "eval_loss", "kl", "eval_kl", "logratio", "reward", "grad_norm", "learning_rate", "tokens_per_second")
_SHORT = {"learning_rate": "lr", "tokens_per_second": "tok/s", "grad_norm": "|g|"}


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def format_logs(logs: dict[str, Any], step: int | None = None, max_steps: int | None = None) -> str:
    """One short line of the metrics that matter: ``step 3/40  loss 0.6931  kl 0  lr 1.00e-03``."""
    parts = []
    if step is not None:
        parts.append(f"step {step}/{max_steps}" if max_steps else f"step {step}")
    for key in _SHOWN:
        value = logs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{_SHORT.get(key, key)} {_number(float(value))}")
    if "train_runtime" in logs:
        parts.append(f"done in {float(logs['train_runtime']):.1f} s")
    return "  ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with one compact line per logging step written above it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_logs(logs, state.global_step, state.max_steps))


class CompactPrinterCallback(PrinterCallback):
    """No bar (``disable_tqdm``): one compact line per logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_logs(logs, state.global_step, state.max_steps), flush=True)


class SweepProgress(TrainerCallback):
    """Advances one bar shared by every run of a sweep; the postfix names the run and its last loss."""

    def __init__(self, bar: Any, name: str):
        self.bar = bar
        self.name = name
        self._step = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self._step)
        self._step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix_str(f"{self.name} loss {_number(float(logs['loss']))}", refresh=False)


def run_name(args: Any) -> str:
    """``<loss_type>-beta<beta>`` (``shiq-beta0.1``): the name a run's folder and TensorBoard use."""
    return f"{getattr(args, 'loss_type', 'run')}-beta{getattr(args, 'beta', float('nan')):g}"


def install(trainer: Any) -> None:
    """Compact log lines instead of dicts, and TensorBoard events in the run's ``output_dir``."""
    handler = trainer.callback_handler
    for old, new in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        if any(type(cb) is old for cb in handler.callbacks):
            trainer.remove_callback(old)
            trainer.add_callback(new)
    for cb in handler.callbacks:
        # TENSORBOARD_LOGGING_DIR, when set, still wins (the callback read it already)
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", "") is None:
            cb.logging_dir = os.fspath(trainer.args.output_dir)


class quiet_library_bars:
    """Within the block, no per-call bars from ``datasets`` (Map, Saving) or ``transformers`` (Loading weights).

    A sweep loads and saves models and maps datasets once per run; those bars would bury its own.
    """

    def __enter__(self) -> quiet_library_bars:
        import datasets.utils.logging as dlog
        import transformers.utils.logging as tlog

        self._datasets_on = dlog.is_progress_bar_enabled()
        self._transformers_on = tlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        import datasets.utils.logging as dlog
        import transformers.utils.logging as tlog

        if self._datasets_on:
            dlog.enable_progress_bar()
        if self._transformers_on:
            tlog.enable_progress_bar()
