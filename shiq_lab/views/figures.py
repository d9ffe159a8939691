"""Plotly figures of token values, and offline plotly set-up for notebooks.

Figures take a :func:`shiq_lab.views.token_values.token_values` frame:

- :func:`token_strip`: each response as a grid of coloured tokens (one quantity on one scale shared
  by all responses shown: diverging and centred on 0 for signed quantities, sequential from 0 for
  KL and probabilities; hover shows every quantity; environment tokens grey; every turn starts on a
  new line).
- :func:`value_lines`: quantities by position for one response.
- :func:`topk_bars`: the top-k alternatives at one position: their Q-values and probabilities.

:func:`token_html`: the same strip as static HTML (inline coloured tokens, no JavaScript): the
explorer's snapshot for copies of executed notebooks.

:func:`configure_plotly` (called by ``setup_notebook``) renders figures with the plotly.js bundled
in the installed packages (JupyterLab's plotly extension; no CDN) and adds a static SVG copy
through kaleido when a chromium is installed, so executed notebooks show figures anywhere.
Colours, legends and widths follow :mod:`shiq_lab.views.style`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from shiq_lab.views.style import DIVERGING, ENV_COLOUR, SEQUENTIAL, format_beta, responsive

__all__ = [
    "NON_NEGATIVE",
    "QUANTITIES",
    "chromium_path",
    "colour_of",
    "configure_plotly",
    "display_token",
    "token_html",
    "token_strip",
    "topk_bars",
    "value_lines",
]

#: quantity column -> label used in figures
QUANTITIES = {
    "q": "Q(s,a)",
    "v": "V(s)",
    "advantage": "advantage A",
    "reward": "reward",
    "residual": "ShiQ residual δ",
    "log_ratio": "log-ratio ln π/π_ref",
    "kl": "KL(π‖π_ref) (nats)",
    "prob": "probability π(a|s)",
}

#: quantities that are never negative: drawn on a sequential scale from 0
NON_NEGATIVE = frozenset({"kl", "prob"})
_ENV_COLOUR = ENV_COLOUR


def chromium_path() -> str | None:
    """A chromium/chrome executable: ``$BROWSER_PATH`` if set, else one found on PATH, else None."""
    candidates = [os.environ.get("BROWSER_PATH")]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")]
    candidates.append("/usr/bin/chromium")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


#: width of the static SVG copy of a responsive figure (it scales down with its container: the SVG has a viewBox)
STATIC_WIDTH = 900


def _svg_renderer(browser: str | None = None):
    """An SVG renderer that starts one kaleido browser (``browser``: its executable) on first use and never
    breaks a notebook.

    The SVG is the static copy for viewers without plotly.js (nbconvert, GitHub): JupyterLab's plotly
    extension ignores it and draws the interactive figure at the output area's width at once (a PNG
    in the bundle would be shown first, at its fixed size, cropping legends and colour bars).
    """
    from plotly.io._base_renderers import SvgRenderer

    class LazyServerSvg(SvgRenderer):
        failed = False
        started = False

        def to_mimebundle(self, fig_dict):
            if LazyServerSvg.failed:
                return {}
            try:
                import kaleido

                if not LazyServerSvg.started:
                    # One browser for all figures of the session (~0.3 s a figure instead of ~4 s).
                    # the browser's path goes to kaleido directly: the process environment stays the caller's
                    kaleido.start_sync_server(silence_warnings=True, **({"path": browser} if browser else {}))
                    atexit.register(kaleido.stop_sync_server, silence_warnings=True)
                    LazyServerSvg.started = True
                width = (fig_dict.get("layout") or {}).get("width") or STATIC_WIDTH
                self.width = width
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                    return super().to_mimebundle(fig_dict)
            except Exception as err:  # noqa: BLE001 -- a static copy is a convenience: the interactive figure still shows
                LazyServerSvg.failed = True
                warnings.warn(f"static copies of figures are off ({type(err).__name__}: {err}); interactive figures "
                              "are unaffected", stacklevel=2)
                return {}

    return LazyServerSvg(width=STATIC_WIDTH)


def _html_renderer():
    """plotly's offline notebook renderer (plotly.js inlined once, on activation) without its MathJax CDN tag."""
    from plotly.io import to_html
    from plotly.io._base_renderers import NotebookRenderer

    class OfflineHtml(NotebookRenderer):
        def to_mimebundle(self, fig_dict):
            html = to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                           full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    return OfflineHtml(connected=False)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def configure_plotly(*, static: bool | None = None, png: bool | None = None) -> str:
    """Make plotly figures work offline in notebooks; returns the default renderer's name.

    Interactive figures use the ``plotly_mimetype`` bundle, which JupyterLab, Notebook 7 and VS
    Code draw with their bundled plotly.js at the width of the output area. With ``static``
    (default: when kaleido and a chromium are installed) each figure also carries an SVG copy, so
    an executed notebook shows its figures in static viewers; without it, inside a kernel, an
    offline HTML copy is added instead (plotly.js inlined once into the output of the cell that
    calls this; no CDN, no MathJax). The project's template (:func:`shiq_lab.views.style.template`:
    responsive width, legend below the plot) is the default on top of ``plotly_white``.
    """
    import plotly.io as pio

    from shiq_lab.views.style import template

    if png is not None:  # the old name of the switch (the static copy was a PNG then)
        static = png if static is None else static

    browser = chromium_path()
    if static is None:
        try:
            import kaleido  # noqa: F401

            static = browser is not None
        except ImportError:
            static = False
    pio.templates["shiq"] = template()
    pio.templates.default = "plotly_white+shiq"
    if static:
        pio.renderers["shiq_svg"] = _svg_renderer(browser)
        pio.renderers.default = "plotly_mimetype+shiq_svg"
    elif _in_kernel():
        pio.renderers["shiq_html"] = _html_renderer()
        pio.renderers.default = "plotly_mimetype+shiq_html"
    else:  # a script or a test: nothing to inline plotly.js into
        pio.renderers.default = "plotly_mimetype"
    return pio.renderers.default


