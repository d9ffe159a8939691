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

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from shiq_lab.evaluation.sampling import RewardFn, Samples, sample_completions, score_samples

#: columns of a frontier frame, in order
FRONTIER_COLUMNS = ["label", "loss_type", "beta", "step", "reward_mean", "reward_sem", "kl_mean", "kl_sem",
                    "kl_states_mean", "kl_states_sem", "length_mean", "finished_fraction", "n", "path"]


@dataclass
class SequenceStats:
    """Per-sample statistics of sampled responses under a policy and its reference."""

    logratio: np.ndarray  # [N] sum over response tokens of ln pi - ln pi_ref at the sampled tokens
    kl_states: np.ndarray  # [N] sum over response states of KL(pi(.|s) || pi_ref(.|s))
    policy_logp: np.ndarray  # [N] sum over response tokens of ln pi
    lengths: np.ndarray  # [N] response tokens


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference model: ``reference``, or the PEFT ``policy`` with its adapters disabled."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("reference=None means 'the policy with its adapters disabled', which needs a peft model; "
                         "pass the reference model instead")
    with policy.disable_adapter():
        yield policy


@torch.no_grad()
def _response_log_softmax(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                          starts: Sequence[int], lengths: Sequence[int]) -> list[torch.Tensor]:
    """Per row, [n_i, V] fp32 log-softmax of the states before each response token."""
    model.eval()
    device = _device_of(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for b, (s, n) in enumerate(zip(starts, lengths)):
        # logits[t] is the state before token t+1: the response's states are s-1 .. s+n-2
        out.append(torch.log_softmax(logits[b, s - 1:s + n - 1].float(), dim=-1))
    return out


@torch.no_grad()
def sequence_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    samples: Samples,
    *,
    pad_id: int,
    batch_size: int = 32,
) -> SequenceStats:
    """Teacher-forced log-ratio and per-state KL of each sampled response (see the module docstring).

    ``reference=None`` uses the PEFT ``policy`` with its adapters disabled. When ``reference is
    policy`` the reference pass is skipped and every statistic is exactly 0.
    """
    n_all = len(samples)
    logratio, kl_states, logp_sum = np.zeros(n_all), np.zeros(n_all), np.zeros(n_all)
    lengths = np.array([len(c) for c in samples.completion_ids])
    if (lengths == 0).any():
        raise ValueError("a sample has an empty response: nothing to evaluate")
    for k in range(0, n_all, batch_size):
        rows = range(k, min(n_all, k + batch_size))
        seqs = [samples.prompt_ids[i] + samples.completion_ids[i] for i in rows]
        starts = [len(samples.prompt_ids[i]) for i in rows]
        ns = [len(samples.completion_ids[i]) for i in rows]
        if min(starts) < 1:
            raise ValueError("a sample has an empty prompt: its first response token has no state to score")
        ids, mask = _right_pad(seqs, pad_id)
        pol = _response_log_softmax(policy, ids, mask, starts, ns)
        if reference is policy:
            ref = pol
        else:
            with _as_reference(policy, reference) as ref_model:
                ref = _response_log_softmax(ref_model, ids, mask, starts, ns)
        for j, i in enumerate(rows):
            actions = torch.as_tensor(samples.completion_ids[i], dtype=torch.long, device=pol[j].device)
            lp = pol[j].gather(-1, actions[:, None]).squeeze(-1)
            rp = ref[j].to(pol[j].device).gather(-1, actions[:, None]).squeeze(-1)
            logratio[i] = float((lp - rp).sum())
            logp_sum[i] = float(lp.sum())
            per_state = (pol[j].exp() * (pol[j] - ref[j].to(pol[j].device))).sum(-1)
            # exp(-inf) * (-inf - x) is nan for tokens the policy cannot emit: they contribute 0
            kl_states[i] = float(torch.nan_to_num(per_state, nan=0.0).clamp(min=0.0).sum())
    return SequenceStats(logratio=logratio, kl_states=kl_states, policy_logp=logp_sum, lengths=lengths)


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
        policy: the model to evaluate (left in eval mode).
        reference: the reference model (same tokenizer), or None for a PEFT policy's disabled adapters.
        tokenizer: the shared tokenizer.
        prompts: held-out prompts (e.g. ``imdb_prompts("test")``).
        reward_fn: ``reward_fn(prompts, completions) -> [N]`` rewards.
        samples_per_prompt, max_new_tokens, batch_size: sampling settings (see
            :func:`shiq_lab.evaluation.sampling.sample_completions`).
        seed: sampling seed: use the same one for every policy compared (common random numbers).
        device: where to sample (default: the policy's device); the reference is moved there.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one held-out prompt")
    samples = sample_completions(policy, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device)
    score_samples(samples, reward_fn)
    if reference is not None and reference is not policy and _device_of(reference) != _device_of(policy):
        reference.to(_device_of(policy))
    stats = sequence_stats(policy, reference, samples, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    rewards = np.asarray(samples.rewards, dtype=np.float64)
    return PolicyEval(
        reward_mean=float(rewards.mean()), reward_sem=_sem(rewards),
        kl_mean=float(stats.logratio.mean()), kl_sem=_sem(stats.logratio),
        kl_states_mean=float(stats.kl_states.mean()), kl_states_sem=_sem(stats.kl_states),
        length_mean=float(stats.lengths.mean()), finished_fraction=float(np.mean(samples.finished)),
        n=len(samples), samples=samples, stats=stats,
    )


