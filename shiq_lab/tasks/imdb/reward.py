"""The reward of the IMDB task: a sentiment classifier trained here, in well under a minute on one CPU core.

A logistic regression on hashed word uni- and bigrams (no sklearn): the score of a text is a bias
plus the *average* weight of its distinct n-grams, so it does not grow with the text's length.
Continuations are short (tens of words) while reviews are long (~230 words), so the classifier
learns from each training review *and* from random windows of 8-48 of its words, labelled with the
review's label: that makes P(positive) meaningful on a short snippet (a neutral snippet gets a
probability nearer 0.5 than a full review would).

Reward of a completion = P(positive | completion) by default (``SentimentReward(kind="logit")`` gives
the log-odds instead). Built once per machine and cached in ``<cache>/reward_models/`` with its
held-out accuracy; training is seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shiq_lab.infra.models import cache_dir
from shiq_lab.infra.runtime import cpu_threads

__all__ = [
    "words",
    "HashedNgrams",
    "SentimentClassifier",
    "RewardModelConfig",
    "QUICK_REWARD_CONFIG",
    "train_sentiment_classifier",
    "load_reward_model",
    "SentimentReward",
]

_WORD = re.compile(r"[a-z0-9']+|[!?]")
_MIX = np.uint64(1000003)  # odd multiplier that mixes word hashes into an n-gram hash


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes) and the punctuation that carries sentiment (! ?)."""
    return _WORD.findall(text.lower())


