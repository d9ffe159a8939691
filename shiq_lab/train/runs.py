"""One training run of a sweep, evaluated along the way: the runner the task sweeps share.

:func:`train_run` trains one (loss type, beta) from the reference with :class:`~shiq_lab.train.trainer.ShiQTrainer`
and evaluates the live policy every ``config.eval_every`` steps and after the last one
(:class:`FrontierCallback`). ``config`` is a task's sweep config: it needs ``model``, ``dtype``, ``device``,
``samples_per_prompt`` (responses per prompt group: pairwise losses take whole groups), ``eval_every`` and
``save_models``; ``evaluate(policy)`` returns anything with ``reward_mean``, ``kl_states_mean`` and ``row()``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from shiq_lab.infra.models import load_model
from shiq_lab.losses import PAIRWISE_LOSSES
from shiq_lab.train.config import ShiQConfig

__all__ = ["FrontierCallback", "RunSettings", "torch_dtype", "train_run"]


class RunSettings(Protocol):
    """What :func:`train_run` reads of a task's sweep config."""

    model: str
    dtype: str
    device: str
    samples_per_prompt: int
    eval_every: int
    save_models: bool


class FrontierCallback(TrainerCallback):
    """Evaluates the live policy every ``every`` steps and after the last one (a frontier point each)."""

    def __init__(self, every: int, evaluate: Callable[[torch.nn.Module], Any], *, on_point: Callable | None = None):
        self.every = every
        self.evaluate = evaluate
        self.on_point = on_point
        self.points: list[tuple[int, Any]] = []

    def _point(self, model: torch.nn.Module, step: int) -> None:
        if self.points and self.points[-1][0] == step:
            return
        was_training = model.training
        result = self.evaluate(model)
        model.train(was_training)
        self.points.append((step, result))
        if self.on_point is not None:
            self.on_point(step, result)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._point(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._point(model, state.global_step)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype={name!r}: choose float32, bfloat16 or float16") from None


def train_run(
    config: RunSettings,
    training: ShiQConfig,
    loss_type: str,
    beta: float,
    dataset: Dataset,
    evaluate: Callable[[torch.nn.Module], Any],
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one (loss type, beta) from the reference with :class:`~shiq_lab.train.trainer.ShiQTrainer`.

    Returns ``{"points": [(step, PolicyEval)], "history": trainer log rows, "folder": run folder,
    "seconds": ...}``; writes ``run.json`` (and the final model when ``save_models``) into the folder.
    """
    from shiq_lab.train.trainer import ShiQTrainer

    folder = Path(training.output_dir) / f"{loss_type}-beta{beta:g}"
    folder.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = load_model(config.model, dtype=torch_dtype(config.dtype))
    responses = training.per_device_train_batch_size
    # a pairwise row is a whole prompt group: as many responses per step as the other losses see
    batch = max(1, responses // config.samples_per_prompt) if loss_type in PAIRWISE_LOSSES else responses
    args = dataclasses.replace(training, output_dir=str(folder), loss_type=loss_type, beta=beta,
                               per_device_train_batch_size=batch, use_cpu=config.device == "cpu")
    callback = FrontierCallback(config.eval_every, evaluate, on_point=lambda s, r: log(
        f"   {loss_type:4s} beta={beta:<5g} step {s:4d}: reward {r.reward_mean:.3f}  KL {r.kl_states_mean:.3f}"))
    start = time.perf_counter()
    trainer = ShiQTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the per-step dicts: they are in the returned history
    trainer.train()
    seconds = time.perf_counter() - start
    if config.save_models:
        trainer.save_model(str(folder / "final"))
    history = [dict(row) for row in trainer.state.log_history if "loss" in row]
    (folder / "run.json").write_text(json.dumps({
        "model": config.model, "loss_type": loss_type, "beta": beta, "max_steps": training.max_steps,
        "seconds": round(seconds, 2), "history": history,
        "points": [{"step": s, **r.row()} for s, r in callback.points],
    }, indent=1))
    return {"points": callback.points, "history": history, "folder": folder, "seconds": seconds}