def display_token(text: str) -> str:
    """A token's text with whitespace made visible (leading space as ·, newline as ↵, tab as ⇥)."""
    stripped = text.lstrip(" ")
    return "·" * (len(text) - len(stripped)) + stripped.replace("\n", "↵").replace("\t", "⇥") if text else "∅"


def _check_frame(df: pd.DataFrame, quantity: str | None = None) -> None:
    needed = {"response", "step", "token", "is_policy", *QUANTITIES}
    missing = needed - set(df.columns)
    if missing:
        raise ValueError(f"not a token_values frame: missing columns {sorted(missing)}")
    if quantity is not None and quantity not in QUANTITIES:
        raise ValueError(f"quantity={quantity!r}: choose one of {', '.join(QUANTITIES)}")


def _hover(row: pd.Series) -> str:
    def f(x: float) -> str:
        return "n/a" if not np.isfinite(x) else f"{x:+.4f}"

    kind = "policy token" if row["is_policy"] else f"environment ({row.get('role', '')})"
    return (
        f"<b>{display_token(row['token'])}</b>  step {row['step']} · {kind}<br>"
        f"Q {f(row['q'])}  V {f(row['v'])}  A {f(row['advantage'])}<br>"
        f"reward {f(row['reward'])}  residual {f(row['residual'])}<br>"
        f"log-ratio {f(row['log_ratio'])}  KL {f(row['kl'])}<br>"
        f"π {row.get('prob', np.nan):.4f}  π_ref {row.get('ref_prob', np.nan):.4f}"
    )


