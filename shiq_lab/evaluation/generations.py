"""Evaluating a policy against its reference on held-out prompts: reward and KL of fresh generations.

The headline metric of METHOD.md: sample responses from the policy, score them, and measure
KL(pi || pi_ref) *on the same samples*:

- ``kl_mean``: mean over samples of ``sum_t ln pi(a_t|s_t) - ln pi_ref(a_t|s_t)`` over the sampled
  response tokens (EOS included). An unbiased estimate of the sequence KL; one sample can be < 0.
- ``kl_states_mean``: mean over samples of ``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))``, the exact
  per-state KL summed along the sampled path. Also unbiased for the sequence KL (the chain rule of
  KL), never negative, and of lower variance: the number to trust at small sample sizes.

Both are exactly 0 for the reference itself (same code path, same tensors). Log-probabilities are
recomputed by teacher forcing on the sampled token ids (never re-tokenised text).

Over a sweep of beta and checkpoints, the points (KL, reward) form the reward-KL frontier:
:func:`evaluate_checkpoints` -> a ``pandas.DataFrame``, :func:`save_frontier` (CSV + JSON + HTML),
:func:`plot_frontier` (plotly), :func:`pareto_mask`. :func:`cli_main` is ``shiq-lab evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from shiq_lab.data.batch import pad_token_id, pad_with_mask
from shiq_lab.evaluation.sampling import RewardFn, Samples, sample_completions, score_samples
from shiq_lab.lm.modes import as_reference, device_of, eval_mode
from shiq_lab.lm.stats import StateLogits, action_positions, token_stats

#: columns of a frontier frame, in order
FRONTIER_COLUMNS = ["label", "loss_type", "beta", "step", "reward_mean", "reward_sem", "kl_mean", "kl_sem",
                    "kl_states_mean", "kl_states_sem", "length_mean", "finished_fraction", "n", "path"]


@dataclass
class SequenceStats:
    """Per-sample statistics of sampled responses under a policy and its reference."""

    logratio: np.ndarray  # [N] sum over response tokens of ln pi - ln pi_ref at the sampled tokens
    kl_states: np.ndarray  # [N] sum over response states of KL(pi(.|s) || pi_ref(.|s))
    lengths: np.ndarray  # [N] response tokens


def _teacher_forced(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, action_mask: torch.Tensor,
                    positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, StateLogits]:
    """logp of each response token (``positions``, row-major) and its state's full logits, chunk by chunk.

    The numbers come from :func:`shiq_lab.lm.stats.token_stats`, the function the trainer and the
    reference cache use; the model runs on its own device, the results come back on ``device``.
    """
    home = device_of(model)
    logp, _, cap = token_stats(model, ids.to(home), mask.to(home), action_mask.to(home), positions=positions.to(home),
                               return_capture=True)
    return logp.view(-1)[positions.to(home)].to(device), StateLogits(model, cap, positions.to(home) - 1)


@torch.no_grad()
def sequence_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    samples: Samples,
    *,
    pad_id: int,
    batch_size: int = 32,
    chunk_tokens: int = 512,
) -> SequenceStats:
    """Teacher-forced log-ratio and per-state KL of each sampled response (see the module docstring).

    ``reference=None`` uses the PEFT ``policy`` with its adapters disabled. When ``reference is
    policy`` the reference pass is skipped and every statistic is exactly 0. Each model runs where
    it is (nothing is moved) and in eval mode; the caller's modes are restored. ``chunk_tokens``
    states' full logits are held at a time (never [B, T, V]).
    """
    n_all = len(samples)
    logratio, kl_states = np.zeros(n_all), np.zeros(n_all)
    lengths = np.array([len(c) for c in samples.completion_ids])
    if (lengths == 0).any():
        raise ValueError("a sample has an empty response: nothing to evaluate")
    device = device_of(policy)
    for k in range(0, n_all, batch_size):
        rows = range(k, min(n_all, k + batch_size))
        seqs = [samples.prompt_ids[i] + samples.completion_ids[i] for i in rows]
        starts = [len(samples.prompt_ids[i]) for i in rows]
        if min(starts) < 1:
            raise ValueError("a sample has an empty prompt: its first response token has no state to score")
        ids, mask = pad_with_mask(seqs, pad_id)
        action_mask = torch.zeros_like(mask)
        for b, (s, seq) in enumerate(zip(starts, seqs)):
            action_mask[b, s:len(seq)] = 1
        positions = action_positions(action_mask)  # row-major: response by response, token by token
        row_of = (positions // ids.shape[1]).to(device)
        with eval_mode(policy):
            lp, pol = _teacher_forced(policy, ids, mask, action_mask, positions, device)
        if reference is policy:
            rp, ref = lp, pol
        else:
            with as_reference(policy, reference) as ref_model:
                rp, ref = _teacher_forced(ref_model, ids, mask, action_mask, positions, device)
        per_state = torch.zeros(len(pol), dtype=torch.float32, device=device)
        for i0 in range(0, len(pol), chunk_tokens):
            i1 = min(i0 + chunk_tokens, len(pol))
            p_all = torch.log_softmax(pol(i0, i1, device), -1)
            r_all = p_all if ref is pol else torch.log_softmax(ref(i0, i1, device), -1)
            # exp(-inf) * (-inf - x) is nan for tokens the policy cannot emit: they contribute 0
            per_state[i0:i1] = torch.nan_to_num((p_all.exp() * (p_all - r_all)).sum(-1), nan=0.0).clamp(min=0.0)
        n = len(seqs)
        sums = torch.zeros(2, n, dtype=torch.float64, device=device)
        sums[0].index_add_(0, row_of, (lp - rp).double())
        sums[1].index_add_(0, row_of, per_state.double())
        logratio[k:k + n], kl_states[k:k + n] = sums.cpu().numpy()
    return SequenceStats(logratio=logratio, kl_states=kl_states, lengths=lengths)


def _sem(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@dataclass
class PolicyEval:
    """Reward and KL of a policy's fresh generations on a prompt set (means and standard errors)."""

    reward_mean: float
    reward_sem: float
    kl_mean: float
    kl_sem: float
    kl_states_mean: float
    kl_states_sem: float
    length_mean: float
    finished_fraction: float
    n: int
    samples: Samples = field(repr=False)
    stats: SequenceStats = field(repr=False)

    def row(self) -> dict[str, float]:
        """The numbers (no samples), for a frontier table."""
        return {k: v for k, v in asdict(self).items() if k not in ("samples", "stats")}

    def frame(self) -> pd.DataFrame:
        """One row per sample: prompt, completion, reward, log-ratio, per-state KL, length, finished."""
        return pd.DataFrame({
            "prompt": self.samples.prompts, "completion": self.samples.completions, "reward": self.samples.rewards,
            "logratio": self.stats.logratio, "kl_states": self.stats.kl_states, "length": self.stats.lengths,
            "finished": self.samples.finished,
        })


