"""Token-level reward functions: rewards placed on the exact tokens that earn them.

A token reward function maps a response's token ids to one reward per token
(``fn(token_ids) -> list[float]``); :func:`shiq_lab.views.token_values.token_values` and
:func:`shiq_lab.train.simple_fit.fit_shiq` call it on each response's tokens and keep the rewards of
policy tokens only (environment tokens earn nothing, METHOD.md multi-turn masking).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from shiq_lab.data.formats import _require_tokenized

__all__ = ["TokenRewardFn", "token_end_offsets", "word_reward"]

TokenRewardFn = Callable[[Sequence[int]], list[float]]


def token_end_offsets(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text of ``token_ids`` and, per token, the length of the text decoded up to it.

    Decoding prefixes (not single tokens) keeps multi-byte characters split across byte-level
    tokens whole; a token that only starts a character ends where the previous one did.
    """
    ends: list[int] = []
    text = ""
    for i in range(len(token_ids)):
        text = str(tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=False))
        ends.append(len(text.rstrip("\ufffd")))
    return text, ends


def word_reward(tokenizer: PreTrainedTokenizerBase, word: str, value: float = 1.0, *, case_sensitive: bool = False) -> TokenRewardFn:
    """Reward ``value`` on each token that completes an occurrence of ``word`` (a whole word).

    "Completes" means: the decoded text up to this token first contains the whole match. A word
    inside a longer word ("great" in "greatest") does not count.
    """
    if not word or not word.strip():
        raise ValueError("word must be a non-empty string")
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", 0 if case_sensitive else re.IGNORECASE)

    def reward(token_ids: Sequence[int]) -> list[float]:
        text, ends = token_end_offsets(tokenizer, token_ids)
        out = [0.0] * len(token_ids)
        for match in pattern.finditer(text):
            # a match at the very end may still be followed by letters in a longer response; we score what we see
            k = next(i for i, e in enumerate(ends) if e >= match.end())
            out[k] += float(value)
        return out

    reward.__name__ = f"word_reward_{word.strip()}"
    return reward
# ---------------------------------------------------------------------------------------------
# rewards and groups
# ---------------------------------------------------------------------------------------------


def normalize_rewards(ds: Dataset, mode: str = "zscore", stats: Mapping[str, float] | None = None) -> tuple[Dataset, dict[str, float]]:
    """Z-score the sequence returns of a tokenised dataset.

    With ``R`` the sum of a row's token rewards, ``mean`` and ``std`` over the rows (or given in
    ``stats``, e.g. the training set's for an evaluation set): every token reward is divided by
    ``std`` and ``mean/std`` is subtracted on the row's last policy token, so each return becomes
    ``(R - mean)/std`` and token-level shaping keeps its relative size. ``mode="none"`` returns the
    dataset unchanged with ``{"mean": 0, "std": 1}``. A zero spread keeps ``std = 1`` (warning).
    """
    if mode == "none":
        return ds, {"mean": 0.0, "std": 1.0}
    if mode != "zscore":
        raise ValueError(f"reward normalisation mode={mode!r}: choose 'none' or 'zscore'")
    _require_tokenized(ds, "normalize_rewards")
    if stats is None:
        returns = np.array([sum(r) for r in ds["token_rewards"]], dtype=np.float64)
        mean, std = float(returns.mean()), float(returns.std())
        if not std > 1e-12:
            warnings.warn("normalize_rewards: every return is equal; only the mean is removed", stacklevel=2)
            std = 1.0
    else:
        mean, std = float(stats["mean"]), float(stats["std"])

    def shift(row: dict) -> dict:
        r = [v / std for v in row["token_rewards"]]
        mask = row["action_mask"]
        last = len(mask) - 1 - mask[::-1].index(1)
        r[last] -= mean / std
        return {"token_rewards": r}

    return ds.map(shift, load_from_cache_file=False), {"mean": mean, "std": std}


