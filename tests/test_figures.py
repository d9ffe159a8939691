"""Figures show the frame's numbers where they belong: cells, lines, bars, colour scale, offline renderers."""


import numpy as np
import plotly.io as pio
import pytest
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.data.rewards import word_reward
from shiq_lab.views.figures import (
    NON_NEGATIVE,
    QUANTITIES,
    chromium_path,
    colour_of,
    configure_plotly,
    display_token,
    token_html,
    token_strip,
    topk_bars,
    value_lines,
)
from shiq_lab.views.token_values import token_values

PROMPT = [{"role": "user", "content": "was the movie good?"}]
MULTI_TURN = [
    {"role": "assistant", "content": "let me check"},
    {"role": "tool", "content": "result great"},
    {"role": "assistant", "content": "the film was great."},
]


@pytest.fixture(scope="module")
def frame():
    policy, ref, tok = tiny_policy_and_reference()
    return token_values(policy, tok, PROMPT, ["the movie was great and the music was really good.", MULTI_TURN],
                        reference=ref, beta=0.5, rewards=word_reward(tok, "great"), top_k=3)


@pytest.fixture()
def plotly_defaults():
    """configure_plotly changes plotly's global defaults: give the other tests theirs back."""
    renderer, template = pio.renderers.default, pio.templates.default
    yield
    pio.renderers.default, pio.templates.default = renderer, template


def _cells(fig, trace):
    z = np.array(fig.data[trace].z, dtype=float)
    text = np.array(fig.data[trace].text, dtype=object)
    return z, text


@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_token_strip_cells_hold_the_quantity_of_their_token(frame, quantity) -> None:
    fig = token_strip(frame, quantity, tokens_per_line=5)
    # traces: response 0 (policy), response 1 (policy), response 1 (environment)
    assert [t.name.split(":")[0] for t in fig.data] == ["response 0", "response 1", "response 1"]
    for trace, r in ((0, 0), (1, 1)):
        z, text = _cells(fig, trace)
        rows = frame[frame.response == r]
        placed = [(text[i, j], z[i, j]) for i in range(z.shape[0]) for j in range(z.shape[1]) if text[i, j]]
        assert [t for t, _ in placed] == [display_token(t) for t in rows.token]  # reading order = token order
        values = np.array([v for _, v in placed])
        expected = np.where(rows.is_policy, rows[quantity], np.nan)
        np.testing.assert_allclose(values, expected, atol=1e-12)  # environment cells are holes in this trace
    z_env, _ = _cells(fig, 2)
    assert np.isfinite(z_env).sum() == (~frame[frame.response == 1].is_policy).sum()
    policy_values = frame.loc[frame.is_policy, quantity].abs()
    zmax = policy_values.max() if policy_values.max() > 0 else 1.0
    if quantity in NON_NEGATIVE:  # KL and probabilities: a sequential scale from 0 (probabilities to 1)
        assert (frame.loc[frame.is_policy, quantity] >= -1e-12).all()
        assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmid is None
        assert fig.layout.coloraxis.cmax == pytest.approx(1.0 if quantity == "prob" else zmax)
        assert fig.layout.coloraxis.colorscale[0][1] == "rgb(247,251,255)"  # Blues starts white
    else:
        assert fig.layout.coloraxis.cmin == pytest.approx(-zmax) and fig.layout.coloraxis.cmax == pytest.approx(zmax)
        assert fig.layout.coloraxis.cmid == 0
    assert fig.layout.autosize and fig.layout.width is None  # follows its output area


def test_each_turn_starts_a_line_and_hover_shows_every_quantity(frame) -> None:
    fig = token_strip(frame, "q", responses=[1], titles=["multi-turn"], tokens_per_line=40)
    _, text = _cells(fig, 0)
    assert list(fig.layout.yaxis.ticktext) == ["assistant", "tool", "assistant"]  # three turns, three lines
    assert text[1, 0] == "<|im_start|>" and "result" in list(text[1])
    row = frame[(frame.response == 1) & frame.is_policy].iloc[2]
    hover = np.array(fig.data[0].hovertext, dtype=object)
    cell = hover[0, 2]
    for name, col in (("Q", "q"), ("V", "v"), ("A", "advantage"), ("residual", "residual"), ("KL", "kl")):
        assert f"{name} {row[col]:+.4f}" in cell