class HashedNgrams:
    """Maps texts to the bucket ids of their distinct 1..n-grams (the input of an ``EmbeddingBag``).

    Word hashes are CRC32 (stable across machines and Python runs, unlike ``hash``); an n-gram's
    hash folds its words' hashes with a multiply-xor in uint64, then goes modulo ``n_buckets``.
    """

    def __init__(self, n_buckets: int = 2**18, ngram: int = 2) -> None:
        if n_buckets < 2 or ngram < 1:
            raise ValueError(f"n_buckets={n_buckets}, ngram={ngram}: need n_buckets >= 2 and ngram >= 1")
        self.n_buckets = n_buckets
        self.ngram = ngram
        self._memo: dict[str, int] = {}

    def _word_hashes(self, text: str) -> np.ndarray:
        memo = self._memo
        out = []
        for w in words(text):
            h = memo.get(w)
            if h is None:
                h = memo[w] = zlib.crc32(w.encode())
            out.append(h)
        return np.asarray(out, dtype=np.uint64)

    def ids(self, text: str) -> np.ndarray:
        """Sorted distinct bucket ids of the text's n-grams (empty for a text without words)."""
        h = self._word_hashes(text)
        grams = [h]
        acc = h
        for k in range(1, self.ngram):
            if len(h) <= k:
                break
            acc = (acc[:-1] * _MIX) ^ h[k:]
            grams.append(acc)
        return np.unique(np.concatenate(grams) % np.uint64(self.n_buckets)).astype(np.int64)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, offsets)`` of a batch, in ``torch.nn.EmbeddingBag`` layout."""
        bags = [self.ids(t) for t in texts]
        return _pack(bags)


def _pack(bags: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(bags) else np.zeros(0, np.int64)
    ids = np.concatenate(bags) if len(bags) else np.zeros(0, np.int64)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64))


class SentimentClassifier(torch.nn.Module):
    """Logistic regression on hashed n-grams: ``logit = bias + mean of the text's n-gram weights``.

    A text without any word scores ``bias``. ``meta`` holds the training config and held-out accuracy.
    """

    def __init__(self, n_buckets: int = 2**18, ngram: int = 2) -> None:
        super().__init__()
        self.featurizer = HashedNgrams(n_buckets, ngram)
        self.weights = torch.nn.EmbeddingBag(n_buckets, 1, mode="mean")
        torch.nn.init.zeros_(self.weights.weight)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.meta: dict = {}

    def forward_bags(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[N] logits from pre-computed bags."""
        return self.weights(ids, offsets).squeeze(-1) + self.bias

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """[N] log-odds that each text is positive (fp32, CPU)."""
        if isinstance(texts, str):
            raise TypeError("logits() takes a list of texts, not one string")
        if len(texts) == 0:
            return torch.zeros(0)
        return self.forward_bags(*self.featurizer(texts))

    def prob(self, texts: Sequence[str]) -> torch.Tensor:
        """[N] P(positive) of each text."""
        return torch.sigmoid(self.logits(texts))

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Fraction of texts whose predicted label (logit > 0) equals ``labels`` (1 = positive)."""
        pred = (self.logits(texts) > 0).long()
        return float((pred == torch.as_tensor(np.asarray(labels), dtype=torch.long)).float().mean())


@dataclass(frozen=True)
class RewardModelConfig:
    """How the sentiment classifier is trained (every field enters the cache key)."""

    n_buckets: int = 2**18
    ngram: int = 2
    epochs: int = 3
    lr: float = 0.1  # Adam; the weights of a mean-bag need large steps
    batch_size: int = 256
    windows_per_review: int = 2  # extra short snippets per review, labelled like the review
    window_words: tuple[int, int] = (8, 48)  # inclusive range of snippet lengths
    max_train: int | None = None  # cap on training reviews (quick builds in tests)
    max_eval: int | None = None  # cap on held-out reviews (of each source) used for the accuracies
    seed: int = 0
    cpu_threads: int | None = 1  # one thread is fastest for these small sparse steps (None: torch's setting)

    def key(self) -> str:
        """Short stable hash of the config: the cache folder's suffix."""
        # the thread count changes the speed, not the result: it stays out of the key
        text = json.dumps({k: v for k, v in asdict(self).items() if k != "cpu_threads"}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


#: seconds-scale settings for tests (held-out accuracy ~0.8 instead of ~0.9)
QUICK_REWARD_CONFIG = RewardModelConfig(n_buckets=2**16, epochs=2, windows_per_review=1, max_train=2000, max_eval=500)


def _windows(texts: Sequence[str], labels: Sequence[int], per_text: int, span: tuple[int, int],
             rng: np.random.Generator) -> tuple[list[str], list[int]]:
    lo, hi = span
    if not 1 <= lo <= hi:
        raise ValueError(f"window_words={span!r}: need 1 <= min <= max")
    out, ys = [], []
    for text, label in zip(texts, labels):
        toks = text.split()
        for _ in range(per_text):
            n = int(rng.integers(lo, hi + 1))
            start = int(rng.integers(0, max(1, len(toks) - n + 1)))
            out.append(" ".join(toks[start:start + n]))
            ys.append(int(label))
    return out, ys


def train_sentiment_classifier(config: RewardModelConfig = RewardModelConfig()) -> SentimentClassifier:
    """Train the classifier on the train side of the fixed IMDB split and measure it on the test side.

    ``meta`` of the result records: ``accuracy_test`` (full held-out reviews), ``accuracy_test_windows``
    (random 8-48-word snippets of them, the length of a continuation), ``accuracy_rotten_tomatoes``
    (another site's one-sentence reviews, out of domain), sizes and seconds.
    """
    with cpu_threads(config.cpu_threads):
        return _train(config)


def _train(config: RewardModelConfig) -> SentimentClassifier:
    from shiq_lab.tasks.imdb.reviews import load_reviews, split_reviews

    start = time.perf_counter()
    split = split_reviews()
    train, test = split.train, split.test
    if config.max_train is not None:
        train = train.sample(n=min(config.max_train, len(train)), random_state=config.seed)
    if config.max_eval is not None:
        test = test.sample(n=min(config.max_eval, len(test)), random_state=config.seed)
    rng = np.random.default_rng(config.seed)
    snippets, snippet_labels = _windows(train["text"], train["label"], config.windows_per_review, config.window_words, rng)
    texts = list(train["text"]) + snippets
    labels = torch.tensor(list(train["label"]) + snippet_labels, dtype=torch.float32)

    model = SentimentClassifier(config.n_buckets, config.ngram)
    bags = [model.featurizer.ids(t) for t in texts]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        order = torch.randperm(len(bags), generator=gen).tolist()
        for k in range(0, len(order), config.batch_size):
            idx = order[k:k + config.batch_size]
            logit = model.forward_bags(*_pack([bags[i] for i in idx]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    test_windows, test_window_labels = _windows(test["text"], test["label"], 1, config.window_words,
                                                np.random.default_rng(config.seed + 1))
    rt = load_reviews("rotten_tomatoes")
    if config.max_eval is not None:
        rt = rt.sample(n=min(config.max_eval, len(rt)), random_state=config.seed)
    model.meta = {
        "config": asdict(config),
        "accuracy_test": model.accuracy(list(test["text"]), list(test["label"])),
        "accuracy_test_windows": model.accuracy(test_windows, test_window_labels),
        "accuracy_rotten_tomatoes": model.accuracy(list(rt["text"]), list(rt["label"])),
        "n_train_reviews": len(train),
        "n_train_texts": len(texts),
        "n_test_reviews": len(test),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model.eval()


def _folder(config: RewardModelConfig) -> Path:
    return cache_dir() / "reward_models" / f"imdb-sentiment-{config.key()}"


def load_reward_model(config: RewardModelConfig = RewardModelConfig(), *, rebuild: bool = False) -> SentimentClassifier:
    """The cached classifier for ``config``, trained on first use (~30 s on one core for the default)."""
    folder = _folder(config)
    weights, meta_file = folder / "classifier.pt", folder / "meta.json"
    if rebuild or not (weights.exists() and meta_file.exists()):
        model = train_sentiment_classifier(config)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "classifier.pt.tmp"
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
        # the meta file is written last: its presence marks a complete build
        meta_file.write_text(json.dumps(model.meta, indent=2))
        return model
    model = SentimentClassifier(config.n_buckets, config.ngram)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.meta = json.loads(meta_file.read_text())
    return model.eval()


@dataclass
class SentimentReward:
    """The task's reward function: ``reward(prompts, completions) -> [N] tensor``.

    Args:
        classifier: a :class:`SentimentClassifier` (default: the cached :func:`load_reward_model`).
        kind: ``"prob"`` (P(positive), in [0, 1]) or ``"logit"`` (log-odds, unbounded).
        include_prompt: score ``prompt + completion`` instead of the completion alone. Off by
            default: the prompt is fixed, so only the completion is the policy's doing.
    """

    classifier: SentimentClassifier | None = None
    kind: str = "prob"
    include_prompt: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("prob", "logit"):
            raise ValueError(f"kind={self.kind!r}: choose 'prob' or 'logit'")
        if self.classifier is None:
            self.classifier = load_reward_model()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: pass one prompt per completion")
        texts = [p + c for p, c in zip(prompts, completions)] if self.include_prompt else list(completions)
        logits = self.classifier.logits(texts)
        return torch.sigmoid(logits) if self.kind == "prob" else logits
