"""The explorer's controls change what it shows, and what it shows is the frame's numbers."""


import numpy as np
import pytest
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.data.rewards import word_reward
from shiq_lab.views.explorer import TokenValueExplorer, normalise_examples
from shiq_lab.views.figures import display_token

PROMPT = [{"role": "user", "content": "was the movie good?"}]
EXAMPLES = [
    {"prompt": PROMPT, "chosen": "the movie was great.", "rejected": "the movie was boring."},
    {"prompt": "tell me", "response": "the music was fun."},
]


@pytest.fixture(scope="module")
def explorer():
    after, ref, tok = tiny_policy_and_reference()
    return TokenValueExplorer({"before": ref, "after": after}, tok, reference=ref, examples=EXAMPLES, beta=0.5,
                              rewards=word_reward(tok, "great"), top_k=3)


def _policy_cells(fig, trace=0):
    z = np.array(fig.data[trace].z, dtype=float)
    return z[np.isfinite(z)]


def test_starts_on_the_first_row_with_the_last_checkpoint(explorer) -> None:
    assert explorer.checkpoint.value == "after" and explorer.row.value == 0
    assert [t.name for t in explorer.figure.data][:2] == ["chosen: advantage", "rejected: advantage"]
    chosen = explorer.frame[explorer.frame.response == 0]
    np.testing.assert_allclose(_policy_cells(explorer.figure), chosen.advantage)
    assert [b.description for b in explorer.token_buttons[0]] == [display_token(t) for t in chosen.token]


def test_switching_the_quantity_redraws_with_that_column(explorer) -> None:
    before = _policy_cells(explorer.figure).copy()
    explorer.quantity.value = "v"
    after = _policy_cells(explorer.figure)
    np.testing.assert_allclose(after, explorer.frame[explorer.frame.response == 0].v)
    assert not np.allclose(before, after)
    assert explorer.token_buttons[0][0].tooltip.startswith("V(s) = ")
    explorer.quantity.value = "advantage"


def test_beta_rescales_without_rescoring(explorer) -> None:
    q = explorer.frame.q.to_numpy().copy()
    explorer.beta.value = 1.0
    np.testing.assert_allclose(explorer.frame.q, 2 * q, atol=1e-9)
    assert explorer.frame.attrs["beta"] == 1.0
    explorer.beta.value = 0.5
    np.testing.assert_allclose(explorer.frame.q, q, atol=1e-9)


def test_clicking_a_token_shows_its_alternatives(explorer) -> None:
    explorer.token_buttons[1][2].click()
    assert explorer.selected == (1, 2)
    row = explorer.frame[(explorer.frame.response == 1) & (explorer.frame.step == 2)].iloc[0]
    k = len(row.topk_ids)
    np.testing.assert_allclose(np.array(explorer.detail_figure.data[0].y[:k], dtype=float), row.topk_q)
    np.testing.assert_allclose(np.array(explorer.lines_figure.data[0].y, dtype=float),
                               explorer.frame[explorer.frame.response == 1].q)
    assert explorer.token_buttons[1][2].style.font_weight == "bold"
    assert explorer.token_buttons[0][0].style.font_weight == "normal"


def test_checkpoint_before_is_the_reference_so_everything_is_zero(explorer) -> None:
    explorer.checkpoint.value = "before"
    assert np.abs(explorer.frame[["q", "v", "advantage", "kl"]].to_numpy()).max() == 0.0
    assert np.abs(explorer.frame.residual + explorer.frame.groupby("response").reward.transform(
        lambda r: r[::-1].cumsum()[::-1])).max() < 1e-12  # at theta = ref, delta_t = -(rewards still ahead)
    explorer.checkpoint.value = "after"
    assert np.abs(explorer.frame.q).max() > 0


def test_typed_prompt_and_responses_are_scored(explorer) -> None:
    explorer.prompt_box.value = "was it good?"
    explorer.response_box.value = "it was great.\n\nit was bad."
    explorer.score_button.click()
    assert explorer.row.value == -1 and explorer.custom_box.layout.display == ""
    frame = explorer.frame
    assert sorted(set(frame.response)) == [0, 1]
    assert "".join(frame[frame.response == 0].token) == "it was great.<|im_end|>"
    assert frame.reward.sum() == 1.0
    explorer.row.value = 1
    assert explorer.custom_box.layout.display == "none" and len(explorer.token_buttons) == 1


def test_examples_are_normalised_or_refused() -> None:
    ex = normalise_examples([{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert ex[0]["titles"] == ["response 0", "response 1", "response 2"]
    with pytest.raises(ValueError, match="examples\\[0\\]"):
        normalise_examples([{"text": "no prompt"}])
    with pytest.raises(ValueError, match="no 'response'"):
        normalise_examples([{"prompt": "p"}])
