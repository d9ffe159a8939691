"""The ShiQ loss family and its baselines, on per-token tensors (METHOD.md steps 1-4 and baselines).

Conventions shared by every loss here:

- Tensors are ``[B, T]`` with ``logits[:, t]`` the state *before* action t (already shifted for a
  causal LM). ``mask`` is 1 on tokens the policy generated and 0 on prompt, padding and
  environment (user / tool) tokens. Values outside the mask may be garbage: they never reach a
  result, not even as NaN.
- Losses are in reward units (residuals are rewards minus implied rewards, not divided by beta)
  and averaged over response tokens (``reduction="token"``) unless said otherwise.
- Environment tokens (mask 0 between policy tokens) add no log-ratio and no reward term: the value
  "bridges" from one policy token to the next.
- Everything is computed in fp32 (or fp64 when given fp64), whatever the logits' dtype.

The public names ``token_logprobs`` and ``shiq_loss`` and their signatures are fixed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "LossOutput",
    "LossSpec",
    "LOSSES",
    "PairRule",
    "Unit",
    "is_pairwise",
    "response_pairs",
    "soft_dpo_loss",
    "trusted_inputs",
    "checks_values",
    "token_logprobs",
    "shiq_loss",
    "naive_q_loss",
    "scoring_loss",
    "sequence_logratio",
    "dpo_loss",
    "dro_loss",
    "copg_loss",
    "shiq_logit_grad",
    "LOSS_TYPES",
    "PAIRWISE_LOSSES",
]

#: what a metric is a mean over: response tokens, sequences (rows) or pairs of rows
Unit = Literal["token", "sequence", "pair"]
#: how rows answering one prompt are paired: every unordered pair, (better, worse) by return, or a seeded cycle
PairRule = Literal["all", "preference", "cycle"]


@dataclass(frozen=True)
class LossSpec:
    """One loss type: its level, how it pairs rows (None: it does not), and whether ShiQTrainer trains it."""

    name: str
    level: Literal["token", "sequence"]
    pairing: PairRule | None
    description: str
    in_trainer: bool = True

    @property
    def pairwise(self) -> bool:
        return self.pairing is not None


#: the one registry of loss types; every caller (trainer, task sweeps, the synthetic suite, reports) reads it
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("shiq", "token", None, "ShiQ: squared shifted Bellman residuals on every response token"),
    LossSpec("dpo", "sequence", "preference", "DPO on (chosen, rejected) pairs ordered by return"),
    LossSpec("dpo_bt", "sequence", "cycle", "DPO against Bradley-Terry soft labels sigmoid(R - R') (diagnostic)",
             in_trainer=False),
    LossSpec("dro", "sequence", None, "DRO with a learned value V_phi(x) of the prompt"),
    LossSpec("copg", "sequence", "all", "CoPG on pairs of responses to one prompt"),
)}

#: the loss types ShiQTrainer accepts (``ShiQConfig.loss_type``)
LOSS_TYPES = tuple(name for name, spec in LOSSES.items() if spec.in_trainer)
#: the trainer's loss types trained on pairs of responses to one prompt (their rows are whole prompt groups)
PAIRWISE_LOSSES = tuple(name for name in LOSS_TYPES if LOSSES[name].pairwise)


def is_pairwise(name: str) -> bool:
    """Whether loss ``name`` learns from pairs of responses to one prompt (see :data:`LOSSES`)."""
    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: choose one of {sorted(LOSSES)}")
    return LOSSES[name].pairwise


@dataclass
class LossOutput:
    """Result of a loss: scalar ``loss``, ``residuals`` [B, T] (0 off the mask) and ``metrics``.

    Token-level losses put the Bellman residual delta_t on every response token. Sequence-level
    losses (DPO, DRO, CoPG) put each sequence's own term on its last response token.

    ``metrics`` are detached 0-d tensors (no host synchronisation; :meth:`floats` converts them
    once). ``metric_reduction`` says what each metric is a mean over (:data:`Unit`), so a caller
    averaging metrics over batches or processes weights each by that unit's count.
    """

    loss: torch.Tensor
    residuals: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_reduction: dict[str, Unit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted(set(self.metrics) - set(self.metric_reduction))
        if missing:
            raise ValueError(f"metrics {missing} have no entry in metric_reduction: say what each is a mean over")

    def floats(self) -> dict[str, float]:
        """The metrics as Python floats (one host synchronisation for all of them)."""
        if not self.metrics:
            return {}
        values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in self.metrics.values()]).tolist()
        return dict(zip(self.metrics, values))


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A metric: detached (a graph-carrying loss must not keep its graph alive through logging)."""
    return t.detach()


