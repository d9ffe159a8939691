"""Sampling responses from a causal LM, in batches, and the offline dataset built from them.

Sampling is plain ancestral sampling from ``softmax(logits / temperature)`` (temperature 1 by
default, no top-k, no top-p): the responses are then draws from the policy itself, which is what the
KL estimate of :mod:`shiq_lab.evaluation` and the "responses sampled from the reference" of the
offline dataset require. A hand-written loop with the KV cache (rather than ``generate``) keeps
that explicit and independent of a model's ``generation_config`` defaults (``top_k=50`` and friends).

Prompts are left-padded; a response stops at the tokenizer's EOS (kept as its last token, flagged
``finished``) or after ``max_new_tokens`` (``finished=False``: truncated, no EOS).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shiq_lab.data.batch import pad_token_id, pad_with_mask
from shiq_lab.lm.modes import eval_mode, on_device

__all__ = ["RewardFn", "Samples", "sample_batch", "sample_completions", "score_samples", "build_offline_dataset"]

#: ``reward_fn(prompts, completions) -> [N]`` rewards (e.g. :class:`shiq_lab.tasks.imdb.reward.SentimentReward`)
RewardFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


@dataclass
class Samples:
    """Sampled responses, one entry per sample (a prompt sampled k times appears k times in a row)."""

    prompts: list[str]
    group: list[int]  # index of the sample's prompt in the prompt list given to the sampler
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # the sampled token ids, EOS included when it was sampled
    completions: list[str]  # decoded completion_ids without special tokens
    finished: list[bool]  # True when the response ended with EOS
    rewards: list[float] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.prompts)

    def to_dataset(self) -> Dataset:
        """The samples as a ``datasets.Dataset`` (the standard pre-tokenised format of :mod:`shiq_lab.data`)."""
        if self.rewards is None:
            raise ValueError("these samples have no rewards yet: call score_samples(samples, reward_fn) first")
        return Dataset.from_dict({
            "prompt": self.prompts,
            "completion": self.completions,
            "reward": [float(r) for r in self.rewards],
            "group": self.group,
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "finished": self.finished,
        })




def _cache_name(model: torch.nn.Module) -> str:
    """The KV-cache keyword of ``forward``: ``cache`` in recent transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """The keyword that makes ``forward`` compute the last position's logits only, where it has one.

    A prefill of B prompts of L tokens would otherwise build [B, L, V] logits (gigabytes at V ~ 50k) to read
    [B, V] of them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def sample_batch(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, eos_id: int | None,
                 max_new_tokens: int, temperature: float, generator: torch.Generator | Sequence[torch.Generator] | None,
                 device: torch.device | str) -> list[list[int]]:
    """Continue every row of ``prompt_ids`` in one left-padded, KV-cached batch; the new ids of each row.

    A row stops at ``eos_id`` (kept as its last id) or after ``max_new_tokens`` ids. ``temperature <= 0`` is
    greedy (argmax; ``generator`` unused). ``generator`` is one generator for the whole batch (on ``device``),
    or one CPU generator per row: each row's draws then come from its own stream, so what a row samples does
    not depend on which other rows share its batch (up to the floating-point effect of padding on logits).
    The caller puts the model in eval mode and on ``device``; ``pad_id`` comes from
    :func:`shiq_lab.data.batch.pad_token_id`.
    """
    rows_in = [list(r) for r in prompt_ids]
    per_row = generator is not None and not isinstance(generator, torch.Generator)
    if per_row and len(generator) != len(rows_in):  # type: ignore[arg-type]
        raise ValueError(f"{len(generator)} generators for {len(rows_in)} rows: give one per row")  # type: ignore[arg-type]
    input_ids, attn = pad_with_mask(rows_in, pad_id, "left")
    input_ids, attn = input_ids.to(device), attn.to(device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_name(model)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True,
                **_last_logits_only(model))
    past, logits = _cache_of(out), out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    done = torch.zeros(len(rows_in), dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = logits.float().argmax(-1)
        elif per_row:
            probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
            # a stopped row draws nothing: its stream must not advance with its neighbours' lengths (its next
            # call, e.g. a rollout's next turn, then samples what it would alone)
            stopped = done.cpu().tolist()
            token = torch.tensor([pad_id if stopped[b] else int(torch.multinomial(probs[b], 1, generator=g))
                                  for b, g in enumerate(generator)], device=device)  # type: ignore[arg-type]
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        steps.append(token)
        if eos_id is not None:
            done = done | (token == eos_id)
        if len(steps) == max_new_tokens or bool(done.all()):
            break  # no forward pass for a token that will not be drawn
        # positions after a row's EOS are filled with pad and ignored; attending to them is harmless
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: past})
        past, logits = _cache_of(out), out.logits[:, -1]
        next_pos = next_pos + 1
    if not steps:
        return [[] for _ in rows_in]
    tokens = torch.stack(steps, dim=1).tolist()
    rows = []
    for row in tokens:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
) -> Samples:
    """Sample ``samples_per_prompt`` responses to each prompt, ``batch_size`` sequences at a time.

    Deterministic for a given ``seed`` and ``batch_size`` (one torch generator drives every draw),
    so two models evaluated with the same seed share their random numbers. The model samples in eval
    mode on ``device`` and is handed back in its own mode, on its own device.

    Args:
        model, tokenizer: a causal LM and its tokenizer (needs a pad token; EOS ends a response).
        prompts: non-empty strings, tokenised like :mod:`shiq_lab.data` does (``add_special_tokens=True``).
        samples_per_prompt: responses per prompt (>= 2 for the pairwise losses DPO / CoPG).
        max_new_tokens: cap on response tokens; a response that reaches it is ``finished=False``.
        temperature: 1.0 samples the model's own distribution (any other value samples a different
            policy than the model's: do not use it to build evaluation or offline-RL data).
        device: where to run (default: the model's device; the model is moved there and back).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if samples_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}, max_new_tokens={max_new_tokens}, "
                         f"batch_size={batch_size}: each must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty strings: a response needs a prompt to start from")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: use shiq_lab.infra.models.load_tokenizer (it sets one) or set tokenizer.pad_token")
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = [(g, encoded[g]) for g in range(len(prompts)) for _ in range(samples_per_prompt)]
    completion_ids: list[list[int]] = []
    # the caller's model comes back on its device and in its mode
    with on_device(model, device) as where, eval_mode(model):
        generator = torch.Generator(device=where).manual_seed(seed)
        for k in range(0, len(order), batch_size):
            chunk = [ids for _, ids in order[k:k + batch_size]]
            completion_ids += sample_batch(model, chunk, pad_id=pad_token_id(tokenizer), eos_id=tokenizer.eos_token_id,
                                            max_new_tokens=max_new_tokens, temperature=temperature,
                                            generator=generator, device=where)
    eos = tokenizer.eos_token_id
    return Samples(
        prompts=[prompts[g] for g, _ in order],
        group=[g for g, _ in order],
        prompt_ids=[ids for _, ids in order],
        completion_ids=completion_ids,
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        finished=[bool(c) and c[-1] == eos for c in completion_ids],
    )


def score_samples(samples: Samples, reward_fn: RewardFn) -> Samples:
    """Fill ``samples.rewards`` with ``reward_fn(prompts, completions)`` (returns the same object)."""
    rewards = torch.as_tensor(reward_fn(samples.prompts, samples.completions), dtype=torch.float32).flatten()
    if rewards.numel() != len(samples):
        raise ValueError(f"reward_fn returned {rewards.numel()} rewards for {len(samples)} samples")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("reward_fn returned a non-finite reward")
    samples.rewards = rewards.tolist()
    return samples


def build_offline_dataset(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Dataset:
    """The offline RL dataset: responses sampled from ``model`` (the reference) with their rewards.

    Columns: ``prompt``, ``completion`` (text), ``reward`` (sequence score), ``group`` (prompt
    index: rows of a group answer the same prompt, the pairs of DPO / CoPG), ``prompt_ids`` and
    ``completion_ids`` (the exact sampled tokens, EOS included when sampled, so training sees the
    very sequences that were scored, not a re-tokenisation) and ``finished``.
    """
    samples = sample_completions(model, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device)
    return score_samples(samples, reward_fn).to_dataset()
