"""Issue 9's seam: the training encoder and the token view give identical ids, policy masks and token rewards.

Each chat of a catalogue (trailing whitespace, tool turns, several assistant turns, a reward per
turn, no system prompt) is encoded three ways under several chat templates: ``tokenize_dataset``
(what the trainer learns from), ``encode_responses`` (what the views and the simple fit encode) and
the rows of ``token_values`` (what a user is shown). The view is the training encoding cut after
its last policy token, so on that span all three must agree exactly.
"""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.data.encode import encode_responses, tokenize_dataset
from shiq_lab.infra.models import CHAT_TEMPLATE, cache_dir
from shiq_lab.views.token_values import token_values

#: SmolLM2-Instruct's template: a default system prompt when the chat has none
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: no role headers around assistant text, the end-of-turn token directly followed by the next turn
TERSE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A:' + m['content'] + eos_token }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
TEMPLATES = {"chatml": CHAT_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE, "terse": TERSE_TEMPLATE}

USER = [{"role": "user", "content": "was the movie good?"}]
SYSTEM = [{"role": "system", "content": "answer briefly"}]
# (prompt messages, response messages): rewards sit on assistant turns, as in multiturn training data
CATALOGUE = {
    "trailing_whitespace": (USER, [{"role": "assistant", "content": "  was great.  ", "reward": 1.5}]),
    "leading_newline": (SYSTEM + USER, [{"role": "assistant", "content": "\nthe film was fun.\n", "reward": -0.5}]),
    "tool_turn": (USER, [
        {"role": "assistant", "content": "let me check the weather", "reward": 0.25},
        {"role": "tool", "content": "result great"},
        {"role": "assistant", "content": "the film was great. ", "reward": 1.0},
    ]),
    "several_assistant_turns": (SYSTEM + USER, [
        {"role": "assistant", "content": "it was boring.", "reward": -1.0},
        {"role": "user", "content": "and the music?"},
        {"role": "assistant", "content": " the music was really good", "reward": 2.0},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome.", "reward": 0.5},
    ]),
    "no_system_prompt": (USER, [{"role": "assistant", "content": "a great great film", "reward": 3.0}]),
}


@pytest.fixture(scope="module")
def tiny():
    policy, ref, tok = tiny_policy_and_reference()
    return policy.eval(), ref.eval(), tok


def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def _training_row(tok, messages):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenize_dataset([{"messages": messages}], tok, max_length=4096)[0]


def _assert_seam(tok, prompt, response, df=None):
    train = _training_row(tok, prompt + response)
    (view,) = encode_responses(tok, prompt, [response])
    ids, mask, rewards = train["input_ids"], train["action_mask"], train["token_rewards"]
    last = len(mask) - 1 - mask[::-1].index(1)
    assert view.start == train["prompt_length"] == mask.index(1)
    assert view.input_ids == ids[: last + 1]
    assert [int(p) for p in view.policy] == mask[view.start: last + 1]
    assert view.rewards == rewards[view.start: last + 1]
    assert sum(view.rewards) == sum(rewards) == sum(m.get("reward", 0.0) for m in response)
    if df is not None:  # what the user is shown
        assert df.token_id.tolist() == view.row_ids
        assert df.is_policy.astype(int).tolist() == mask[view.start: last + 1]
        assert df.reward.tolist() == rewards[view.start: last + 1]
    return train, view


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_training_encoder_and_token_view_agree(tiny, template, case) -> None:
    policy, ref, tok = tiny
    tok = _with_template(tok, TEMPLATES[template])
    prompt, response = CATALOGUE[case]
    df = token_values(policy, tok, prompt, [response], reference=ref, beta=0.3)
    _assert_seam(tok, prompt, response, df)


def test_trailing_whitespace_and_end_of_turn_are_policy_actions_in_the_view(tiny) -> None:
    """Review section 2.3: the view used to strip the content and drop the end-of-turn token."""
    _, _, tok = tiny
    prompt, response = CATALOGUE["trailing_whitespace"]
    _, view = _assert_seam(tok, prompt, response)
    policy_ids = [t for t, p in zip(view.row_ids, view.policy) if p]
    assert tok.decode(policy_ids) == "  was great.  <|im_end|>"
    assert view.row_ids[-1] == tok.eos_token_id and view.rewards[-1] == 1.5


def test_no_system_prompt_template_adds_its_default_as_environment(tiny) -> None:
    _, _, tok = tiny
    tok = _with_template(tok, SMOLLM2_TEMPLATE)
    prompt, response = CATALOGUE["no_system_prompt"]
    train, view = _assert_seam(tok, prompt, response)
    head = tok.decode(train["input_ids"][: view.start])
    assert head.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert head.endswith("<|im_start|>assistant\n")


def test_text_rows_and_conversational_rows_agree_with_their_views(tiny) -> None:
    policy, ref, tok = tiny
    # standard: a sequence reward on the appended EOS in both
    train = tokenize_dataset([{"prompt": "the movie", "completion": " was great. ", "reward": 2.0}], tok)[0]
    (view,) = encode_responses(tok, "the movie", [" was great. "], add_eos=True)
    df = token_values(policy, tok, "the movie", [" was great. "], reference=ref, add_eos=True, rewards=[2.0])
    assert view.input_ids == train["input_ids"] and view.start == train["prompt_length"]
    assert df.token_id.tolist() == view.row_ids and df.is_policy.all()
    assert df.reward.tolist() == train["token_rewards"][view.start:]
    # conversational: the row's reward on the last assistant turn's last policy token
    prompt, response = CATALOGUE["tool_turn"]
    plain = [{k: v for k, v in m.items() if k != "reward"} for m in response]
    row = tokenize_dataset([{"prompt": prompt, "completion": plain, "reward": 1.25}], tok, max_length=4096)[0]
    df = token_values(policy, tok, prompt, [plain], reference=ref, rewards=[1.25])
    start = row["prompt_length"]
    assert df.token_id.tolist() == row["input_ids"][start: start + len(df)]
    assert df.reward.tolist() == row["token_rewards"][start: start + len(df)]


def test_smollm2_tokenizer_when_its_checkpoint_is_built() -> None:
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (Path(folder) / "tokenizer.json").exists():
        pytest.skip("smollm2-135m is not built here (make assets + first load); the template is covered above")
    from shiq_lab.infra.models import load_tokenizer

    tok = load_tokenizer(folder)
    for prompt, response in CATALOGUE.values():
        _assert_seam(tok, prompt, response)
    assert torch.tensor(encode_responses(tok, *CATALOGUE["trailing_whitespace"])[0].row_ids)[-1] == tok.eos_token_id
