"""A minimal in-memory ShiQ fit of a causal LM on a few sequences (for notebooks and the explorer).

:func:`fit_sft` (maximum likelihood on the policy tokens) makes a reference that already puts mass
on the responses, as an SFT model does before RL fine-tuning; :func:`fit_shiq` then fits ShiQ.

One padded batch, AdamW, the full-path ShiQ loss of :mod:`shiq_lab.losses` against
reference numbers computed once before the first step (so the reference never runs again, as in
the offline setting of METHOD.md). It exists to show what a fit does to token values in seconds;
for real runs -- datasets, minibatches, checkpoints, logging -- use the trainer
(:mod:`shiq_lab.train.trainer`). The per-token statistics are the trainer's own
(:func:`shiq_lab.lm.stats.token_stats`, chunked over the vocabulary), for the policy and the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from shiq_lab.data.batch import batch_responses, pad_token_id
from shiq_lab.data.encode import Prompt, Response, encode_responses
from shiq_lab.lm.modes import device_of, eval_mode
from shiq_lab.lm.stats import action_positions, token_stats
from shiq_lab.losses import shiq_loss
from shiq_lab.views.token_values import Rewards, resolve_rewards

__all__ = ["FitHistory", "fit_sft", "fit_shiq"]


@dataclass
class FitHistory:
    """Loss and mean |residual| after each step (the first entries are the starting point)."""

    loss: list[float] = field(default_factory=list)
    residual_abs_mean: list[float] = field(default_factory=list)


def _adamw_loop(model: torch.nn.Module, loss_fn, *, steps: int, lr: float, weight_decay: float) -> FitHistory:
    """``steps`` AdamW updates of ``loss_fn() -> (loss, metrics)``; history has steps + 1 entries."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = FitHistory()
    was_training = model.training
    model.train()
    try:
        for step in range(steps + 1):
            loss, metrics = loss_fn()
            history.loss.append(float(loss.detach()))
            history.residual_abs_mean.append(float(metrics.get("residual_abs_mean", float("nan"))))
            if step == steps:
                break  # the last entry is the loss after the final update
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return history


def fit_sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt | Sequence[Prompt],
    responses: Response | Sequence[Response],
    *,
    steps: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    add_eos: bool = False,
) -> FitHistory:
    """Maximum likelihood (mean negative log-likelihood of the policy tokens) on the responses, in place."""
    encoded = encode_responses(tokenizer, prompt, responses, add_eos=add_eos)
    batch = batch_responses(encoded, pad_token_id(tokenizer), device_of(model))
    mask = batch.mask.to(torch.float32)

    def nll() -> tuple[torch.Tensor, dict]:
        logp, _ = _logprobs(model, batch)
        return -(logp * mask).sum() / mask.sum(), {}

    return _adamw_loop(model, nll, steps=steps, lr=lr, weight_decay=weight_decay)


def _logprobs(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, logz)`` [B, T-1] of the policy tokens (0 elsewhere), in the batch's layout (column t = action t+1)."""
    action_mask = torch.nn.functional.pad(batch.mask, (1, 0))  # aligned to input_ids, as token_stats wants
    positions = action_positions(action_mask.cpu())
    logp, logz = token_stats(model, batch.input_ids, batch.attention_mask, action_mask, positions=positions)
    return logp[:, 1:], logz[:, 1:]


def fit_shiq(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt | Sequence[Prompt],
    responses: Response | Sequence[Response],
    *,
    rewards: Rewards,
    beta: float,
    steps: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    horizon: int | None = None,
    reference: torch.nn.Module | None = None,
    add_eos: bool = False,
) -> FitHistory:
    """Fit ``model`` in place with the ShiQ loss on the given responses and token rewards.

    ``reference`` (default: ``model`` as it is before the first step) gives ln pi_ref and
    logsumexp l_ref once, without gradient. Rewards take any form :func:`token_values` accepts.
    Returns the loss per step (entry 0 is the loss before training).
    """
    encoded = encode_responses(tokenizer, prompt, responses, add_eos=add_eos)
    reward_rows = resolve_rewards(rewards, encoded)
    device = device_of(model)
    batch = batch_responses(encoded, pad_token_id(tokenizer), device)
    r = torch.zeros(batch.mask.shape, dtype=torch.float32, device=device)
    for b, (e, rew) in enumerate(zip(encoded, reward_rows)):
        r[b, e.start - 1 : e.start - 1 + e.n_rows] = torch.as_tensor(rew, dtype=torch.float32, device=device)

    ref_model = reference if reference is not None else model
    with torch.no_grad(), eval_mode(ref_model):
        ref_logp, ref_logz = _logprobs(ref_model, batch)

    def loss() -> tuple[torch.Tensor, dict]:
        logp, logz = _logprobs(model, batch)
        out = shiq_loss(logp, logz, ref_logp, ref_logz, r, batch.mask, beta=beta, horizon=horizon)
        return out.loss, out.metrics

    return _adamw_loop(model, loss, steps=steps, lr=lr, weight_decay=weight_decay)
