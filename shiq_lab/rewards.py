"""Token-level reward functions: rewards placed on the exact tokens that earn them.

A token reward function maps a response's token ids to one reward per token
(``fn(token_ids) -> list[float]``); :func:`shiq_lab.token_values.token_values` and
:func:`shiq_lab.simple_fit.fit_shiq` call it on each response's tokens and keep the rewards of
policy tokens only (environment tokens earn nothing, docs/method.md multi-turn masking).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from transformers import PreTrainedTokenizerBase

__all__ = ["TokenRewardFn", "token_end_offsets", "word_reward"]

TokenRewardFn = Callable[[Sequence[int]], list[float]]


def token_end_offsets(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text of ``token_ids`` and, per token, the length of the text decoded up to it.

    Decoding prefixes (not single tokens) keeps multi-byte characters split across byte-level
    tokens whole; a token that only starts a character ends where the previous one did.
    """
    ends, text = [], ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=False)
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
