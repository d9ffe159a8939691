"""Sequence-level baselines (DPO, DRO, CoPG) on a table of logits: pairing, values, losses.

These methods see one number per response, its return R(x, y) = sum_t r_t, never the token
rewards. On a token tree their fixed points for the whole-response policy are, with
``lr(y) = sum_t ln pi/pi_ref``:

- DRO: ``beta*lr(y) = R(y) - V_phi(x)`` on every response in the data -> pi* on the responses the
  data covers; V_phi(x) -> v*(x) once coverage is complete (probabilities must sum to 1).
- CoPG: ``beta*(lr(y) - lr(y')) = R(y) - R(y')`` on every pair -> the same fixed point as DRO, but
  only if the pairs connect all of a prompt's responses. :func:`prompt_pairs` pairs responses in a
  cycle for that reason (disjoint pairs would leave each pair's offset free).
- DPO with pairs ordered by return (``dpo``): the label is deterministic, so the loss decreases
  until every margin is infinite; there is no finite fixed point and none of the policies it passes
  through is pi* except by accident of the step budget.
- DPO with Bradley-Terry soft labels (``dpo_bt``, a diagnostic): P(y > y') = sigmoid(R(y) - R(y')).
  Its minimiser per pair is ``beta*(lr(y) - lr(y')) = R(y) - R(y')``, CoPG's: this is the condition
  under which DPO's fixed point is pi*.

None of them has a per-state value, so they learn from a state only through the whole responses
that pass through it.
"""

from __future__ import annotations

import torch

from shiq_lab.exact.tree import OfflineDataset, TokenTree, tabular_logits
from shiq_lab.losses import (
    LOSSES,
    LossOutput,
    copg_loss,
    dpo_loss,
    dro_loss,
    response_pairs,
    soft_dpo_loss,
    token_logprobs,
)

__all__ = ["SEQUENCE_LOSSES", "prompt_pairs", "order_by_return", "soft_dpo_loss", "sequence_loss"]

SEQUENCE_LOSSES = {
    "dpo": "DPO, pairs ordered by return",
    "dpo_bt": "DPO, Bradley-Terry soft labels sigmoid(R - R') (diagnostic)",
    "dro": "DRO, learned value V_phi(x) per prompt",
    "copg": "CoPG, pairs of responses to one prompt",
}
assert set(SEQUENCE_LOSSES) == {n for n, spec in LOSSES.items() if spec.level == "sequence"}, "see shiq_lab.losses.LOSSES"


def prompt_pairs(prompts: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """[M, 2] pairs of rows answering the same prompt, each prompt's rows joined in a random cycle.

    :func:`shiq_lab.losses.response_pairs` with ``rule="cycle"`` (see there); refuses data where no
    prompt has two responses.
    """
    pairs = response_pairs(prompts, rule="cycle", seed=seed)
    if pairs.numel() == 0:
        raise ValueError("no prompt has two responses: pairwise baselines need at least two responses to one prompt")
    return pairs


def order_by_return(returns: torch.Tensor, pairs: torch.Tensor, *, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rows of each pair, the higher return first; ties (|dR| <= tol) are dropped."""
    r0, r1 = returns[pairs[:, 0]], returns[pairs[:, 1]]
    keep = (r0 - r1).abs() > tol
    first_wins = r0 > r1
    chosen = torch.where(first_wins, pairs[:, 0], pairs[:, 1])[keep]
    rejected = torch.where(first_wins, pairs[:, 1], pairs[:, 0])[keep]
    return chosen, rejected


def sequence_loss(
    name: str,
    table: torch.Tensor,
    tree: TokenTree,
    data: OfflineDataset,
    *,
    beta: float,
    pairs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> LossOutput:
    """Evaluate the sequence-level loss ``name`` of logits ``table`` ([N, V]) on ``data``.

    Args:
        pairs: [M, 2] rows answering one prompt (:func:`prompt_pairs`); needed by dpo, dpo_bt, copg.
        values: [num_prompts] DRO's learned V_phi(x), indexed by ``data.prompts``; needed by dro.
    """
    if name not in SEQUENCE_LOSSES:
        raise ValueError(f"loss={name!r}: choose one of {sorted(SEQUENCE_LOSSES)}")
    logp, _ = token_logprobs(tabular_logits(table, data), data.actions)
    ref_logp, _ = token_logprobs(tabular_logits(tree.ref_logits, data), data.actions)
    if name == "dro":
        if values is None:
            raise ValueError("dro needs values= (one learned V_phi(x) per prompt)")
        return dro_loss(logp, ref_logp, data.rewards, data.mask, values[data.prompts], beta=beta)
    if pairs is None:
        raise ValueError(f"{name} needs pairs= ([M, 2] rows answering the same prompt, see prompt_pairs)")
    returns = (data.rewards * data.mask).sum(1)
    if name == "copg":
        return copg_loss(logp, ref_logp, data.rewards, data.mask, beta=beta, pairs=pairs)
    if name == "dpo_bt":
        return soft_dpo_loss(logp, ref_logp, data.mask, returns, pairs, beta=beta)
    chosen, rejected = order_by_return(returns, pairs)
    return dpo_loss(logp, ref_logp, data.mask, beta=beta, chosen=chosen, rejected=rejected)
