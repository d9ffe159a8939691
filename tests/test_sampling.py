"""Batched ancestral sampling: the sampled distribution, left padding, EOS handling, the offline dataset."""

import pytest
import torch
from helpers.fake_lm import NEVER, FakeLM, constant_table

from shiq_lab.evaluation.sampling import build_offline_dataset, sample_batch, sample_completions, score_samples
from shiq_lab.infra.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_samples_follow_the_model_distribution(tok):
    probs = {10: 0.1, 11: 0.2, 12: 0.3, 13: 0.4}
    model = FakeLM(constant_table(probs, len(tok)))
    s = sample_completions(model, tok, ["the movie"], samples_per_prompt=4000, max_new_tokens=1, batch_size=1000)
    first = torch.tensor([c[0] for c in s.completion_ids])
    for token, p in probs.items():
        # 4000 draws: standard error <= 0.008
        assert (first == token).float().mean().item() == pytest.approx(p, abs=0.03)
    assert s.group == [0] * 4000 and not any(s.finished)


def test_eos_ends_each_row_at_its_own_position_under_left_padding(tok):
    eos = tok.eos_token_id
    table = constant_table({20: 0.5, 21: 0.5}, len(tok))
    table[6:] = NEVER
    table[6:, eos] = 0.0  # from the state at position 6 on, EOS is certain
    prompts = ["the movie was very good and fun", "a film"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert lengths[0] != lengths[1]
    s = sample_completions(FakeLM(table), tok, prompts, max_new_tokens=12, batch_size=2)
    for p_len, ids, done in zip(lengths, s.completion_ids, s.finished):
        # the token at absolute index i is drawn at the state of position i - 1: EOS from index 7 on
        assert len(ids) == max(p_len, 7) - p_len + 1
        assert ids[-1] == eos and done
        assert all(t in (20, 21) for t in ids[:-1])
    short = sample_completions(FakeLM(table), tok, ["a film"], max_new_tokens=2)
    assert len(short.completion_ids[0]) == 2 and short.finished == [False]  # truncated before EOS


def _greedy_without_cache(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(nxt))
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def test_batched_kv_cache_sampling_matches_a_plain_loop():
    model, tok = load_model("tiny")
    prompts = ["the movie was great", "bad", "what a wonderful and very long film this was"]
    # temperature -> 0 makes sampling greedy, so the batched, left-padded, cached loop must
    # reproduce a one-prompt, full-recompute argmax loop exactly
    s = sample_completions(model, tok, prompts, max_new_tokens=6, temperature=1e-4, batch_size=3)
    for prompt, ids in zip(prompts, s.completion_ids):
        assert ids == _greedy_without_cache(model, tok, prompt, 6)


def test_sampling_is_seeded():
    model, tok = load_model("tiny")
    a = sample_completions(model, tok, ["the film"], samples_per_prompt=4, max_new_tokens=5, seed=1)
    b = sample_completions(model, tok, ["the film"], samples_per_prompt=4, max_new_tokens=5, seed=1)
    c = sample_completions(model, tok, ["the film"], samples_per_prompt=4, max_new_tokens=5, seed=2)
    assert a.completion_ids == b.completion_ids != c.completion_ids
    assert a.completions == tok.batch_decode(a.completion_ids, skip_special_tokens=True)


def test_offline_dataset_rows_carry_the_sampled_tokens_and_their_rewards(tok):
    model, _ = load_model("tiny")

    def reward(prompts, completions):  # length of the completion text: easy to recompute
        return torch.tensor([float(len(c)) for c in completions])

    prompts = ["the movie", "a film was"]
    ds = build_offline_dataset(model, tok, prompts, reward, samples_per_prompt=3, max_new_tokens=4)
    assert len(ds) == 6 and ds["group"] == [0, 0, 0, 1, 1, 1]
    assert ds["prompt"] == [prompts[0]] * 3 + [prompts[1]] * 3
    for row in ds:
        assert row["prompt_ids"] == tok(row["prompt"])["input_ids"]
        assert row["completion"] == tok.decode(row["completion_ids"], skip_special_tokens=True)
        assert row["reward"] == float(len(row["completion"]))
        assert 1 <= len(row["completion_ids"]) <= 4


def test_bad_inputs_name_the_problem(tok):
    model = FakeLM(constant_table({10: 1.0}, len(tok)))
    with pytest.raises(ValueError, match="empty strings"):
        sample_completions(model, tok, ["ok", ""])
    with pytest.raises(TypeError, match="list of strings"):
        sample_completions(model, tok, "one prompt")
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, tok, ["ok"], temperature=0)
    s = sample_completions(model, tok, ["ok"], max_new_tokens=2)
    with pytest.raises(ValueError, match="rewards"):
        s.to_dataset()
    with pytest.raises(ValueError, match="returned 2 rewards for 1 samples"):
        score_samples(s, lambda p, c: torch.zeros(2))


def test_sample_batch_with_one_generator_per_row_draws_each_row_as_if_alone(tok):
    model = FakeLM(constant_table({10: 0.25, 11: 0.25, 12: 0.25, 13: 0.25}, len(tok)))
    prompts = [tok(p)["input_ids"] for p in ["the movie was very good", "a film", "ok then"]]

    def draw(rows, seeds, temperature=1.0):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_batch(model, rows, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=12,
                            temperature=temperature, generator=gens, device="cpu")

    together = draw(prompts, [1, 2, 3])
    assert together == [draw([p], [s])[0] for p, s in zip(prompts, [1, 2, 3])]
    assert len({tuple(r) for r in together}) == 3 and draw(prompts[:1], [4]) != together[:1]
    greedy = FakeLM(constant_table({10: 0.2, 11: 0.5, 12: 0.3}, len(tok)))
    assert sample_batch(greedy, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=3,
                        temperature=0.0, generator=None, device="cpu") == [[11, 11, 11]] * 3