def evaluate_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> PolicyEval:
    """Sample from ``policy`` on ``prompts``, score the responses, and measure KL to ``reference`` on them.

    Args:
        policy: the model to evaluate (its train / eval mode is restored afterwards).
        reference: the reference model (same tokenizer), or None for a PEFT policy's disabled adapters.
        tokenizer: the shared tokenizer.
        prompts: held-out prompts (e.g. ``imdb_prompts("test")``).
        reward_fn: ``reward_fn(prompts, completions) -> [N]`` rewards.
        samples_per_prompt, max_new_tokens, batch_size: sampling settings (see
            :func:`shiq_lab.evaluation.sampling.sample_completions`).
        seed: sampling seed: use the same one for every policy compared (common random numbers).
        device: where to sample (default: the policy's device; the policy is moved back afterwards).
            The reference runs where it is: nothing of the caller's is moved or left in another mode.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one held-out prompt")
    samples = sample_completions(policy, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device)
    score_samples(samples, reward_fn)
    stats = sequence_stats(policy, reference, samples, pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    rewards = np.asarray(samples.rewards, dtype=np.float64)
    return PolicyEval(
        reward_mean=float(rewards.mean()), reward_sem=_sem(rewards),
        kl_mean=float(stats.logratio.mean()), kl_sem=_sem(stats.logratio),
        kl_states_mean=float(stats.kl_states.mean()), kl_states_sem=_sem(stats.kl_states),
        length_mean=float(stats.lengths.mean()), finished_fraction=float(np.mean(samples.finished)),
        n=len(samples), samples=samples, stats=stats,
    )