_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("shiq_lab_trusted_inputs", default=False)


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the input checks that read tensor values (and so synchronise with the device).

    Inside, the losses here and :func:`shiq_lab.lm.kernel.chunked_token_logprobs` check shapes and
    dtypes only: masks being 0/1, rows having a response token, finite rewards, token ids and pair
    indices in range are the caller's promise. ShiQTrainer validates its datasets once and trains
    inside this context, so a training step makes no host synchronisation.
    """
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def checks_values() -> bool:
    """False inside :func:`trusted_inputs`."""
    return not _TRUSTED.get()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def token_logprobs(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(a_t|s_t) and log-partition logsumexp_a l(s_t, a).

    Args:
        logits: [B, T, V] logits of the state before each action, any float dtype.
        actions: [B, T] long token ids (any value where the position is padding, as long as it is
            a valid id; use 0 for padding).

    Returns:
        ``(logp, logz)``, both [B, T] in fp32 (fp64 for fp64 logits).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if actions.shape != logits.shape[:2]:
        raise ValueError(
            f"actions shape {tuple(actions.shape)} does not match logits' [B, T] {tuple(logits.shape[:2])}"
        )
    if actions.dtype != torch.long:
        raise TypeError(f"actions must be torch.long token ids, got {actions.dtype}")
    logits = logits.to(_compute_dtype(logits))
    logz = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return chosen - logz, logz


def _check(beta: float, mask: torch.Tensor, rewards: torch.Tensor | None = None, **tensors: torch.Tensor) -> torch.Tensor:
    """Validate per-token inputs; returns the boolean mask."""
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta={beta!r}: must be a number > 0 (it is the KL weight)")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in {**tensors, **({"rewards": rewards} if rewards is not None else {})}.items():
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}: all per-token inputs must be [B, T]")
    bmask = mask.bool()
    if not checks_values():
        return bmask
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must hold only 0 and 1 (1 on tokens the policy generated)")
    empty = ~bmask.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"mask rows {rows} have no response token: drop those examples (an empty response has nothing to learn)")
    if rewards is not None:
        bad = bmask & ~torch.isfinite(rewards)
        if bool(bad.any()):
            b, t = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"rewards[{b}, {t}] is {rewards[b, t].item()} on a response token: rewards must be finite (fix or drop the example)")
    return bmask


def _next_policy_index(bmask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the index of the n-th next policy token and whether it exists.

    Policy tokens are ranked by an inclusive cumulative sum of the mask; the token of rank
    ``rank_t + n`` is where an n-step sum stops and its bootstrap is read. Environment tokens are
    skipped, which is what lets the value bridge across them.
    """
    T = bmask.shape[1]
    rank = torch.cumsum(bmask.long(), dim=1)  # 1-based rank of each policy token
    count = rank[:, -1:]
    # positions of policy tokens in order, then the others (stable keeps their order)
    order = torch.argsort((~bmask).to(torch.int8), dim=1, stable=True)
    target = rank + n  # rank of the bootstrap token
    exists = target <= count
    idx = order.gather(1, (target - 1).clamp(max=T - 1))
    return idx, exists