def _layout_lines(rows: pd.DataFrame, tokens_per_line: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Line and column of each token: a new line every ``tokens_per_line`` tokens and at each turn."""
    line, col, labels = [], [], []
    cur, c, prev_seg = -1, tokens_per_line, None
    for seg, role in zip(rows["segment"] if "segment" in rows else [0] * len(rows), rows.get("role", ["assistant"] * len(rows))):
        if seg != prev_seg or c >= tokens_per_line:
            cur, c = cur + 1, 0
            labels.append(str(role) if seg != prev_seg else "")
            prev_seg = seg
        line.append(cur)
        col.append(c)
        c += 1
    return np.asarray(line), np.asarray(col), labels


def _scale(values: np.ndarray, quantity: str, zmax: float | None, signed: bool | None = None) -> tuple[float, float, str]:
    """(cmin, cmax, colorscale) of ``quantity``: from 0 for non-negative ones, symmetric about 0 otherwise."""
    finite = values[np.isfinite(values)]
    if zmax is None:
        top = float(np.abs(finite).max()) if finite.size else 0.0
        zmax = top if top > 0 else 1.0
    if quantity in NON_NEGATIVE and not signed:
        return 0.0, (1.0 if quantity == "prob" else zmax), SEQUENTIAL
    return -zmax, zmax, DIVERGING


def colour_of(value: float, cmin: float, cmax: float, colorscale: str) -> str:
    """The hex colour plotly gives ``value`` on ``colorscale`` over ``[cmin, cmax]`` (NaN: environment grey)."""
    from plotly.colors import get_colorscale, sample_colorscale

    if not np.isfinite(value):
        return _ENV_COLOUR
    x = float(np.clip((value - cmin) / (cmax - cmin), 0.0, 1.0)) if cmax > cmin else 0.5
    rgb = sample_colorscale(get_colorscale(colorscale), [x], colortype="tuple")[0]
    r, g, b = (round(255 * c) if c <= 1 else round(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def token_strip(
    df: pd.DataFrame,
    quantity: str = "advantage",
    *,
    responses: Sequence[int] | None = None,
    titles: Sequence[str] | None = None,
    tokens_per_line: int = 8,
    zmax: float | None = None,
    title: str | None = None,
    signed: bool | None = None,
) -> go.Figure:
    """Responses as coloured token grids for one quantity, one above the other, on one colour scale.

    ``responses`` picks which responses (default: all, in order), ``titles`` names them. Signed
    quantities use a diverging scale centred on 0 over ``±zmax`` (default: the largest |value|
    shown); KL and probabilities a sequential one from 0 (to ``zmax``; probabilities to 1).
    Environment tokens are grey, distinct from the scale's colour of 0. ``signed=True`` forces the
    diverging scale (differences of KL between two checkpoints are signed).
    """
    _check_frame(df, quantity)
    responses = list(dict.fromkeys(df["response"])) if responses is None else list(responses)
    if not responses:
        raise ValueError("responses is empty: pick at least one response index")
    unknown = set(responses) - set(df["response"])
    if unknown:
        raise ValueError(f"responses {sorted(unknown)} are not in the frame (it has {sorted(set(df['response']))})")
    titles = list(titles) if titles is not None else [f"response {r}" for r in responses]
    if len(titles) != len(responses):
        raise ValueError(f"{len(titles)} titles for {len(responses)} responses")
    shown = df[df["response"].isin(responses) & df["is_policy"]][quantity].to_numpy(dtype=float)
    cmin, cmax, colorscale = _scale(shown, quantity, zmax, signed)

    # one panel per response, stacked: each gets the full width, so the token text stays inside its cell
    laid = [(_layout_lines(df[df["response"] == r].sort_values("step"), tokens_per_line)) for r in responses]
    n_lines = [int(line.max()) + 1 for line, _, _ in laid]
    fig = make_subplots(rows=len(responses), cols=1, subplot_titles=[_short(t, 90) for t in titles],
                        vertical_spacing=min(0.3, 60 / (80 + 38 * sum(n_lines) + 60 * len(responses))),
                        row_heights=[float(n) for n in n_lines])
    for k, r in enumerate(responses, start=1):
        rows = df[df["response"] == r].sort_values("step")
        line, col, labels = laid[k - 1]
        shape = (n_lines[k - 1], tokens_per_line)
        z = np.full(shape, np.nan)
        z_env = np.full(shape, np.nan)
        text = np.full(shape, "", dtype=object)
        hover = np.full(shape, "", dtype=object)
        policy = rows["is_policy"].to_numpy()
        values = rows[quantity].to_numpy(dtype=float)
        for i, (_, row) in enumerate(rows.iterrows()):
            text[line[i], col[i]] = display_token(row["token"])
            hover[line[i], col[i]] = _hover(row)
            if policy[i]:
                z[line[i], col[i]] = values[i]
            else:
                z_env[line[i], col[i]] = 0.0
        common = {"text": text, "texttemplate": "%{text}", "hovertext": hover, "hovertemplate": "%{hovertext}<extra></extra>",
                  "xgap": 2, "ygap": 2, "textfont": {"size": 13}}
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis", name=f"{titles[k - 1]}: {quantity}", **common), k, 1)
        if np.isfinite(z_env).any():
            fig.add_trace(go.Heatmap(z=z_env, colorscale=[[0, _ENV_COLOUR], [1, _ENV_COLOUR]], showscale=False,
                                     zmin=0, zmax=1, name=f"{titles[k - 1]}: environment", **common), k, 1)
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, tokens_per_line - 0.5],
                         row=k, col=1)
        fig.update_yaxes(showgrid=False, zeroline=False, tickmode="array", tickvals=list(range(n_lines[k - 1])),
                         ticktext=labels, range=[n_lines[k - 1] - 0.5, -0.5], row=k, col=1)
    scale = {"colorscale": colorscale, "cmin": cmin, "cmax": cmax,
             "colorbar": {"title": {"text": QUANTITIES[quantity], "side": "right"}, "thickness": 14}}
    if colorscale == DIVERGING:
        scale["cmid"] = 0.0
    fig.update_layout(
        coloraxis=scale,
        height=90 + 38 * sum(n_lines) + 60 * len(responses), margin={"l": 70, "r": 20, "t": 84, "b": 20},
        title={"text": title or f"{QUANTITIES[quantity]} per token (β={format_beta(df.attrs.get('beta', float('nan')))})"
                                "<br><sup>grey: environment tokens</sup>", "font": {"size": 14}},
    )
    return responsive(fig, legend="none")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def token_html(
    df: pd.DataFrame,
    quantity: str = "advantage",
    *,
    responses: Sequence[int] | None = None,
    titles: Sequence[str] | None = None,
    zmax: float | None = None,
    caption: str = "",
    signed: bool | None = None,
) -> str:
    """The token strip as static HTML: each response's tokens inline, coloured like :func:`token_strip`.

    Needs no JavaScript, so it shows in any copy of an executed notebook; the text wraps with its
    container and each token's title attribute holds its value.
    """
    import html

    _check_frame(df, quantity)
    responses = list(dict.fromkeys(df["response"])) if responses is None else list(responses)
    titles = list(titles) if titles is not None else [f"response {r}" for r in responses]
    shown = df[df["response"].isin(responses) & df["is_policy"]][quantity].to_numpy(dtype=float)
    cmin, cmax, colorscale = _scale(shown, quantity, zmax, signed)
    parts = ["<div class='shiq-static-strip' style='font-family:monospace;font-size:14px;line-height:1.9'>"]
    if caption:
        parts.append(f"<div style='font-family:sans-serif;font-size:13px;color:#444'>{html.escape(caption)}</div>")
    parts.append(f"<div style='font-family:sans-serif;font-size:12px;color:#444'>{html.escape(QUANTITIES[quantity])}: "
                 f"{colorscale} scale from {cmin:+.3g} to {cmax:+.3g}; grey: environment tokens</div>")
    for r, title in zip(responses, titles):
        rows = df[df["response"] == r].sort_values("step")
        spans = []
        for tok, pol, value in zip(rows["token"], rows["is_policy"], rows[quantity].to_numpy(dtype=float)):
            colour = colour_of(value, cmin, cmax, colorscale) if pol else _ENV_COLOUR
            tip = f"{QUANTITIES[quantity]} = {value:+.4f}" if pol and np.isfinite(value) else "environment token"
            border = "1px solid #999" if pol else "1px dashed #666"
            spans.append(f"<span title='{html.escape(tip, quote=True)}' style='background:{colour};border:{border};"
                         f"padding:1px 3px;margin:1px;border-radius:3px;white-space:pre-wrap'>"
                         f"{html.escape(display_token(tok))}</span>")
        parts.append(f"<div><i style='font-family:sans-serif'>{html.escape(title)}</i><br>{''.join(spans)}</div>")
    parts.append("</div>")
    return "".join(parts)


def value_lines(
    df: pd.DataFrame,
    response: int = 0,
    quantities: Sequence[str] = ("q", "v", "advantage", "reward", "residual"),
) -> go.Figure:
    """Quantities by position for one response; environment tokens shaded grey."""
    for q in quantities:
        _check_frame(df, q)
    rows = df[df["response"] == response].sort_values("step")
    if rows.empty:
        raise ValueError(f"response {response} is not in the frame (it has {sorted(set(df['response']))})")
    steps = rows["step"].to_numpy()
    fig = go.Figure()
    for q in quantities:
        fig.add_trace(go.Scatter(x=steps, y=rows[q].to_numpy(dtype=float), mode="lines+markers", name=QUANTITIES[q]))
    for s, pol in zip(steps, rows["is_policy"].to_numpy()):
        if not pol:
            fig.add_vrect(x0=s - 0.5, x1=s + 0.5, fillcolor=_ENV_COLOUR, opacity=0.5, line_width=0, layer="below")
    fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=[display_token(t) for t in rows["token"]], tickangle=-60)
    fig.add_hline(y=0, line_color="black", line_width=1)
    fig.update_layout(title=f"response {response}: values by position (β={format_beta(df.attrs.get('beta', float('nan')))})",
                      height=420, yaxis_title="reward units (KL in nats)", margin={"t": 50})
    return responsive(fig)


def topk_bars(df: pd.DataFrame, response: int = 0, step: int = 0) -> go.Figure:
    """The top-k alternatives at one position: Q-values, and probabilities under pi and pi_ref.

    The token actually taken is drawn in orange (and added if it is not among the top k).
    """
    _check_frame(df)
    rows = df[(df["response"] == response) & (df["step"] == step)]
    if rows.empty:
        raise ValueError(f"no row for response={response}, step={step}")
    row = rows.iloc[0]
    ids = [int(i) for i in row["topk_ids"]]
    labels = [display_token(t) for t in row["topk_tokens"]]
    q = list(np.asarray(row["topk_q"], dtype=float))
    p = list(np.asarray(row["topk_prob"], dtype=float))
    p_ref = list(np.asarray(row["topk_ref_prob"], dtype=float))
    if int(row["token_id"]) not in ids:
        ids.append(int(row["token_id"]))
        labels.append(display_token(row["token"]) + " (taken)")
        q.append(float(row["q"]))
        p.append(float(row["prob"]))
        p_ref.append(float(row["ref_prob"]))
    # byte fragments often decode alike; plotly would merge equal categories, so make labels unique
    labels = [f"{lab} [{i}]" if labels.count(lab) > 1 else lab for lab, i in zip(labels, ids)]
    colours = ["#ff7f0e" if i == int(row["token_id"]) else "#1f77b4" for i in ids]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Q(s, a) of the alternatives", "probability"))
    fig.add_trace(go.Bar(x=labels, y=q, marker_color=colours, name="Q", showlegend=False,
                         hovertemplate="%{x}: Q %{y:+.4f}<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=p, name="π", marker_color="#2ca02c", hovertemplate="%{x}: π %{y:.4f}<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(x=labels, y=p_ref, name="π_ref", marker_color="#9467bd",
                         hovertemplate="%{x}: π_ref %{y:.4f}<extra></extra>"), 1, 2)
    fig.add_hline(y=float(row["v"]), line_dash="dash", line_color="black", row=1, col=1,
                  annotation_text=f"V(s) = {float(row['v']):+.3f}", annotation_position="top left")
    fig.update_layout(barmode="group", height=400, margin={"t": 60},
                      title=f"response {response}, step {step}: top-{len(row['topk_ids'])} alternatives"
                            f"<br><sup>taken: {display_token(row['token'])} (orange)</sup>")
    return responsive(fig)
