"""One figure style for every notebook and saved figure: method colours, markers, drawing order, axes, legends.

Every figure of the project takes its method colours from :func:`method_style`, so a method keeps one
colour everywhere and ShiQ is drawn on top of the others (``zorder``) and listed first in legends
(``legendrank``). :func:`responsive` makes a figure follow the width of its output area, with the
legend in a horizontal row below the plot and colour bars inside the figure, so nothing is cut at any
window width. :func:`log_ticks` gives log axes readable ticks; :data:`SEQUENTIAL` is the colour scale
of non-negative quantities (KL, probabilities), :data:`DIVERGING` that of signed ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

__all__ = [
    "DIVERGING",
    "ENV_COLOUR",
    "LEGEND_BELOW",
    "METHOD_STYLES",
    "SEQUENTIAL",
    "SHIQ",
    "MethodStyle",
    "by_drawing_order",
    "format_beta",
    "log_ticks",
    "method_style",
    "responsive",
    "template",
    "trace_style",
]

#: colour scale of quantities that are never negative (KL, probabilities): white to dark blue
SEQUENTIAL = "Blues"
#: colour scale of signed quantities, centred on 0 (Q, V, advantage, residual)
DIVERGING = "RdBu"
#: environment tokens (not the policy's: no value, no KL)
ENV_COLOUR = "#bdbdbd"


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn: legend label, colour, marker, dash, drawing order (higher: on top)."""

    label: str
    colour: str
    symbol: str = "circle"
    dash: str = "solid"
    zorder: int = 0
    legendrank: int = 1000
    width: float = 2.0
    size: int = 9


#: the one colour of ShiQ in every figure
SHIQ = "#d62728"

METHOD_STYLES: dict[str, MethodStyle] = {
    "shiq": MethodStyle("ShiQ (full path)", SHIQ, "diamond", zorder=10, legendrank=1, width=3.5, size=12),
    "shiq_nstep": MethodStyle("ShiQ n-step", "#ff9896", "diamond-open", "dash", zorder=5, legendrank=2),
    "shiq_1step": MethodStyle("shifted one-step", "#9467bd", "triangle-up", "dot", zorder=4, legendrank=3),
    "scoring": MethodStyle("unshifted scoring (step 2)", "#8c564b", "x", "dashdot", legendrank=4),
    "naive": MethodStyle("naive logits-as-Q (step 1)", "#7f7f7f", "cross", "longdash", legendrank=5),
    "dpo": MethodStyle("DPO (ordered by return)", "#1f77b4", "square", zorder=2, legendrank=6),
    "dpo_bt": MethodStyle("DPO, soft BT labels (diag.)", "#17becf", "square-open", "dot", zorder=1, legendrank=7),
    "dro": MethodStyle("DRO (learned V)", "#2ca02c", "circle", zorder=2, legendrank=8),
    "copg": MethodStyle("CoPG", "#ff7f0e", "triangle-down", zorder=2, legendrank=9),
    "reference": MethodStyle("reference π_ref", "#000000", "star", zorder=11, legendrank=0, size=14),
    "optimum": MethodStyle("exact optimum π*", "#000000", "circle", "solid", zorder=0, legendrank=0, width=1.5),
}

_FALLBACK = ["#bcbd22", "#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39"]


#: a horizontal legend at the bottom of the figure: plotly adds its height to the bottom margin, so no entry is cut
LEGEND_BELOW: dict[str, Any] = {"orientation": "h", "x": 0, "xanchor": "left", "y": 0, "yanchor": "bottom",
                                "yref": "container"}


def template() -> go.layout.Template:
    """The project's plotly template (on top of ``plotly_white``): responsive width, legend below the plot."""
    return go.layout.Template(layout={"autosize": True, "legend": LEGEND_BELOW, "margin": {"autoexpand": True}})


def method_style(method: str) -> MethodStyle:
    """The style of ``method`` (a loss type or method id); unknown names get a stable colour of their own."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    colour = _FALLBACK[sum(map(ord, method)) % len(_FALLBACK)]  # stable across runs (no hash seed)
    return MethodStyle(method, colour)


def by_drawing_order(methods: Iterable[str]) -> list[str]:
    """``methods`` sorted so that the ones drawn on top (ShiQ) come last; ties keep their order."""
    methods = list(methods)
    return sorted(methods, key=lambda m: (method_style(m).zorder, methods.index(m)))


def trace_style(method: str, *, mode: str = "lines+markers", name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of a ``go.Scatter`` that draw ``method`` in its style."""
    s = method_style(method)
    out: dict[str, Any] = {"name": name if name is not None else s.label, "legendrank": s.legendrank, "zorder": s.zorder,
                           "mode": mode}
    if "lines" in mode:
        out["line"] = {"color": s.colour, "dash": s.dash, "width": s.width}
    if "markers" in mode:
        out["marker"] = {"color": s.colour, "symbol": s.symbol, "size": s.size,
                         "line": {"width": 1, "color": "white" if "open" not in s.symbol else s.colour}}
    return out


def format_beta(beta: float) -> str:
    """β as it reads in a label: ``0.1``, ``0.05``, ``1``, ``0.001``, ``2e-05``; ``n/a`` when missing."""
    if beta is None or (isinstance(beta, float) and math.isnan(beta)):
        return "n/a"
    return f"{float(beta):.4g}"


def log_ticks(lo: float, hi: float) -> dict[str, Any]:
    """Axis settings of a readable log axis over ``[lo, hi]`` (both > 0).

    Up to three decades: ticks at 1, 2, 5 times powers of ten, written plainly (``20``, ``500``, ``0.05``);
    more: one tick per decade written as a power of ten.
    """
    if not (lo > 0 and hi > 0):
        raise ValueError(f"log axis needs positive bounds, got [{lo}, {hi}]")
    lo, hi = min(lo, hi), max(lo, hi)
    if math.log10(hi / lo) > 3:
        return {"type": "log", "dtick": 1, "exponentformat": "power", "showexponent": "all"}
    vals = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    vals = [v for v in vals if lo / 1.001 <= v <= hi * 1.001]
    if len(vals) < 2:  # a narrow range: the bounds themselves
        vals = [lo, hi]
    return {"type": "log", "tickmode": "array", "tickvals": vals, "ticktext": [f"{v:.3g}" for v in vals]}


def responsive(
    fig: go.Figure,
    *,
    height: int | None = None,
    legend: str = "below",
    legend_title: str | None = None,
    colorbars: Sequence[str] = (),
) -> go.Figure:
    """Make ``fig`` follow its container's width, with nothing drawn outside the figure.

    ``legend="below"`` puts the legend in horizontal rows under the plot (its height is added to the
    bottom margin automatically, so every entry stays visible at any width); ``"none"`` hides it.
    Colour bars named in ``colorbars`` (layout paths such as ``"coloraxis"``) sit inside the figure's
    right margin. Returns ``fig`` (changed in place).
    """
    fig.update_layout(autosize=True, width=None)
    if height is not None:
        fig.update_layout(height=height)
    if legend == "below":
        fig.update_layout(legend=LEGEND_BELOW | ({"title": {"text": legend_title, "side": "top left"}} if legend_title else {}))
    elif legend == "none":
        fig.update_layout(showlegend=False)
    elif legend != "right":
        raise ValueError(f"legend={legend!r}: choose 'below', 'right' or 'none'")
    for path in colorbars:
        fig.update_layout({path: {"colorbar": {"x": 1.0, "xanchor": "left", "xref": "paper", "thickness": 14,
                                               "len": 1.0, "lenmode": "fraction"}}})
    fig.update_layout(margin={"autoexpand": True})
    return fig