def shiq_loss(
    logp: torch.Tensor,
    logz: torch.Tensor,
    ref_logp: torch.Tensor,
    ref_logz: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    horizon: int | None = None,
    detach_bootstrap: bool = False,
    reduction: str = "token",
) -> LossOutput:
    """The ShiQ loss: squared shifted Bellman residuals (METHOD.md steps 3-4).

    With ``dV(s) = logz - ref_logz`` (0 at terminal) and ``lr = logp - ref_logp``::

        delta_t = beta*dV(s_t) + sum_{k>=t, k<t+n} (beta*lr_k - r_k) - beta*dV(s_{t+n})

    where k runs over policy tokens only. ``horizon=None`` sums to the end of the response (the
    full path, no bootstrap: the ShiQ loss), ``horizon=n`` stops after n policy tokens and
    bootstraps, ``horizon=1`` is the one-step shifted loss. A response with no EOS is treated as
    terminal after its last token (the data layer warns about it).

    Args:
        logp, logz: [B, T] policy log-prob of the action and log-partition (:func:`token_logprobs`).
        ref_logp, ref_logz: the same two numbers for the reference (precomputable, no grad).
        rewards: [B, T] token rewards; a sequence score sits on the last response token.
        mask: [B, T] 1 on tokens the policy generated.
        beta: KL weight, > 0.
        horizon: None for the full path, else the number of policy tokens before the bootstrap.
        detach_bootstrap: stop the gradient through the bootstrap value (target-network style);
            only meaningful when ``horizon`` is set.
        reduction: ``"token"`` (mean over response tokens) or ``"sequence"`` (mean over
            sequences of each sequence's mean).

    Returns:
        :class:`LossOutput` with ``loss = mean delta_t^2`` and the residuals delta_t.
    """
    bmask = _check(beta, mask, rewards, logp=logp, logz=logz, ref_logp=ref_logp, ref_logz=ref_logz)
    if horizon is not None and (not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"horizon={horizon!r}: use None (full path) or an int >= 1")
    if reduction not in ("token", "sequence"):
        raise ValueError(f"reduction={reduction!r}: choose 'token' or 'sequence'")
    dt = _compute_dtype(logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    logp, logz, ref_logp, ref_logz, rewards = (x.to(dt) for x in (logp, logz, ref_logp, ref_logz, rewards))

    dv = torch.where(bmask, logz - ref_logz, zero)
    per_tok = torch.where(bmask, beta * (logp - ref_logp) - rewards, zero)
    # reverse cumulative sum: tail[t] = sum_{k>=t} per_tok[k]
    tail = per_tok.flip(1).cumsum(1).flip(1)
    delta = beta * dv + tail
    if horizon is not None:
        idx, exists = _next_policy_index(bmask, horizon)
        boot_dv = dv.detach() if detach_bootstrap else dv
        cut = tail.gather(1, idx) + beta * boot_dv.gather(1, idx)
        delta = delta - torch.where(exists, cut, zero)
    delta = torch.where(bmask, delta, zero)

    sq = delta.square()
    n_tok = bmask.sum(1)
    if reduction == "token":
        loss = sq.sum() / n_tok.sum()
    else:
        loss = (sq.sum(1) / n_tok).mean()

    with torch.no_grad():
        lr = torch.where(bmask, logp - ref_logp, zero)
        first = bmask.long().argmax(1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        metrics = {
            "loss": loss.detach(),
            "residual_abs_mean": delta.abs().sum() / n_tok.sum(),
            "first_residual_abs_mean": delta[rows, first].abs().mean(),
            "logratio_seq_mean": lr.sum(1).mean(),
            "value_first_mean": beta * dv[rows, first].mean(),
            "reward_seq_mean": torch.where(bmask, rewards, zero).sum(1).mean(),
        }
    loss_unit: Unit = "token" if reduction == "token" else "sequence"
    units: dict[str, Unit] = {"loss": loss_unit, "residual_abs_mean": "token", "first_residual_abs_mean": "sequence",
                              "logratio_seq_mean": "sequence", "value_first_mean": "sequence",
                              "reward_seq_mean": "sequence"}
    return LossOutput(loss, delta, metrics, units)


def shiq_logit_grad(
    logits: torch.Tensor, actions: torch.Tensor, residuals: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Closed-form gradient of ``sum_t delta_t^2`` (full-path ShiQ) with respect to the logits.

    ``2*beta*[S_t*onehot(a_t) - (S_t - delta_t)*softmax(l_t)]`` with ``S_t = sum_{u<=t} delta_u``
    (METHOD.md, tensor form). Divide by the number of response tokens for the mean loss. It is what
    a chunked kernel computes without a [B, T, V] fp32 tensor; here it serves as a check.
    """
    dt = _compute_dtype(logits)
    bmask = mask.bool()
    delta = torch.where(bmask, residuals.to(dt), 0.0)
    s = delta.cumsum(1)
    soft = torch.softmax(logits.to(dt), dim=-1)
    onehot = torch.nn.functional.one_hot(actions, logits.shape[-1]).to(dt)
    grad = 2 * beta * (s[..., None] * onehot - (s - delta)[..., None] * soft)
    return torch.where(bmask[..., None], grad, 0.0)


def _bootstrap_next(values: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
    """[B, T] value of the next policy state (0 after the last policy token)."""
    idx, exists = _next_policy_index(bmask, 1)
    return torch.where(exists, values.gather(1, idx), torch.zeros((), dtype=values.dtype, device=values.device))


def _mean_sq(delta: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
    return delta.square().sum() / bmask.sum()


def naive_q_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Step 1 ablation: the logits *are* q, regressed on the soft-Bellman target.

    ``delta_t = l(s_t, a_t) - r_t - sg[v(s_{t+1})]``, ``v(s) = beta*ln sum_a pi_ref(a|s) exp(l(s,a)/beta)``,
    with a stop-gradient target (the "target copy"). Sampling from it needs pi_ref, the model and
    beta together, and at initialisation (l = l_ref, r = 0) the residual is not 0: the logits'
    free per-state offset is part of the regression target. Needs the full reference logits.
    """
    bmask = _check(beta, mask, rewards, actions=actions)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}")
    dt = _compute_dtype(logits)
    lg = logits.to(dt)
    q_taken = lg.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        v = beta * torch.logsumexp(torch.log_softmax(ref_logits.to(dt), -1) + lg / beta, dim=-1)
    delta = q_taken - rewards.to(dt) - _bootstrap_next(v, bmask)
    delta = torch.where(bmask, delta, torch.zeros((), dtype=dt, device=lg.device))
    loss = _mean_sq(delta, bmask)
    return LossOutput(loss, delta, {"loss": _scalar(loss), "residual_abs_mean": _scalar(delta.abs().sum() / bmask.sum())},
                      {"loss": "token", "residual_abs_mean": "token"})


def scoring_loss(
    logp: torch.Tensor,
    logz: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Step 2 ablation: the logits are the scoring function g, without the shift.

    ``delta_t = beta*(l(s_t,a_t) - ln pi_ref(a_t|s_t) - sg[logsumexp l(s_{t+1}, .)]) - r_t`` in reward
    units, with ``l(s_t, a_t) = logp + logz``. Its fixed point samples by a plain softmax, but at
    initialisation (l = l_ref, r = 0) the residual is ``beta*(V_ref(s_t) - V_ref(s_{t+1}))``, not 0.
    """
    bmask = _check(beta, mask, rewards, logp=logp, logz=logz, ref_logp=ref_logp)
    dt = _compute_dtype(logp)
    logp, logz, ref_logp, rewards = (x.to(dt) for x in (logp, logz, ref_logp, rewards))
    g_taken = logp + logz
    delta = beta * (g_taken - ref_logp - _bootstrap_next(logz.detach(), bmask)) - rewards
    delta = torch.where(bmask, delta, torch.zeros((), dtype=dt, device=logp.device))
    loss = _mean_sq(delta, bmask)
    return LossOutput(loss, delta, {"loss": _scalar(loss), "residual_abs_mean": _scalar(delta.abs().sum() / bmask.sum())},
                      {"loss": "token", "residual_abs_mean": "token"})


def sequence_logratio(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sum over response tokens of ln pi(a_t|s_t) - ln pi_ref(a_t|s_t)."""
    dt = _compute_dtype(logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    return torch.where(mask.bool(), logp.to(dt) - ref_logp.to(dt), zero).sum(1)


def _on_last_token(values: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
    """[B, T] with each row's value on its last response token and 0 elsewhere."""
    T = bmask.shape[1]
    last = T - 1 - bmask.flip(1).long().argmax(1)
    out = torch.zeros(bmask.shape, dtype=values.dtype, device=values.device)
    return out.scatter(1, last[:, None], values[:, None])


def _check_pairs(pairs: torch.Tensor, batch: int, name: str) -> None:
    if pairs.numel() == 0:
        raise ValueError(f"{name} is empty: a pairwise loss needs at least one pair of responses to the same prompt")
    if pairs.dtype != torch.long or (checks_values() and (int(pairs.min()) < 0 or int(pairs.max()) >= batch)):
        raise ValueError(f"{name} must be long row indices in [0, {batch}); got {pairs.tolist()}")


def dpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
) -> LossOutput:
    """DPO: ``-log sigmoid(beta*(logratio(y_w) - logratio(y_l)))`` averaged over pairs.

    ``chosen[i]`` and ``rejected[i]`` are batch rows holding two responses to the same prompt.
    Residual per sequence: its implied reward ``beta*logratio``.
    """
    bmask = _check(beta, mask, logp=logp, ref_logp=ref_logp)
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must be 1-D row indices "
                         "of the same length (pair i is chosen[i] vs rejected[i])")
    _check_pairs(torch.stack([chosen, rejected]), mask.shape[0], "chosen/rejected")
    lr = sequence_logratio(logp, ref_logp, mask)
    margin = beta * (lr[chosen] - lr[rejected])
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    metrics = {"loss": _scalar(loss), "margin_mean": _scalar(margin.mean()), "accuracy": _scalar((margin > 0).float().mean()),
               "logratio_seq_mean": _scalar(lr.mean())}
    units: dict[str, Unit] = {"loss": "pair", "margin_mean": "pair", "accuracy": "pair", "logratio_seq_mean": "sequence"}
    return LossOutput(loss, _on_last_token(beta * lr, bmask), metrics, units)


def soft_dpo_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, returns: torch.Tensor, pairs: torch.Tensor, *, beta: float
) -> LossOutput:
    """DPO against Bradley-Terry soft labels: ``-[p ln s(m) + (1-p) ln s(-m)]``, ``p = s(R - R')``.

    ``m = beta*(lr(y) - lr(y'))`` for each pair ``(y, y')`` of ``pairs`` [P, 2]; s is the logistic
    sigmoid and ``returns`` [B] the rows' returns. Its minimiser per pair is
    ``beta*(lr(y) - lr(y')) = R(y) - R(y')``, CoPG's. Residual per sequence, as for DPO: its implied
    reward ``beta*logratio`` (on its last response token).
    """
    bmask = _check(beta, mask, logp=logp, ref_logp=ref_logp)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] row indices, got shape {tuple(pairs.shape)}")
    if returns.shape != mask.shape[:1]:
        raise ValueError(f"returns must be [B]={tuple(mask.shape[:1])} (one return per row), got {tuple(returns.shape)}")
    _check_pairs(pairs, mask.shape[0], "pairs")
    lr = sequence_logratio(logp, ref_logp, mask)
    margin = beta * (lr[pairs[:, 0]] - lr[pairs[:, 1]])
    p = torch.sigmoid(returns[pairs[:, 0]] - returns[pairs[:, 1]]).to(margin.dtype)
    logsig = torch.nn.functional.logsigmoid
    loss = -(p * logsig(margin) + (1 - p) * logsig(-margin)).mean()
    metrics = {"loss": _scalar(loss), "margin_mean": _scalar(margin.mean()), "logratio_seq_mean": _scalar(lr.mean())}
    units: dict[str, Unit] = {"loss": "pair", "margin_mean": "pair", "logratio_seq_mean": "sequence"}
    return LossOutput(loss, _on_last_token(beta * lr, bmask), metrics, units)


def dro_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """DRO: ``0.5*(R - V_phi(x) - beta*logratio(y))^2`` averaged over sequences.

    ``R`` is the sum of the response's rewards, ``values`` [B] the separate value V_phi(x) of each
    row's prompt (a head or a model; gradients flow into it). The residual sits on the last token.
    """
    bmask = _check(beta, mask, rewards, logp=logp, ref_logp=ref_logp)
    if values.shape != mask.shape[:1]:
        raise ValueError(f"values must be [B]={tuple(mask.shape[:1])} (one V_phi(x) per row), got {tuple(values.shape)}")
    dt = _compute_dtype(logp)
    ret = torch.where(bmask, rewards.to(dt), torch.zeros((), dtype=dt, device=logp.device)).sum(1)
    lr = sequence_logratio(logp, ref_logp, mask)
    resid = ret - values.to(dt) - beta * lr
    loss = 0.5 * resid.square().mean()
    metrics = {"loss": _scalar(loss), "residual_abs_mean": _scalar(resid.abs().mean()), "logratio_seq_mean": _scalar(lr.mean()),
               "value_mean": _scalar(values.mean())}
    units: dict[str, Unit] = dict.fromkeys(metrics, "sequence")
    return LossOutput(loss, _on_last_token(resid, bmask), metrics, units)


def copg_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    pairs: torch.Tensor,
) -> LossOutput:
    """CoPG: ``((R(y) - beta*lr(y)) - (R(y') - beta*lr(y')))^2`` averaged over ``pairs`` [P, 2].

    Each pair holds two batch rows answering the same prompt. It generalises IPO and uses no
    importance sampling. Residual per sequence: ``R - beta*logratio`` (the prompt's value estimate).
    """
    bmask = _check(beta, mask, rewards, logp=logp, ref_logp=ref_logp)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [P, 2] row indices, got shape {tuple(pairs.shape)}")
    _check_pairs(pairs, mask.shape[0], "pairs")
    dt = _compute_dtype(logp)
    ret = torch.where(bmask, rewards.to(dt), torch.zeros((), dtype=dt, device=logp.device)).sum(1)
    lr = sequence_logratio(logp, ref_logp, mask)
    own = ret - beta * lr
    diff = own[pairs[:, 0]] - own[pairs[:, 1]]
    loss = diff.square().mean()
    metrics = {"loss": _scalar(loss), "pair_residual_abs_mean": _scalar(diff.abs().mean()), "logratio_seq_mean": _scalar(lr.mean())}
    units: dict[str, Unit] = {"loss": "pair", "pair_residual_abs_mean": "pair", "logratio_seq_mean": "sequence"}
    return LossOutput(loss, _on_last_token(own, bmask), metrics, units)


