"""One training harness for every method: same data, same optimiser, same step budget.

A method is a loss on a logit table ``[N, V]`` (tabular: the table is the parameter; neural: a
transformer writes it). Token-level methods come from :mod:`shiq_lab.exact.fit`, sequence-level ones
from :mod:`shiq_lab.tasks.synthetic.sequence_baselines`. :func:`train_forest` trains K independent runs at
once (a :class:`~shiq_lab.tasks.synthetic.forest.Forest`), full batch, with Adam and one learning rate per run,
and records every metric of :mod:`shiq_lab.tasks.synthetic.metrics` along the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from shiq_lab.exact.fit import TOKEN_LOSSES, implied_policy, token_loss
from shiq_lab.exact.tree import OfflineDataset, solve
from shiq_lab.losses import LOSSES, LossOutput
from shiq_lab.tasks.synthetic.forest import Forest, per_copy_mean
from shiq_lab.tasks.synthetic.metrics import policy_metrics
from shiq_lab.tasks.synthetic.sequence_baselines import SEQUENCE_LOSSES, order_by_return, prompt_pairs, sequence_loss

__all__ = ["METHODS", "TablePolicy", "TabularPolicy", "BatchedAdam", "TrainResult", "method_loss", "forest_pairs", "calibration_residual", "train_forest"]

#: every method of the benchmark: name -> description
METHODS: dict[str, str] = {**TOKEN_LOSSES, **SEQUENCE_LOSSES}


class TablePolicy(Protocol):
    """What the harness trains: parameters with a leading copy dimension and the logit table they give."""

    @property
    def params(self) -> list[torch.Tensor]: ...

    def table(self) -> torch.Tensor: ...


class TabularPolicy:
    """One free logit vector per state, initialised at the reference logits (theta = ref)."""

    def __init__(self, forest: Forest) -> None:
        k, n = forest.copies, forest.states_per_copy
        self._theta = forest.tree.ref_logits.reshape(k, n, -1).clone().requires_grad_(True)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self._theta]

    def table(self) -> torch.Tensor:
        return self._theta.reshape(-1, self._theta.shape[-1])


class BatchedAdam:
    """Adam whose learning rate is a vector, one per copy: K independent runs in one step.

    Every parameter has the copy dimension first; the update of copy k is exactly Adam's with
    ``lr[k]`` (bias-corrected moments, ``betas=(0.9, 0.999)``, ``eps``).
    """

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr.dim() != 1 or not bool((lr > 0).all()):
            raise ValueError(f"lr must be a 1-d tensor of positive learning rates (one per copy), got {lr}")
        for i, p in enumerate(params):
            if p.shape[0] != lr.shape[0]:
                raise ValueError(f"params[{i}] has leading dim {p.shape[0]} but lr has {lr.shape[0]} copies")
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            lr = self.lr.to(p.dtype).reshape(-1, *([1] * (p.dim() - 1)))
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + self.eps))


@dataclass
class TrainResult:
    """Per-copy learning curves: ``curves[metric]`` is [evaluations, K]; ``steps`` the step of each row."""

    steps: list[int]
    curves: dict[str, torch.Tensor]
    final_table: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def final(self, metric: str) -> torch.Tensor:
        """[K] value of ``metric`` after the last step."""
        return self.curves[metric][-1]


def method_loss(
    method: str,
    table: torch.Tensor,
    forest: Forest,
    data: OfflineDataset,
    *,
    beta: float,
    nstep: int = 2,
    pairs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> LossOutput:
    """The loss of ``method`` (a key of :data:`METHODS`) for the forest's logit table."""
    if method in TOKEN_LOSSES:
        return token_loss(method, table, forest.tree, data, beta=beta, horizon=nstep)
    if method in SEQUENCE_LOSSES:
        return sequence_loss(method, table, forest.tree, data, beta=beta, pairs=pairs, values=values)
    raise ValueError(f"method={method!r}: choose one of {sorted(METHODS)}")




def _paired(method: str) -> bool:
    """Whether ``method`` learns from pairs (the registry :data:`shiq_lab.losses.LOSSES`; token methods do not)."""
    return method in LOSSES and LOSSES[method].pairwise


def forest_pairs(data: OfflineDataset, copy_of_row: torch.Tensor, forest: Forest, *, seed: int = 0) -> torch.Tensor:
    """[M, 2] rows answering one prompt (:func:`prompt_pairs`), drawn copy by copy.

    Each copy is paired as if it were trained alone (same seed, its own prompt numbering), so a
    forest run sees exactly the pairs of the standalone run.
    """
    out = []
    for k in range(forest.copies):
        rows = torch.nonzero(copy_of_row == k).flatten()
        local = prompt_pairs(data.prompts[rows] - k * forest.prompts_per_copy, seed=seed)
        out.append(rows[local])
    return torch.cat(out)


