"""Fitting tabular policies (one logit vector per tree state) with any token-level loss.

The bridge between :mod:`shiq_lab.exact.tree` (exact optimum) and :mod:`shiq_lab.losses`: the
derivation notebook and the synthetic benchmark both fit ``theta[N, V]`` on an offline dataset and
measure the implied policy against pi*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shiq_lab.exact.tree import OfflineDataset, TokenTree, mean_state_kl, regularised_return, solve, tabular_logits
from shiq_lab.losses import LossOutput, naive_q_loss, scoring_loss, shiq_loss, token_logprobs

__all__ = ["TOKEN_LOSSES", "token_loss", "loss_gradient", "implied_policy", "FitResult", "fit_tabular"]

#: token-level losses a tabular policy can be fitted with: name -> (description)
TOKEN_LOSSES = {
    "shiq": "ShiQ, full path (METHOD.md step 4)",
    "shiq_nstep": "ShiQ, n-step with bootstrap",
    "shiq_1step": "shifted one-step loss (step 3)",
    "scoring": "unshifted scoring function g = l (step 2)",
    "naive": "logits as Q (step 1)",
}


def token_loss(
    name: str,
    theta: torch.Tensor,
    tree: TokenTree,
    data: OfflineDataset,
    *,
    beta: float,
    horizon: int | None = None,
) -> LossOutput:
    """Evaluate the token-level loss ``name`` (a key of :data:`TOKEN_LOSSES`) of tabular logits ``theta``."""
    if name not in TOKEN_LOSSES:
        raise ValueError(f"loss={name!r}: choose one of {sorted(TOKEN_LOSSES)}")
    logits = tabular_logits(theta, data)
    ref_logits = tabular_logits(tree.ref_logits, data)
    if name == "naive":
        return naive_q_loss(logits, ref_logits, data.actions, data.rewards, data.mask, beta=beta)
    logp, logz = token_logprobs(logits, data.actions)
    ref_logp, ref_logz = token_logprobs(ref_logits, data.actions)
    if name == "scoring":
        return scoring_loss(logp, logz, ref_logp, data.rewards, data.mask, beta=beta)
    h = {"shiq": None, "shiq_1step": 1, "shiq_nstep": horizon or 2}[name]
    return shiq_loss(logp, logz, ref_logp, ref_logz, data.rewards, data.mask, beta=beta, horizon=h)


def loss_gradient(
    name: str,
    theta: torch.Tensor,
    tree: TokenTree,
    data: OfflineDataset,
    *,
    beta: float,
    horizon: int | None = None,
) -> torch.Tensor:
    """[N, V] gradient of the loss ``name`` with respect to tabular logits ``theta``.

    Shows which logits a loss moves at all: e.g. at initialisation with a terminal reward, the
    one-step loss moves only the logits of episode-ending tokens, the full path every visited one.
    """
    theta = theta.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(token_loss(name, theta, tree, data, beta=beta, horizon=horizon).loss, theta)
    return grad


def implied_policy(name: str, theta: torch.Tensor, tree: TokenTree, beta: float) -> torch.Tensor:
    """[N, V] log-probs of the policy a loss's logits stand for.

    For the naive loss the logits are q, so sampling needs the reference and beta:
    ``pi = softmax(l_ref + l/beta)``. Every other loss samples with a plain softmax of the logits.
    """
    if name == "naive":
        return tree.with_env(torch.log_softmax(tree.ref_log_probs + theta / beta, dim=-1))
    return tree.with_env(torch.log_softmax(theta, dim=-1))


@dataclass
class FitResult:
    """Fitted logits and the learning curve (one dict per evaluation)."""

    theta: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [h[key] for h in self.history]


def fit_tabular(
    tree: TokenTree,
    data: OfflineDataset,
    loss: str,
    *,
    beta: float,
    steps: int = 500,
    lr: float = 0.1,
    optimizer: str = "adam",
    horizon: int | None = None,
    eval_every: int = 10,
    init: torch.Tensor | None = None,
    on_eval: Callable[[int, torch.Tensor], dict[str, float]] | None = None,
) -> FitResult:
    """Full-batch fit of tabular logits from the reference logits (or ``init``).

    ``optimizer`` is ``"adam"`` (learning curves, fixed budget) or ``"lbfgs"`` (to machine
    precision, for fixed-point checks). Every ``eval_every`` steps the history records the loss, the
    state-averaged KL(pi || pi*), the regularised return J_beta and anything ``on_eval`` returns.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer={optimizer!r}: choose 'adam' or 'lbfgs'")
    opt_sol = solve(tree, beta)
    theta = (tree.ref_logits if init is None else init).clone().requires_grad_(True)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=lr)
    else:
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=20, history_size=50,
                                tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")
    result = FitResult(theta=theta)

    def record(step: int, loss_value: float) -> None:
        with torch.no_grad():
            pol = implied_policy(loss, theta, tree, beta)
            row = {"step": float(step), "loss": loss_value,
                   "kl_to_optimum": mean_state_kl(tree, pol, opt_sol.log_pi),
                   "return": regularised_return(tree, pol, beta),
                   "optimal_return": opt_sol.optimal_return}
            if on_eval is not None:
                row.update(on_eval(step, pol))
        result.history.append(row)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = token_loss(loss, theta, tree, data, beta=beta, horizon=horizon)
        out.loss.backward()
        return out.loss

    for step in range(steps):
        value = float(opt.step(closure).detach()) if optimizer == "lbfgs" else _adam_step(opt, closure)
        if step % eval_every == 0 or step == steps - 1:
            record(step, value)
    result.theta = theta.detach()
    return result


def _adam_step(opt: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> float:
    value = closure()
    opt.step()
    return float(value.detach())
