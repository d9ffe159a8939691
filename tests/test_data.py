"""Data layer: formats, token alignment, validation errors, truncation, normalisation, batching."""

import json
import math
import warnings

import pytest
import torch
from datasets import Dataset

from shiq_lab.data.batch import ShiQCollator, group_by_prompt, make_pairs, split_by_prompt
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.formats import DataValidationError, detect_format, load_dataset_spec, to_shiq_format
from shiq_lab.data.rewards import normalize_rewards
from shiq_lab.data.toy import synthetic_dataset
from shiq_lab.infra.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_standard_row_layout_is_prompt_then_completion_then_eos(tok):
    ds = tokenize_dataset([{"prompt": "the movie", "completion": " was great.", "reward": 2.5}], tok, max_length=32)
    row = ds[0]
    p, c = enc(tok, "the movie"), enc(tok, " was great.")
    assert row["input_ids"] == p + c + [tok.eos_token_id]
    assert row["action_mask"] == [0] * len(p) + [1] * (len(c) + 1)
    assert row["token_rewards"] == [0.0] * (len(p) + len(c)) + [2.5]
    assert row["prompt_length"] == len(p) and row["truncated"] is False


def test_token_rewards_align_with_completion_tokens_with_or_without_eos(tok):
    c = enc(tok, " good bad good")
    n = len(c)
    short = tokenize_dataset([{"prompt": "the", "completion": " good bad good", "token_rewards": list(range(1, n + 1))}], tok)
    full = tokenize_dataset([{"prompt": "the", "completion": " good bad good", "token_rewards": list(range(1, n + 2))}], tok)
    p = len(enc(tok, "the"))
    assert short[0]["token_rewards"][p:] == [float(k) for k in range(1, n + 1)] + [0.0]
    assert full[0]["token_rewards"][p:] == [float(k) for k in range(1, n + 2)]
    # a sequence reward on top of token rewards lands on the last (EOS) token
    both = tokenize_dataset([{"prompt": "the", "completion": " good bad good", "token_rewards": [1.0] * n, "reward": 5.0}], tok)
    assert both[0]["token_rewards"][p:] == [1.0] * n + [5.0]


def test_pretokenised_rows_are_used_as_they_are(tok):
    ds = tokenize_dataset([{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "reward": 1.0}], tok)
    assert ds[0]["input_ids"] == [5, 6, 7, 8, 9]
    assert ds[0]["action_mask"] == [0, 0, 0, 1, 1]
    assert ds[0]["token_rewards"] == [0, 0, 0, 0, 1.0]
    with pytest.warns(UserWarning, match="1 of 2 responses did not finish"):
        tokenize_dataset([{"prompt_ids": [5], "completion_ids": [8, tok.eos_token_id], "reward": 1.0, "finished": True},
                          {"prompt_ids": [5], "completion_ids": [8, 9], "reward": 0.0, "finished": False}], tok)


def test_multiturn_masks_user_turns_and_puts_each_turn_reward_on_its_last_token(tok):
    messages = [
        {"role": "user", "content": "the movie"},
        {"role": "assistant", "content": "was great.", "reward": 1.0},
        {"role": "user", "content": "and the music"},
        {"role": "assistant", "content": "awful.", "reward": -2.0},
    ]
    row = tokenize_dataset([{"messages": messages}], tok, max_length=128)[0]
    ids, mask, rewards = row["input_ids"], row["action_mask"], row["token_rewards"]
    # the policy tokens are exactly the assistant contents followed by their end-of-turn token
    policy_text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert policy_text == "was great.<|im_end|>awful.<|im_end|>"
    # the whole sequence is what the chat template renders
    assert tok.decode(ids) == tok.apply_chat_template([{k: v for k, v in m.items() if k != "reward"} for m in messages],
                                                      tokenize=False)
    ends = [t for t in range(len(ids)) if mask[t] and ids[t] == tok.eos_token_id]
    assert [rewards[t] for t in ends] == [1.0, -2.0]
    assert sum(rewards) == -1.0 and sum(r != 0 for r in rewards) == 2
    # user text (including its end-of-turn token) is masked
    user_positions = [t for t in range(len(ids)) if not mask[t]]
    assert "and the music" in tok.decode([ids[t] for t in user_positions])


