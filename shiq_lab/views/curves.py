"""Training curves: raw values faint, an exponential moving average on top, one colour per loss, one dash per β."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from shiq_lab.views.style import by_drawing_order, format_beta, method_style, responsive

__all__ = ["ema", "training_curves"]

_DASHES = ["solid", "dot", "dash", "longdash", "dashdot"]


def ema(values: Sequence[float], alpha: float = 0.8) -> np.ndarray:
    """Bias-corrected exponential moving average: ``m_t = alpha*m_{t-1} + (1-alpha)*x_t``, divided by ``1 - alpha^t``.

    The correction makes the first points the average of what was seen so far instead of a pull
    towards 0; NaNs are skipped (they carry the previous average).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1)")
    out = np.full(len(values), np.nan)
    m, weight = 0.0, 0.0
    for i, x in enumerate(np.asarray(values, dtype=float)):
        if np.isfinite(x):
            m = alpha * m + (1 - alpha) * x
            weight = alpha * weight + (1 - alpha)
        out[i] = m / weight if weight > 0 else np.nan
    return out


def training_curves(
    history: pd.DataFrame,
    y: str = "loss",
    *,
    facet: bool = True,
    alpha: float = 0.8,
    title: str | None = None,
    y_title: str | None = None,
    height: int = 380,
) -> go.Figure:
    """``y`` against ``step`` for every (loss_type, beta) run of ``history``, smoothed.

    Each run: its raw values as a thin faint line, their EMA (:func:`ema`, ``alpha``) as a solid
    line in the loss's colour, dashed by β. ``facet``: one panel per loss type (each loss in its own
    units, own y axis); otherwise one panel. Legend entries read ``shiq β=0.1``.
    """
    missing = {"loss_type", "beta", "step", y} - set(history.columns)
    if missing:
        raise ValueError(f"history lacks columns {sorted(missing)}")
    loss_types = by_drawing_order(dict.fromkeys(history["loss_type"]))
    betas = sorted(history["beta"].unique())
    cols = loss_types if facet else [None]
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=[str(c) for c in cols] if facet else None,
                        horizontal_spacing=0.06)
    for lt in loss_types:
        col = cols.index(lt) + 1 if facet else 1
        colour = method_style(lt).colour
        for beta in betas:
            g = history[(history["loss_type"] == lt) & (history["beta"] == beta)].sort_values("step")
            if g.empty:
                continue
            name = f"{lt} β={format_beta(beta)}"
            dash = _DASHES[betas.index(beta) % len(_DASHES)]
            fig.add_trace(go.Scatter(x=g["step"], y=g[y], mode="lines", line={"color": colour, "width": 1},
                                     opacity=0.3, legendgroup=name, showlegend=False, name=f"{name} (raw)",
                                     hovertemplate=f"{name} raw, step %{{x}}: %{{y:.4g}}<extra></extra>"), 1, col)
            fig.add_trace(go.Scatter(x=g["step"], y=ema(g[y].to_numpy(), alpha), mode="lines", name=name,
                                     legendgroup=name, line={"color": colour, "width": 2.5, "dash": dash},
                                     zorder=method_style(lt).zorder, legendrank=method_style(lt).legendrank,
                                     hovertemplate=f"{name} EMA, step %{{x}}: %{{y:.4g}}<extra></extra>"), 1, col)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text=y_title or y, col=1)
    fig.update_layout(title=title or f"{y} by step<br><sup>faint: raw; solid: moving average (α={alpha:g})</sup>",
                      height=height)
    return responsive(fig)