def response_pairs(
    groups: torch.Tensor, *, rule: PairRule, returns: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """[P, 2] row-index pairs of rows sharing a group (rows answering one prompt), by ``rule``.

    - ``"all"``: every unordered pair (i < j), in row-major order: CoPG in training.
    - ``"preference"``: ordered (better, worse) by ``returns``, ties skipped: DPO's chosen / rejected.
    - ``"cycle"``: each group's rows, shuffled by ``seed`` (groups in increasing order, one generator),
      joined in a cycle: m >= 3 rows give m pairs (every row in two, all connected), 2 rows one
      pair, 1 row none. Connected like ``"all"`` with m pairs instead of m(m-1)/2 (the synthetic
      benchmark's rule).

    The result may be empty ([0, 2]) when no group has two rows (or, for ``"preference"``, two returns).
    """
    if rule == "all":
        same = groups[:, None] == groups[None, :]
        return torch.nonzero(same & torch.ones_like(same).triu(1))
    if rule == "preference":
        if returns is None:
            raise ValueError("rule='preference' needs returns= (one return per row) to order each pair")
        same = groups[:, None] == groups[None, :]
        return torch.nonzero(same & (returns[:, None] > returns[None, :]))
    if rule == "cycle":
        gen = torch.Generator().manual_seed(seed)
        pairs = []
        for p in torch.unique(groups).tolist():
            rows = torch.nonzero(groups == p).flatten()
            rows = rows[torch.randperm(rows.numel(), generator=gen)]
            if rows.numel() == 2:
                pairs.append(rows[None])
            elif rows.numel() > 2:
                pairs.append(torch.stack([rows, rows.roll(-1)], dim=1))
        return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long, device=groups.device)
    raise ValueError(f"pair rule={rule!r}: choose 'all', 'preference' or 'cycle'")