def _copy_gradient_scale(method: str, data: OfflineDataset, copy_of_row: torch.Tensor, copies: int, pairs: torch.Tensor | None) -> torch.Tensor:
    """[K] factor that turns copy k's share of the forest's mean loss back into its own mean loss.

    Every loss is a mean over units (response tokens, responses or pairs); in a forest copy k's
    gradient is its standalone gradient times (its units / all units). Multiplying it back makes a
    forest step exactly the K standalone steps (Adam alone would undo the factor only up to eps).
    """
    if method in TOKEN_LOSSES:
        units = torch.zeros(copies, dtype=torch.float64).index_add_(0, copy_of_row, data.mask.sum(1).to(torch.float64))
    elif method == "dro":
        units = torch.bincount(copy_of_row, minlength=copies).to(torch.float64)
    else:
        assert pairs is not None
        if method == "dpo":
            returns = (data.rewards * data.mask).sum(1)
            first, _ = order_by_return(returns, pairs)
        else:
            first = pairs[:, 0]
        units = torch.bincount(copy_of_row[first], minlength=copies).to(torch.float64)
    return torch.where(units > 0, units.sum() / units.clamp(min=1), torch.zeros((), dtype=torch.float64))


def _residual_per_copy(method: str, out: LossOutput, data: OfflineDataset, copy_of_row: torch.Tensor, copies: int) -> torch.Tensor:
    """[K] mean |residual|: over response tokens (token methods) or over responses (sequence methods)."""
    res = out.residuals.detach().abs()
    if method in TOKEN_LOSSES:
        copy = copy_of_row[:, None].expand_as(res).reshape(-1)
        return per_copy_mean(res.reshape(-1), data.mask.reshape(-1), copy, copies)
    return per_copy_mean(res.sum(1), torch.ones_like(res[:, 0]), copy_of_row, copies)


def calibration_residual(method: str, policy: TablePolicy, forest: Forest, data: OfflineDataset, copy_of_row: torch.Tensor, *, beta: float, nstep: int = 2) -> torch.Tensor:
    """[K] mean |residual| of ``method`` at the policy's current logits with every reward set to 0.

    At theta = ref the shifted losses (ShiQ, n-step, one-step) give exactly 0, and so do the
    sequence losses (their residuals are log-ratios and returns); the naive and scoring losses do
    not: their residuals carry the logits' arbitrary per-state offsets (METHOD.md steps 1-3).
    """
    silent = OfflineDataset(data.states, data.actions, torch.zeros_like(data.rewards), data.mask, data.prompts, data.lengths)
    values = torch.zeros(forest.tree.num_prompts, dtype=data.rewards.dtype)  # V_phi = 0 matches R = 0
    pairs = forest_pairs(data, copy_of_row, forest) if _paired(method) else None
    # DPO's residual (beta * log-ratio) does not involve the rewards, which only order the pairs:
    # zeroed rewards would tie every pair and leave none.
    source = data if method == "dpo" else silent
    with torch.no_grad():
        out = method_loss(method, policy.table(), forest, source, beta=beta, nstep=nstep, pairs=pairs, values=values)
    return _residual_per_copy(method, out, source, copy_of_row, forest.copies)


def train_forest(
    policy: TablePolicy,
    method: str,
    forest: Forest,
    data: OfflineDataset,
    copy_of_row: torch.Tensor,
    *,
    beta: float,
    lr: torch.Tensor,
    steps: int,
    eval_every: int = 25,
    nstep: int = 2,
    pair_seed: int = 0,
) -> TrainResult:
    """Train K runs (one per forest copy) of ``method`` full batch for ``steps`` Adam steps.

    The first evaluation is at step 0, before any update (see :func:`calibration_residual` for
    the residual at initialisation with the reward left out).
    DRO's value V_phi(x) is one parameter per prompt, initialised at 0 and trained with the
    policy (same learning rate).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {sorted(METHODS)}")
    if steps < 0 or eval_every < 1:
        raise ValueError(f"steps={steps}, eval_every={eval_every}: need steps >= 0 and eval_every >= 1")
    k = forest.copies
    solution = solve(forest.tree, beta)
    params = list(policy.params)
    values = None
    if method == "dro":
        values = torch.zeros(k, forest.prompts_per_copy, dtype=forest.tree.ref_logits.dtype, requires_grad=True)
        params.append(values)
    pairs = forest_pairs(data, copy_of_row, forest, seed=pair_seed) if _paired(method) else None
    opt = BatchedAdam(params, lr)
    scale = _copy_gradient_scale(method, data, copy_of_row, k, pairs)

    rows: list[dict[str, torch.Tensor]] = []
    evaluated: list[int] = []
    for step in range(steps + 1):
        opt.zero_grad()
        table = policy.table()
        out = method_loss(method, table, forest, data, beta=beta, nstep=nstep, pairs=pairs,
                          values=None if values is None else values.reshape(-1))
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                row = policy_metrics(forest, implied_policy(method, table.detach(), forest.tree, beta), solution)
                row["residual"] = _residual_per_copy(method, out, data, copy_of_row, k)
            rows.append(row)
            evaluated.append(step)
        if step == steps:
            break
        out.loss.backward()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype).reshape(-1, *([1] * (p.dim() - 1))))
        opt.step()
    curves = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    extras = {"values": values.detach()} if values is not None else {}
    return TrainResult(evaluated, curves, policy.table().detach(), extras)
