"""Issue 12, data items: chat data cannot lose its rewards, and every error points at the user's file.

Each case asserts what the message names (row, message, field, file, line) and the fix it gives;
before these checks most of them trained silently on reward 0 or crashed deep inside a library.
"""

import json

import pytest
from datasets import Dataset

from shiq_lab.data.batch import split_by_prompt
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.formats import DataValidationError, load_dataset_spec, to_shiq_format
from shiq_lab.infra.models import load_tokenizer

USER = {"role": "user", "content": "was the movie good?"}
GOOD_TURN = {"role": "assistant", "content": "it was great.", "reward": 1.0}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _error(tok, rows, **kw) -> str:
    with pytest.raises(DataValidationError) as err:
        tokenize_dataset(rows, tok, max_length=128, **kw)
    return str(err.value)


def _chat(*messages):
    return {"messages": [USER, *messages]}


# --- chat data that cannot lose rewards ----------------------------------------------------------------


@pytest.mark.parametrize("role, hint", [("bot", ""), ("Assistant", "did you mean 'assistant'?")])
def test_unknown_role_names_row_message_and_allowed_roles(tok, role, hint):
    msg = _error(tok, [_chat(GOOD_TURN), _chat({"role": role, "content": "it was fine.", "reward": 1.0})])
    assert msg.startswith("row 1: messages[1] has role")
    assert repr(role) in msg and hint in msg and "allowed roles are system, developer, user, assistant, tool" in msg


def test_reward_on_a_user_turn_is_an_error(tok):
    rows = [_chat(GOOD_TURN), {"messages": [{**USER, "reward": 2.0}, {"role": "assistant", "content": "it was fine."}]}]
    msg = _error(tok, rows)
    assert msg.startswith("row 1: messages[0] is a user message with reward=2.0")
    assert "only assistant turns earn rewards" in msg and "move the reward onto the assistant turn" in msg


@pytest.mark.parametrize("key, value", [("rewards", [1.0, 0.5]), ("reward", 1.0)])
def test_row_level_rewards_in_multiturn_data_are_an_error_with_the_fix(tok, key, value):
    rows = [_chat(GOOD_TURN), {**_chat({"role": "assistant", "content": "it was fine."}), key: value}]
    msg = _error(tok, rows)
    assert msg.startswith(f"row 1: multi-turn rows carry rewards on their assistant messages, and the row-level '{key}'")
    assert "messages[k]['reward']" in msg


def test_multiturn_data_without_rewards_needs_an_explicit_zero(tok):
    rows = [_chat({"role": "assistant", "content": "it was great."}), _chat({"role": "assistant", "content": "no."})]
    msg = _error(tok, rows)
    assert "no assistant message in the 2 multi-turn rows has a 'reward'" in msg and "allow_zero_rewards=True" in msg
    ds = tokenize_dataset(rows, tok, allow_zero_rewards=True)
    assert [sum(r) for r in ds["token_rewards"]] == [0.0, 0.0] and all(sum(m) > 0 for m in ds["action_mask"])


def test_chosen_equal_to_rejected_is_an_error_naming_the_row(tok):
    rows = [{"prompt": "the", "chosen": " good", "rejected": " bad"}, {"prompt": "the", "chosen": " fun", "rejected": " fun"}]
    msg = _error(tok, rows)
    assert msg.startswith("row 1: chosen and rejected are identical (' fun')") and "fix or drop the row" in msg


@pytest.mark.parametrize("rows, start", [
    ([{"prompt": "the", "completion": " good", "reward": 1.0}, {"prompt": "the", "completion": "  \n", "reward": 1.0}],
     "row 1: completion is whitespace only ('  \\n')"),
    ([_chat(GOOD_TURN), _chat({"role": "assistant", "content": "   ", "reward": 1.0})],
     "row 1: messages[1] (assistant) is whitespace only"),
    ([{"prompt": "the", "chosen": " good", "rejected": " bad"}, {"prompt": "the", "chosen": " good", "rejected": " "}],
     "row 1: rejected is whitespace only (' ')"),
])
def test_whitespace_only_responses_are_errors(tok, rows, start):
    msg = _error(tok, rows)
    assert msg.startswith(start), msg
    assert "drop" in msg


def test_content_null_names_row_and_message(tok):
    msg = _error(tok, [_chat(GOOD_TURN), _chat({"role": "assistant", "content": None, "reward": 1.0})])
    assert msg.startswith("row 1: messages[1] (assistant) has content None")
    conv = [{"prompt": [USER], "completion": [{"role": "assistant", "content": "yes."}], "reward": 1.0},
            {"prompt": [USER], "completion": [{"role": "assistant", "content": None}], "reward": 1.0}]
    assert _error(tok, conv).startswith("row 1: completion[0] (assistant) has content None")


