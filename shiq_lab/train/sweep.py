"""One run of a sweep: train a (run type, beta) from the reference, evaluating the live policy as it goes.

Shared by the tasks' sweeps (IMDB, BFCL). A task passes its own settings object; :class:`SweepSettings` lists
what the runner reads from it.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from datasets import Dataset
from transformers import TrainerCallback

from shiq_lab.evaluation.generations import PolicyEval
from shiq_lab.infra.models import load_model
from shiq_lab.lm.modes import eval_mode
from shiq_lab.losses import PAIRWISE_LOSSES
from shiq_lab.train.config import ShiQConfig
from shiq_lab.train.progress import CompactPrinterCallback, SweepProgress

__all__ = ["FrontierCallback", "SweepSettings", "train_run"]


class SweepSettings(Protocol):
    """What :func:`train_run` reads from a task's config (``use_lora``, ``lora_r``, ``lora_alpha`` are optional)."""

    model: str
    dtype: str
    device: str
    samples_per_prompt: int
    eval_every: int
    save_models: bool


class FrontierCallback(TrainerCallback):
    """Evaluates the live policy every ``every`` steps and after the last one (a frontier point each)."""

    def __init__(self, every: int, evaluate: Callable[[torch.nn.Module], PolicyEval], *, on_point: Callable | None = None):
        self.every = every
        self.evaluate = evaluate
        self.on_point = on_point
        self.points: list[tuple[int, PolicyEval]] = []

    def _point(self, model: torch.nn.Module, step: int) -> None:
        if self.points and self.points[-1][0] == step:
            return
        with eval_mode(model):  # no dropout while sampling; every submodule gets its own mode back
            result = self.evaluate(model)
        self.points.append((step, result))
        if self.on_point is not None:
            self.on_point(step, result)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._point(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._point(model, state.global_step)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype={name!r}: choose float32, bfloat16 or float16") from None


def train_run(
    config: SweepSettings,
    training: ShiQConfig,
    loss_type: str,
    beta: float,
    dataset: Dataset,
    evaluate: Callable[[torch.nn.Module], PolicyEval],
    *,
    log: Callable[[str], None] = print,
    bar: Any = None,
) -> dict[str, Any]:
    """Train one (run type, beta) from the reference with :class:`~shiq_lab.train.trainer.ShiQTrainer`.

    ``loss_type="shiq_token"`` trains ShiQ on the dataset's ``token_rewards`` (its ``reward`` column
    is dropped); the other types drop ``token_rewards`` and train on ``reward``.

    ``bar``: a shared progress bar (tqdm) that this run advances by its steps.

    Returns ``{"points": [(step, PolicyEval)], "history": trainer log rows, "folder": run folder,
    "seconds": ...}``; writes ``run.json`` (and the final model when ``save_models``) into the folder.
    """
    from shiq_lab.train.trainer import ShiQTrainer

    folder = Path(training.output_dir) / f"{loss_type}-beta{beta:g}"
    folder.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = load_model(config.model, dtype=_dtype(config.dtype))
    token_level = loss_type == "shiq_token"
    if token_level:
        if "token_rewards" not in dataset.column_names:
            raise ValueError("loss type 'shiq_token' needs a dataset with a token_rewards column (add_token_rewards)")
        dataset = dataset.remove_columns(["reward"])
    elif "token_rewards" in dataset.column_names:
        dataset = dataset.remove_columns(["token_rewards"])
    responses = training.per_device_train_batch_size
    # a pairwise row is a whole prompt group: as many responses per step as the other losses see
    batch = max(1, responses // config.samples_per_prompt) if loss_type in PAIRWISE_LOSSES else responses
    args = dataclasses.replace(training, output_dir=str(folder), loss_type="shiq" if token_level else loss_type, beta=beta,
                               per_device_train_batch_size=batch, use_cpu=config.device == "cpu")
    callback = FrontierCallback(config.eval_every, evaluate, on_point=lambda s, r: log(
        f"   {loss_type:4s} beta={beta:<5g} step {s:4d}: reward {r.reward_mean:.3f}  KL {r.kl_states_mean:.3f}"))
    callbacks: list[TrainerCallback] = [callback]
    peft_config = None
    if getattr(config, "use_lora", False):  # other tasks' configs (BFCL) reuse this runner without the LoRA fields
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    start = time.perf_counter()
    if bar is not None:
        callbacks.append(SweepProgress(bar, folder.name))
    with warnings.catch_warnings():
        # cut responses are counted once per dataset by _run, not once per run
        warnings.filterwarnings("ignore", message=r"tokenize_dataset: \d+ of \d+ responses did not finish")
        trainer = ShiQTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=callbacks, peft_config=peft_config)
    trainer.remove_callback(CompactPrinterCallback)  # the per-step lines: the bar and the history have them
    trainer.train()
    seconds = time.perf_counter() - start
    if config.save_models:
        trainer.save_model(str(folder / "final"))
    history = [dict(row) for row in trainer.state.log_history if "loss" in row]
    (folder / "run.json").write_text(json.dumps({
        "model": config.model, "loss_type": loss_type, "beta": beta, "max_steps": training.max_steps,
        "seconds": round(seconds, 2), "history": history,
        # the z-scoring the trainer applied to the returns: per-token values in training units need it
        "reward_stats": trainer.reward_stats,
        "points": [{"step": s, **r.row()} for s, r in callback.points],
    }, indent=1))
    return {"points": callback.points, "history": history, "folder": folder, "seconds": seconds,
            "reward_stats": trainer.reward_stats}


