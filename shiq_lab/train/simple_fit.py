"""A minimal in-memory ShiQ fit of a causal LM on a few sequences (for notebooks and the explorer).

:func:`fit_sft` (maximum likelihood on the policy tokens) makes a reference that already puts mass
on the responses, as an SFT model does before RL fine-tuning; :func:`fit_shiq` then fits ShiQ.

One padded batch, full logits, AdamW, the full-path ShiQ loss of :mod:`shiq_lab.losses` against
reference numbers computed once before the first step (so the reference never runs again, as in
the offline setting of METHOD.md). It exists to show what a fit does to token values in seconds;
for real runs -- datasets, minibatches, chunked vocabulary, checkpoints, logging -- use the trainer
(:mod:`shiq_lab.train.trainer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from shiq_lab.data.inspect import Prompt, Response, encode_responses, pad_batch
from shiq_lab.losses import shiq_loss, token_logprobs
from shiq_lab.views.token_values import Rewards, eval_mode, resolve_rewards

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
            history.residual_abs_mean.append(metrics.get("residual_abs_mean", float("nan")))
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
    batch = pad_batch(encoded, _pad(tokenizer), next(model.parameters()).device)
    mask = batch.mask.bool()

    def nll() -> tuple[torch.Tensor, dict]:
        logp, _ = _logprobs(model, batch)
        return -logp[mask].mean(), {}

    return _adamw_loop(model, nll, steps=steps, lr=lr, weight_decay=weight_decay)


def _pad(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _logprobs(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
    return token_logprobs(logits, batch.actions)


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
    device = next(model.parameters()).device
    batch = pad_batch(encoded, _pad(tokenizer), device)
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