def test_malformed_reward_fields_name_row_and_field(tok):
    assert _error(tok, [{"prompt": "the", "completion": " good", "token_rewards": 1.0}]).startswith(
        "row 0: token_rewards=1.0 is a float, not a list")  # one number per row belongs in 'reward'
    rows = [{"prompt": "the", "completion": " good", "token_rewards": [0.0, 0.0]},
            {"prompt": "the", "completion": " good", "token_rewards": 1.0}]
    msg = _error(tok, rows)
    assert msg.startswith("row 1: token_rewards=1.0 is a number, but row 0 has a list there")
    assert "a list of numbers, one per completion token" in msg
    msg = _error(tok, [_chat({"role": "assistant", "content": "ok", "reward": "high"})])
    assert msg.startswith("row 0: messages[1].reward='high' is not a number")
    msg = _error(tok, [_chat(GOOD_TURN), _chat({"role": "assistant", "content": "ok", "reward": "high"})])
    assert msg.startswith("row 1: messages[1].reward='high' is a text, but row 0 has a number there")
    msg = _error(tok, [{**_chat(GOOD_TURN), "token_rewards": [1.0]}])
    assert msg.startswith("row 0: token_rewards is not read in chat data")
    with pytest.raises(DataValidationError, match=r"^row 1: label='yes'"):
        to_shiq_format([{"prompt": "a", "completion": " b", "label": True}, {"prompt": "a", "completion": " c", "label": "yes"}])


# --- errors that point at the user's file --------------------------------------------------------------


def test_a_row_of_the_eval_split_is_named_by_its_row_in_the_file(tok):
    rows = [{"prompt": f"the movie {w}", "completion": " good", "reward": 1.0}
            for w in ("was", "is", "and", "very", "really", "the", "story", "plot")]
    rows[5]["reward"] = float("nan")
    train, held = split_by_prompt(rows, 0.25, seed=0)
    bad = train if 5 in train["source_row"] else held
    assert bad["source_row"].index(5) != 5  # the split renumbers its rows ...
    msg = _error(tok, bad)
    assert msg.startswith("row 5: reward is nan")  # ... the error does not


def test_preference_errors_name_the_file_row_and_field_not_the_expanded_row(tok):
    rows = [{"prompt": "the", "chosen": " good", "rejected": " bad"} for _ in range(3)]
    rows.append({"prompt": "the", "chosen": " good", "rejected": ""})
    assert _error(tok, rows).startswith("row 3: rejected is empty")
    rows[3] = {"prompt": "the movie " * 80, "chosen": " good", "rejected": " bad"}
    assert _error(tok, rows).startswith("row 3: the prompt has")  # after expansion it is row 6 of the pairs


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "a", "completion": " b", "reward": 1.0})
    path.write_text(f"{good}\n\n{good}\n{{\"prompt\": \"a\", \"completion\": \n{good}\n")
    with pytest.raises(DataValidationError) as err:
        load_dataset_spec(str(path))
    assert str(err.value).startswith(f"{path}:4: line 4 is not valid JSON")
    listed = json.dumps({"prompt": "a", "completion": " b", "token_rewards": [0.5, 0.0]})
    path.write_text(f"{listed}\n\n" + json.dumps({"prompt": "a", "completion": " b", "token_rewards": 1.0}) + "\n")
    with pytest.raises(DataValidationError, match=r":3: row 1: token_rewards=1.0 is a number, but row 0 has a list"):
        load_dataset_spec(str(path))  # line 3 (after a blank line) is row 1
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataValidationError, match=r":2: line 2 is a JSON list, not an object"):
        load_dataset_spec(str(path))


@pytest.mark.parametrize("name, text", [("data.jsonl", ""), ("data.jsonl", "\n  \n"), ("data.json", ""), ("data.csv", "")])
def test_an_empty_file_says_it_is_empty(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataValidationError, match=rf"^dataset file {path} is empty"):
        load_dataset_spec(str(path))


def test_valid_files_still_load_and_an_empty_dataset_is_named(tmp_path, tok):
    rows = [{"prompt": "a", "completion": " b", "reward": 1.0}, {"prompt": "c", "completion": " d", "reward": 0.0}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "header.csv").write_text("prompt,completion,reward\n")
    for name in ("list.json", "lines.json"):
        assert load_dataset_spec(str(tmp_path / name)).to_list() == rows
    with pytest.raises(DataValidationError, match="has no rows"):
        load_dataset_spec(str(tmp_path / "header.csv"))
    with pytest.raises(DataValidationError, match=r"the dataset is empty \(0 rows\)"):
        tokenize_dataset(Dataset.from_dict({"prompt": [], "completion": [], "reward": []}), tok)