def test_shared_scale_and_bad_choices(frame) -> None:
    fig = token_strip(frame, "advantage", zmax=2.0)
    assert fig.layout.coloraxis.cmax == 2.0 and all(t.coloraxis in (None, "coloraxis") for t in fig.data)
    assert sum(t.coloraxis == "coloraxis" for t in fig.data) == 2  # both responses on one scale
    with pytest.raises(ValueError, match="quantity"):
        token_strip(frame, "value")
    with pytest.raises(ValueError, match="responses"):
        token_strip(frame, "q", responses=[7])


def test_value_lines_plot_the_columns(frame) -> None:
    fig = value_lines(frame, 1, quantities=("q", "v", "residual"))
    rows = frame[frame.response == 1]
    for trace, col in zip(fig.data, ("q", "v", "residual")):
        np.testing.assert_allclose(np.array(trace.y, dtype=float), rows[col].to_numpy(float), atol=1e-12)
        assert list(trace.x) == rows.step.tolist()
    assert len(fig.layout.shapes) == (~rows.is_policy).sum() + 1  # one grey band per environment token, plus y=0


def test_topk_bars_show_alternatives_and_the_taken_token(frame) -> None:
    row = frame[(frame.response == 0) & (frame.step == 3)].iloc[0]
    fig = topk_bars(frame, 0, 3)
    q, p, p_ref = (np.array(t.y, dtype=float) for t in fig.data)
    k = len(row.topk_ids)
    np.testing.assert_allclose(q[:k], row.topk_q)
    np.testing.assert_allclose(p[:k], row.topk_prob)
    np.testing.assert_allclose(p_ref[:k], row.topk_ref_prob)
    if row.token_id not in list(row.topk_ids):  # the taken token is appended with its own numbers
        assert q[-1] == pytest.approx(row.q) and p[-1] == pytest.approx(row.prob)
    assert list(fig.data[0].marker.color).count("#ff7f0e") == 1


def test_offline_renderers_reference_no_cdn(plotly_defaults) -> None:
    from shiq_lab.views.figures import _html_renderer

    assert configure_plotly(static=False) == "plotly_mimetype"  # outside a kernel: no HTML copy to inline into
    html = _html_renderer().to_mimebundle(token_strip_stub().to_dict())["text/html"]
    assert "Plotly.newPlot" in html and "<script src=" not in html and "cdn" not in html.lower()


def token_strip_stub():  # a small figure: the renderers, not the content, are under test
    import plotly.graph_objects as go

    return go.Figure(go.Bar(y=[1, 2]))


@pytest.mark.skipif(chromium_path() is None, reason="no chromium installed (make browser-deps): static copies need one")
def test_static_copies_are_scalable_svg_never_a_fixed_png(plotly_defaults) -> None:
    # JupyterLab's plotly extension shows a bundled PNG first, at its own size: legends got cropped
    assert configure_plotly() == "plotly_mimetype+shiq_svg"
    bundle = pio.renderers._build_mime_bundle(token_strip_stub().to_dict(), renderers_string=None)
    assert "image/png" not in bundle and "application/vnd.plotly.v1+json" in bundle
    svg = bundle["image/svg+xml"]
    assert svg.startswith("<svg") and 'viewBox="0 0 900 ' in svg  # scales down with its container


def test_token_html_colours_each_token_like_the_strip(frame) -> None:
    html = token_html(frame, "kl", responses=[1], titles=["multi-turn"])
    rows = frame[frame.response == 1]
    assert html.count("<span title=") == len(rows)
    kl = rows.kl[rows.is_policy].to_numpy(float)
    top = np.abs(kl).max()
    for value in kl:  # sequential scale from 0 to the largest KL shown
        assert f"background:{colour_of(value, 0.0, top, 'Blues')}" in html
    assert html.count("title='environment token'") == (~rows.is_policy).sum()
    assert colour_of(0.0, 0.0, top, "Blues") != colour_of(float("nan"), 0.0, 1.0, "Blues")  # zero is not grey