def test_conversational_prompt_completion_puts_reward_on_last_assistant_token(tok):
    ds = tokenize_dataset([{"prompt": [{"role": "user", "content": "the movie"}],
                            "completion": [{"role": "assistant", "content": "great."}], "reward": 3.0}], tok)
    row = ds[0]
    assert detect_format([{"prompt": [{"role": "user", "content": "x"}], "completion": [], "reward": 1}]) == "conversational"
    last = max(t for t, m in enumerate(row["action_mask"]) if m)
    assert row["token_rewards"][last] == 3.0 and sum(row["token_rewards"]) == 3.0
    assert tok.decode([i for i, m in zip(row["input_ids"], row["action_mask"]) if m]) == "great.<|im_end|>"


def test_preference_and_unpaired_formats_convert_to_rewarded_rows(tok):
    pref = to_shiq_format([{"prompt": "the", "chosen": " good", "rejected": " bad"},
                           {"prompt": "a", "chosen": " fun", "rejected": " dull"}], preference_rewards=(2.0, -1.0))
    assert pref["completion"] == [" good", " bad", " fun", " dull"]
    assert pref["reward"] == [2.0, -1.0, 2.0, -1.0]
    assert pref["group"][0] == pref["group"][1] != pref["group"][2]
    unp = to_shiq_format([{"prompt": "the", "completion": " good", "label": True},
                          {"prompt": "the", "completion": " bad", "label": False}])
    assert unp["reward"] == [1.0, 0.0]
    tokenised = tokenize_dataset(pref, tok)
    assert tokenised["group"] == [0, 0, 1, 1]
    assert detect_format(synthetic_dataset(2, kind="preference")) == "preference"


def test_group_defaults_to_prompt_and_respects_group_column(tok):
    ds = tokenize_dataset([{"prompt": "a", "completion": " x", "reward": 0}, {"prompt": "b", "completion": " y", "reward": 0},
                           {"prompt": "a", "completion": " z", "reward": 0}], tok)
    assert list(ds["group"]) == [0, 1, 0]
    ds = tokenize_dataset([{"prompt": "a", "completion": " x", "reward": 0, "group": "g1"},
                           {"prompt": "b", "completion": " y", "reward": 0, "group": "g1"}], tok)
    assert list(ds["group"]) == [0, 0]


@pytest.mark.parametrize("row, field, fix", [
    ({"prompt": "the", "completion": "", "reward": 1.0}, "completion is empty", "drop"),
    ({"prompt": "the", "completion": " good", "reward": float("nan")}, "reward is nan", "finite"),
    ({"prompt": "the", "completion": " good", "reward": None}, "reward is missing", "finite reward"),
    ({"prompt": "the", "completion": " good bad", "token_rewards": [1.0]}, "token_rewards has 1 values", "one reward per"),
    ({"prompt": "the", "completion": " good", "token_rewards": [float("inf"), 0.0]}, "token_rewards[0] is inf", "finite"),
    ({"prompt": "the movie " * 30, "completion": " good", "reward": 1.0}, "leaves no room", "raise max_length"),
])
def test_bad_rows_raise_errors_naming_row_field_and_fix(tok, row, field, fix):
    good = {"prompt": "the", "completion": " fine", "reward": 0.0}
    with pytest.raises(DataValidationError) as err:
        tokenize_dataset([good, row], tok, max_length=32)
    msg = str(err.value).lower()
    assert "row 1" in msg and field.lower() in msg and fix.lower() in msg


