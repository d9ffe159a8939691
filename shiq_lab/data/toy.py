"""A small built-in sentiment-flavoured dataset (word salad with a known reward), for tests and demos.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset

# ---------------------------------------------------------------------------------------------
# built-in data and loading by spec
# ---------------------------------------------------------------------------------------------

_POSITIVE = ("good", "great", "wonderful", "brilliant", "best", "amazing", "excellent", "fun", "beautiful")
_NEGATIVE = ("bad", "awful", "terrible", "boring", "worst", "poor", "dull", "ugly")
_NEUTRAL = ("the", "movie", "film", "story", "plot", "actor", "scene", "music", "was", "is", "and", "very", "really")


def synthetic_reward(text: str) -> float:
    """Toy sentiment score: (#positive - #negative words) / 2, in the tiny model's vocabulary."""
    words = text.replace(".", " ").split()
    return (sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)) / 2.0


def synthetic_dataset(n: int = 32, *, seed: int = 0, kind: str = "standard", responses_per_prompt: int = 2) -> Dataset:
    """A tiny offline dataset made of the tiny model's words, rewarded by :func:`synthetic_reward`.

    ``kind``: ``"standard"`` (prompt, completion, reward; ``responses_per_prompt`` completions per
    prompt), ``"token"`` (``token_rewards`` per word-token are not knowable without a tokenizer, so
    this gives ``reward`` plus a ``group`` column), ``"preference"`` (prompt, chosen, rejected),
    ``"multiturn"`` (messages with rewards on assistant turns).
    """
    rng = np.random.default_rng(seed)
    vocab = _POSITIVE + _NEGATIVE + _NEUTRAL

    def words(k: int) -> str:
        return " ".join(rng.choice(vocab, size=k)) + "."

    def prompt() -> str:
        return "the movie " + " ".join(rng.choice(_NEUTRAL, size=int(rng.integers(1, 4))))

    rows: list[dict[str, Any]] = []
    if kind in ("standard", "token"):
        while len(rows) < n:
            p = prompt()
            for _ in range(responses_per_prompt):
                c = " " + words(int(rng.integers(2, 7)))
                rows.append({"prompt": p, "completion": c, "reward": synthetic_reward(c)})
        rows = rows[:n]
        if kind == "token":
            for k, r in enumerate(rows):
                r["group"] = k // responses_per_prompt
        return Dataset.from_list(rows)
    if kind == "preference":
        for _ in range(n):
            a, b = " " + words(4), " " + words(4)
            if synthetic_reward(a) < synthetic_reward(b):
                a, b = b, a
            rows.append({"prompt": prompt(), "chosen": a, "rejected": b})
        return Dataset.from_list(rows)
    if kind == "multiturn":
        for _ in range(n):
            msgs: list[dict[str, Any]] = [{"role": "user", "content": prompt()}]
            for turn in range(int(rng.integers(1, 3))):
                reply = words(3)
                msgs.append({"role": "assistant", "content": reply, "reward": synthetic_reward(reply)})
                if turn == 0:
                    msgs.append({"role": "user", "content": "and the " + words(2)})
            if msgs[-1]["role"] != "assistant":
                reply = words(3)
                msgs.append({"role": "assistant", "content": reply, "reward": synthetic_reward(reply)})
            rows.append({"messages": msgs})
        return Dataset.from_list(rows)
    raise ValueError(f"kind={kind!r}: choose 'standard', 'token', 'preference' or 'multiturn'")


