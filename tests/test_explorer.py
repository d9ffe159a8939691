"""The explorer's controls change what it shows, and what it shows is the frame's numbers."""


import numpy as np
import pytest
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.data.rewards import word_reward
from shiq_lab.views.explorer import TokenValueExplorer, normalise_examples
from shiq_lab.views.figures import colour_of, display_token
from shiq_lab.views.style import ENV_COLOUR

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


SAME_PROMPT = [{"prompt": PROMPT, "chosen": f"the {s} was great.", "rejected": f"the {s} was {a}."}
               for s in ("movie", "film") for a in ("bad", "boring")]


def test_rows_are_labelled_by_their_responses() -> None:
    after, ref, tok = tiny_policy_and_reference()
    ex = TokenValueExplorer({"after": after}, tok, reference=ref, examples=SAME_PROMPT, beta=0.5)
    labels = [label for label, value in ex.row.options if value != -1]
    assert len(set(labels)) == len(labels) == 4  # every row shares the prompt: the responses tell them apart
    assert labels[0].startswith("0: ") and "great" in labels[0] and "bad" in labels[0]
    assert "film" in labels[2] and "boring" in labels[3]


def test_the_selected_token_survives_a_checkpoint_switch_not_a_row_switch(explorer) -> None:
    explorer.row.value = 0
    explorer.select(1, 3)
    explorer.checkpoint.value = "before"
    assert explorer.selected == (1, 3)
    row = explorer.frame[(explorer.frame.response == 1) & (explorer.frame.step == 3)].iloc[0]
    np.testing.assert_allclose(np.array(explorer.detail_figure.data[0].y[:len(row.topk_ids)], dtype=float), row.topk_q)
    assert explorer.token_buttons[1][3].style.font_weight == "bold"
    explorer.checkpoint.value = "after"
    assert explorer.selected == (1, 3)
    explorer.row.value = 1
    assert explorer.selected == (0, 0)
    explorer.row.value = 0


def test_difference_view_subtracts_the_other_checkpoint(explorer) -> None:
    explorer.row.value = 0
    explorer.quantity.value = "kl"
    after = explorer.frame.copy()
    explorer.checkpoint.value = "before"
    explorer.compare.value = "after"  # before minus after: the reference has KL 0, so minus after's KL
    try:
        np.testing.assert_allclose(explorer.shown.kl.to_numpy(), -after.kl.to_numpy(), atol=1e-12)
        np.testing.assert_allclose(_policy_cells(explorer.figure), -after[after.response == 0].kl, atol=1e-12)
        axis = explorer.figure.layout.coloraxis
        assert axis.cmid == 0 and axis.cmin == -axis.cmax  # a difference is signed: diverging scale
        assert "minus after" in explorer.figure.layout.title.text and explorer.token_buttons[0][0].tooltip.startswith("Δ ")
        assert list(explorer.shown.token) == list(after.token)  # the tokens themselves are not subtracted
    finally:
        explorer.compare.value = ""
        explorer.checkpoint.value = "after"
        explorer.quantity.value = "advantage"


def test_kl_is_sequential_and_zero_is_not_environment_grey(explorer) -> None:
    explorer.row.value = 0
    explorer.quantity.value = "kl"
    try:
        axis = explorer.figure.layout.coloraxis
        assert axis.cmin == 0 and axis.cmid is None and axis.colorscale[0][1] == "rgb(247,251,255)"
        explorer.checkpoint.value = "before"  # the reference against itself: KL exactly 0 on every token
        assert explorer.frame.kl.abs().max() == 0.0
        colours = {b.style.button_color for b in explorer.token_buttons[0]}
        assert colours == {"#f7fbff"} and ENV_COLOUR not in colours  # white zero, not environment grey
    finally:
        explorer.checkpoint.value = "after"
        explorer.quantity.value = "advantage"


def test_beta_slider_says_it_changes_units_not_the_policy(explorer) -> None:
    assert "β" in explorer.beta.description and "unchanged" in explorer.beta_note.value
    prob, kl = explorer.frame.prob.to_numpy().copy(), explorer.frame.kl.to_numpy().copy()
    explorer.beta.value = 2.0
    try:
        np.testing.assert_array_equal(explorer.frame.prob, prob)
        np.testing.assert_array_equal(explorer.frame.kl, kl)
        assert "β=2" in explorer.figure.layout.title.text
    finally:
        explorer.beta.value = 0.5


def test_snapshot_is_static_html_of_the_current_strip(explorer) -> None:
    explorer.row.value = 0
    html = explorer.snapshot().data
    assert "<script" not in html and "Static snapshot" in html
    chosen = explorer.frame[explorer.frame.response == 0]
    top = explorer.frame.loc[explorer.frame.is_policy, "advantage"].abs().max()
    for token, value in zip(chosen.token, chosen.advantage):
        assert f"background:{colour_of(value, -top, top, 'RdBu')}" in html
        assert display_token(token).replace("<", "&lt;").replace(">", "&gt;").replace("|", "|") in html