def test_missing_pad_token_and_bad_columns_are_clear_errors(tok):
    no_pad = load_tokenizer("tiny")
    no_pad.pad_token = None
    with pytest.raises(DataValidationError, match=r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        tokenize_dataset([{"prompt": "a", "completion": " b", "reward": 1}], no_pad)
    with pytest.raises(DataValidationError, match="pad_token_id is None"):
        ShiQCollator(None)
    with pytest.raises(DataValidationError, match="no reward"):
        detect_format([{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataValidationError, match="unrecognised dataset columns"):
        detect_format([{"text": "a"}])
    with pytest.raises(DataValidationError, match="no assistant turn"):
        tokenize_dataset([{"messages": [{"role": "user", "content": "hi"}]}], tok)


def test_truncation_policy_truncate_conserves_return_drop_and_error(tok):
    long = {"prompt": "the", "completion": " good" * 20, "token_rewards": [0.5] * 20, "reward": 1.0}
    short = {"prompt": "the", "completion": " good", "reward": 1.0}
    p = len(enc(tok, "the"))
    with pytest.warns(UserWarning, match="1 of 2 rows were cut"):
        ds = tokenize_dataset([long, short], tok, max_length=8)
    row = ds[0]
    assert len(row["input_ids"]) == 8 and row["truncated"] is True and ds[1]["truncated"] is False
    assert row["input_ids"][-1] != tok.eos_token_id  # no EOS: treated as terminal after its last kept token
    assert math.isclose(sum(row["token_rewards"]), 0.5 * 20 + 1.0)  # return conserved
    assert row["token_rewards"][p:-1] == [0.5] * (8 - p - 1)  # kept tokens keep their own rewards
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        dropped = tokenize_dataset([long, short], tok, max_length=8, truncation="drop")
    assert len(dropped) == 1 and dropped[0]["input_ids"] == tokenize_dataset([short], tok)[0]["input_ids"]
    with pytest.raises(DataValidationError, match="row 0: 22 tokens exceed max_length=8"):
        tokenize_dataset([long, short], tok, max_length=8, truncation="error")


def test_zscore_normalisation_gives_unit_returns_and_keeps_token_shaping(tok):
    rows = [{"prompt": "the", "completion": " good bad", "token_rewards": [1.0, 3.0], "reward": r} for r in (0.0, 2.0, 4.0, 10.0)]
    ds = tokenize_dataset(rows, tok)
    out, stats = normalize_rewards(ds, "zscore")
    returns = torch.tensor([sum(r) for r in out["token_rewards"]], dtype=torch.float64)
    raw = torch.tensor([4.0, 6.0, 8.0, 14.0], dtype=torch.float64)
    assert stats["mean"] == pytest.approx(8.0) and stats["std"] == pytest.approx(float(raw.std(unbiased=False)))
    assert torch.allclose(returns, (raw - 8.0) / stats["std"])
    p = len(enc(tok, "the"))
    r0 = out[0]["token_rewards"]
    assert r0[p + 1] / r0[p] == pytest.approx(3.0)  # token shaping kept (divided by std only)
    again, _ = normalize_rewards(ds, "zscore", stats=stats)  # eval data reuse the training stats
    assert again["token_rewards"] == out["token_rewards"]
    assert normalize_rewards(ds, "none")[0] is ds


def test_group_by_prompt_collator_flattens_groups_and_builds_pairs(tok):
    rows = [{"prompt": "a", "completion": " good", "reward": 1.0}, {"prompt": "a", "completion": " bad", "reward": -1.0},
            {"prompt": "a", "completion": " fine", "reward": 0.0}, {"prompt": "b", "completion": " x", "reward": 0.0},
            {"prompt": "c", "completion": " y", "reward": 2.0}, {"prompt": "c", "completion": " z", "reward": 2.0}]
    ds = tokenize_dataset(rows, tok)
    with pytest.warns(UserWarning, match="dropped 1 of 3 prompts"):
        grouped = group_by_prompt(ds)
    assert len(grouped) == 2 and [len(g) for g in grouped["input_ids"]] == [3, 2]
    batch = ShiQCollator(tok.pad_token_id, pair_mode="all")([grouped[0], grouped[1]])
    assert batch["input_ids"].shape[0] == 5
    assert batch["group"].tolist() == [0, 0, 0, 2, 2]
    assert batch["pairs"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
    pref = ShiQCollator(tok.pad_token_id, pair_mode="preference")([grouped[0], grouped[1]])
    assert pref["pairs"].tolist() == [[0, 1], [0, 2], [2, 1]]  # (better, worse); the tie in group 2 gives none
    assert make_pairs(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), "all").shape == (0, 2)


def test_collator_pads_right_and_keeps_values(tok):
    ds = tokenize_dataset([{"prompt": "the", "completion": " good", "reward": 1.0},
                           {"prompt": "the movie was", "completion": " good and great", "reward": -1.0}], tok)
    rows = [dict(r, ref_logp=[0.5] * len(r["input_ids"]), ref_logz=[1.5] * len(r["input_ids"])) for r in ds]
    b = ShiQCollator(tok.pad_token_id)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert b["input_ids"].shape == (2, n1) and n0 < n1
    assert b["input_ids"][0, n0:].eq(tok.pad_token_id).all() and b["attention_mask"][0].sum() == n0
    assert b["action_mask"][0, n0:].eq(0).all() and b["ref_logp"][0, n0:].eq(0).all()
    assert b["ref_logz"][1].sum() == pytest.approx(1.5 * n1)
    assert (b["token_rewards"] * b["action_mask"]).sum(1).tolist() == [1.0, -1.0]
    assert b["prompt_length"].tolist() == [r["prompt_length"] for r in rows]


def test_synthetic_data_and_dataset_specs(tmp_path, tok):
    ds = synthetic_dataset(6, seed=1)
    assert len(ds) == 6 and ds["prompt"][0] == ds["prompt"][1]
    assert synthetic_dataset(6, seed=1)["completion"] == ds["completion"]  # deterministic
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ds.to_list()))
    assert load_dataset_spec(str(path))["reward"] == ds["reward"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_spec(str(tmp_path / "saved"))["completion"] == ds["completion"]
    assert load_dataset_spec("shiq_lab.data:synthetic_dataset", n=3, seed=1)["completion"] == ds["completion"][:3]
    assert detect_format(load_dataset_spec("synthetic:multiturn", n=2)) == "multiturn"
    with pytest.raises(ValueError, match="not a file"):
        load_dataset_spec("no_such_thing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(tokenize_dataset(load_dataset_spec("synthetic:multiturn", n=4), tok, max_length=128), Dataset)


def test_split_by_prompt_keeps_each_prompts_responses_on_one_side():
    ds = synthetic_dataset(40, seed=2)
    train, held = split_by_prompt(ds, 0.25, seed=0)
    assert len(train) + len(held) == 40 and len(held) > 0
    assert not set(train["prompt"]) & set(held["prompt"])
    n_prompts = len(set(ds["prompt"]))
    assert len(set(held["prompt"])) == round(0.25 * n_prompts)
    assert split_by_prompt(ds, 0.25, seed=0)[1]["completion"] == held["completion"]  # deterministic
    with pytest.raises(ValueError, match=r"fraction=1\.5"):
        split_by_prompt(ds, 1.5)


def test_pad_right_left_multiple_and_dtype():
    from shiq_lab.data.batch import pad, pad_with_mask

    rows = [[5, 6, 7], [8], []]
    assert pad(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad(rows, -1, "left").tolist() == [[5, 6, 7], [-1, -1, 8], [-1, -1, -1]]
    assert pad(rows, 0, pad_to_multiple_of=4).shape == (3, 4)
    floats = pad([torch.tensor([0.5, 1.5]), torch.tensor([2.5])], 0)
    assert floats.dtype == torch.float32 and floats.tolist() == [[0.5, 1.5], [2.5, 0.0]]
    assert pad([[1, 2], [3]], 0, dtype=torch.float32).dtype == torch.float32
    ids, mask = pad_with_mask([[5, 6, 7], [8]], pad_id=9, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        pad(rows, 0, "middle")


def test_one_pad_id_fallback_pad_then_eos_then_an_error_naming_the_fix():
    from types import SimpleNamespace

    from shiq_lab.data.batch import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(DataValidationError, match=r"tokenizer\.pad_token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_batch_of_encoded_responses_is_the_input_aligned_rows_shifted_by_one(tok):
    from shiq_lab.data.batch import batch_responses
    from shiq_lab.data.encode import encode_responses

    enc = encode_responses(tok, [[{"role": "user", "content": "hi"}], "the movie"],
                           [[{"role": "assistant", "content": "good.", "reward": 2.0}], " was bad"])
    batch = batch_responses(enc, pad_id=tok.pad_token_id)
    for b, e in enumerate(enc):
        n = len(e.input_ids)
        assert batch.input_ids[b, :n].tolist() == e.input_ids and batch.attention_mask[b].sum() == n
        # column t of the [B, T-1] layout is action t+1: the response's rows sit in columns start-1 .. n-2
        assert batch.mask[b, e.start - 1: n - 1].tolist() == [int(p) for p in e.policy]
        assert batch.rows[b].sum() == e.n_rows and batch.rewards[b, e.start - 1: n - 1].tolist() == e.rewards
        assert (batch.actions[b] == batch.input_ids[b, 1:]).all()
    assert batch.rewards.sum() == 2.0


def test_old_encoding_module_path_is_the_merged_encoder():
    import importlib
    import sys

    import shiq_lab.data.encode as encode

    sys.modules.pop("shiq_lab.encoding", None)
    with pytest.warns(DeprecationWarning, match="shiq_lab.data.encode"):
        old = importlib.import_module("shiq_lab.encoding")
    assert old is encode
    for name in ("encode_responses", "EncodedResponse", "PaddedBatch", "pad_batch", "Prompt", "Response", "Message"):
        assert hasattr(old, name), name
