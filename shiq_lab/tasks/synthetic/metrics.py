"""What the synthetic benchmark measures, per copy of a forest, against the exact optimum.

- ``kl_states``: KL(pi_theta(.|s) || pi*(.|s)) averaged uniformly over the policy's states (every
  state counts, also those pi_theta rarely reaches: it shows what the data left unlearnt).
- ``kl_seq``: KL(pi_theta || pi*) of whole responses (token KLs weighted by pi_theta's occupancy).
- ``return``: J_beta(pi_theta) = E[sum r] - beta * KL(pi_theta || pi_ref), averaged over prompts.
- ``normalised_return``: (J_beta(pi_theta) - J_beta(pi_ref)) / (J_beta(pi*) - J_beta(pi_ref)): 0 at
  the reference, 1 at the optimum. "99 % of the optimal regularised return" is read on this scale,
  because J_beta itself has an arbitrary zero (shift every reward and it shifts).
- ``reward`` and ``kl_ref``: E[sum r] and KL(pi_theta || pi_ref) of whole responses, the two axes of
  the reward-KL frontier.

The identity J_beta(pi*) - J_beta(pi) = beta * KL(pi || pi*) (sequence level, exact) ties ``return`` to
``kl_seq``; a test checks it, so the two columns cross-check each other.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from shiq_lab.exact.tree import (
    ExactSolution,
    TokenTree,
    expected_reward,
    sequence_kl,
    solve,
    state_occupancy,
    state_values,
)
from shiq_lab.tasks.synthetic.forest import Forest, per_copy, per_copy_mean

__all__ = ["policy_metrics", "sequences_to_target", "exact_frontier", "reward_gap"]


def _state_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """[N] KL(p(.|s) || q(.|s)) per state."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def policy_metrics(forest: Forest, log_pi: torch.Tensor, solution: ExactSolution) -> dict[str, torch.Tensor]:
    """[K] tensors of every metric (see module docstring) for the forest's policy ``log_pi`` ([K*N, V])."""
    tree, k = forest.tree, forest.copies
    beta = solution.beta
    log_pi = tree.with_env(log_pi.detach().to(tree.ref_logits.dtype))
    ref = tree.ref_log_probs
    roots = tree.roots
    j = per_copy(state_values(tree, log_pi, beta)[roots], k).mean(1)
    reward = per_copy(state_values(tree, log_pi, 0.0)[roots], k).mean(1)
    j_star = per_copy(solution.v[roots], k).mean(1)
    j_ref = per_copy(state_values(tree, ref, 0.0)[roots], k).mean(1)  # KL(ref||ref) = 0
    policy = tree.policy_states.to(ref.dtype)
    kl_star = _state_kl(log_pi, solution.log_pi)
    kl_ref = _state_kl(log_pi, ref)
    # occupancy of the forest starts each of its K*P roots at 1/(K*P): times K gives each copy's own.
    occ = state_occupancy(tree, log_pi) * k * policy
    copy = forest.copy_of_state
    zeros = torch.zeros(k, dtype=ref.dtype)
    return {
        "kl_states": per_copy_mean(kl_star, policy, copy, k),
        "kl_seq": zeros.clone().index_add_(0, copy, occ * kl_star),
        "kl_ref": zeros.clone().index_add_(0, copy, occ * kl_ref),
        "reward": reward,
        "return": j,
        "optimal_return": j_star,
        "reference_return": j_ref,
        "normalised_return": (j - j_ref) / (j_star - j_ref),
    }


def sequences_to_target(sizes: list[int], scores: list[float], target: float = 0.99) -> tuple[int, bool]:
    """Data efficiency: the smallest dataset size whose score reaches ``target``.

    ``scores[i]`` is the normalised return reached with ``sizes[i]`` training sequences (sizes
    increasing). When no size reaches ``target``, the method's own plateau (its best score) stands
    in: the answer is the smallest size reaching ``target`` times that plateau, flagged
    ``reached=False``. A non-finite score (a diverged run) never counts as reached.

    Returns:
        ``(size, reached)``.
    """
    if len(sizes) != len(scores) or not sizes:
        raise ValueError(f"sizes ({len(sizes)}) and scores ({len(scores)}) must be non-empty and of equal length")
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"sizes={sizes}: must be strictly increasing")
    finite = [s if math.isfinite(s) else -math.inf for s in scores]
    for size, score in zip(sizes, finite):
        if score >= target:
            return size, True
    plateau = max(finite)
    if plateau == -math.inf:
        return sizes[-1], False
    # a plateau at or below the reference (<= 0) is reached by the first size that attains it
    level = target * plateau if plateau > 0 else plateau
    return next(size for size, score in zip(sizes, finite) if score >= level), False


def exact_frontier(tree: TokenTree, betas: list[float]) -> tuple[list[float], list[float]]:
    """The exact optimum's reward-KL frontier: (KL(pi*_beta || pi_ref), E_pi*_beta[R]) over ``betas``, by KL.

    pi*_beta maximises E[R] - beta * KL, so no policy has more reward at the same KL: these points
    trace the upper boundary of what any policy can reach.
    """
    points = []
    for beta in betas:
        sol = solve(tree, beta)
        points.append((sequence_kl(tree, sol.log_pi, tree.ref_log_probs), expected_reward(tree, sol.log_pi)))
    points.sort()
    return [k for k, _ in points], [r for _, r in points]


def reward_gap(frontier_kl: list[float], frontier_reward: list[float], kl: float, reward: float) -> float:
    """How far a policy lies below the frontier: frontier reward at the policy's KL minus its reward.

    The frontier is interpolated linearly between its points (clamped at its ends); ~0 for a policy
    on the frontier, positive below it.
    """
    if not math.isfinite(kl) or not math.isfinite(reward):
        return math.nan
    return float(np.interp(kl, frontier_kl, frontier_reward)) - reward
