"""Plotly figures of a synthetic-benchmark results dict: headline, learning curves, data efficiency, frontier.

Every figure takes its method colours and drawing order from :mod:`shiq_lab.views.style` (ShiQ in one
colour, drawn on top) and follows the width of its output area with the legend below the plot.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from shiq_lab.tasks.synthetic.report import _over_tasks, efficiency_curves, mean_curves
from shiq_lab.views.style import (
    DIVERGING,
    by_drawing_order,
    format_beta,
    log_ticks,
    method_style,
    responsive,
    trace_style,
)

__all__ = [
    "KEY_NUMBER_TEXT",
    "efficiency_figure",
    "findings_frame",
    "frontier_figure",
    "frontier_frame",
    "headline_figure",
    "headline_frame",
    "learning_curves_figure",
]

_FLOOR = -1.0  # normalised returns below this (far worse than pi_ref) are drawn at the floor


def _clip(values: list[float | None]) -> list[float | None]:
    return [None if v is None else max(v, _FLOOR) for v in values]


def headline_frame(results: dict, key: str = "normalised_return") -> pd.DataFrame:
    """Methods x (parameterisation · behaviour): ``key`` averaged over tasks, mean over seeds.

    With one seed the frame holds the means only (a spread over one seed is not a spread); with
    several, each column is followed by its ``± std`` column (population std over seeds).
    """
    cfg = results["meta"]["config"]
    n_seeds = len(cfg["seeds"])
    table: dict[str, list[float]] = {}
    for p in cfg["parameterisations"]:
        for b in cfg["behaviours"]:
            stats = [_over_tasks(results, p, m, b, key) for m in cfg["methods"]]
            table[f"{p} · {b}"] = [math.nan if mean is None else mean for mean, _ in stats]
            if n_seeds > 1:
                table[f"{p} · {b} ± std"] = [math.nan if std is None else std for _, std in stats]
    frame = pd.DataFrame(table, index=[method_style(m).label for m in cfg["methods"]])
    frame.index.name = "method"
    frame.attrs["n_seeds"] = n_seeds
    return frame


def headline_figure(results: dict, key: str = "normalised_return") -> go.Figure:
    """The headline as a heatmap: methods x (parameterisation · behaviour), coloured by normalised return.

    0 is the reference, 1 the exact optimum; values below -1 share the colour of -1 (the text gives
    the value). ShiQ's row is the top one.
    """
    cfg = results["meta"]["config"]
    frame = headline_frame(results, key)
    cols = [c for c in frame.columns if not c.endswith("± std")]
    methods = list(cfg["methods"])
    n = frame.attrs["n_seeds"]
    z = frame[cols].to_numpy(dtype=float)
    text = []
    for i in range(len(methods)):
        row = []
        for c in cols:
            v = frame[c].iloc[i]
            cell = "diverged" if not math.isfinite(v) else f"{v:.2f}"
            if n > 1 and math.isfinite(v):
                cell += f"<br>± {frame[c + ' ± std'].iloc[i]:.2f}"
            row.append(cell)
        text.append(row)
    labels = list(frame.index)
    fig = go.Figure(go.Heatmap(
        z=[[max(v, _FLOOR) if math.isfinite(v) else None for v in r] for r in z], x=cols, y=labels, text=text,
        texttemplate="%{text}", textfont={"size": 12}, colorscale=DIVERGING, zmin=-1, zmid=0, zmax=1, xgap=2, ygap=2,
        colorbar={"title": {"text": "normalised<br>return", "side": "top"}, "thickness": 14, "tickvals": [-1, 0, 1],
                  "ticktext": ["≤ -1", "0 (π_ref)", "1 (π*)"]},
        hovertemplate="%{y} · %{x}: %{text}<extra></extra>"))
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed: no spread"
    what = "best point of the learning curve" if key.startswith("peak") else "end of the budget"
    fig.update_yaxes(autorange="reversed", tickfont={"size": 12})
    fig.update_xaxes(side="top", tickangle=0 if len(cols) <= 4 else -30)
    fig.update_layout(title={"text": f"Normalised return, mean over tasks<br><sup>{what}; {spread}</sup>",
                             "font": {"size": 14}, "y": 0.98},
                      height=140 + 36 * len(methods), margin={"t": 110, "l": 10})
    return responsive(fig, legend="none")


def learning_curves_figure(results: dict, param: str, task: str, behaviour: str) -> go.Figure:
    """Normalised return against optimiser steps, one line per method (seed mean, selected lr); ShiQ on top."""
    fig = go.Figure()
    curves = mean_curves(results, param, task, behaviour)
    for m in by_drawing_order(curves):
        steps, values = curves[m]
        fig.add_trace(go.Scatter(x=steps, y=_clip(values), **trace_style(m)))
    fig.update_layout(title=f"Learning curves · {param} · {task} task · {behaviour} data",
                      xaxis_title="Adam steps", yaxis_title=f"normalised return (clipped at {_FLOOR:g})",
                      yaxis_range=[_FLOOR - 0.05, 1.05], height=520)
    return responsive(fig)


def efficiency_figure(results: dict, param: str, task: str, behaviour: str) -> go.Figure:
    """Final normalised return against the number of training sequences, one line per method; ShiQ on top."""
    target = results["meta"]["config"]["target"]
    fig = go.Figure()
    curves = efficiency_curves(results, param, task, behaviour)
    sizes_all: list[int] = []
    for m in by_drawing_order(curves):
        sizes, scores = curves[m]
        sizes_all += list(sizes)
        fig.add_trace(go.Scatter(x=sizes, y=_clip(scores), **trace_style(m)))
    fig.add_hline(y=target, line_dash="dot", annotation_text=f"{target:.0%} of the optimal improvement",
                  annotation_position="bottom right")
    xaxis: dict[str, Any] = {"type": "log"}
    if sizes_all:
        sizes_all = sorted(set(sizes_all))
        xaxis = {"type": "log", "tickmode": "array", "tickvals": sizes_all, "ticktext": [str(s) for s in sizes_all]}
    fig.update_layout(title=f"Data efficiency · {param} · {task} task · {behaviour} data", xaxis=xaxis,
                      xaxis_title="training sequences (log scale)", yaxis_title=f"normalised return (clipped at {_FLOOR:g})",
                      yaxis_range=[_FLOOR - 0.05, 1.05], height=520)
    return responsive(fig)


def frontier_frame(results: dict) -> pd.DataFrame:
    """The frontier's points as a table: method, β, mean reward, KL(π‖π_ref), gap to the exact curve."""
    fr = results["frontier"]
    rows = [{"method": "exact π*", "β": e["beta"], "reward": e["reward"], "KL(π‖π_ref)": e["kl_ref"], "reward gap": 0.0}
            for e in fr["exact"]]
    rows += [{"method": method_style(p["method"]).label, "β": p["beta"], "reward": p["reward_mean"],
              "KL(π‖π_ref)": p["kl_ref_mean"], "reward gap": p.get("reward_gap_mean")} for p in fr["points"]]
    return pd.DataFrame(rows)


def frontier_figure(results: dict) -> go.Figure:
    """Mean reward against KL(π‖π_ref): the exact optimum's curve over β and each method's points.

    KL is on a log axis. ShiQ's points are drawn last, large, and labelled with their β; the other
    methods' markers are smaller (most of them sit on the same points of the curve); the hover text
    of every point gives its method, β, KL and reward.
    """
    fr = results["frontier"]
    curve = fr["exact_curve"]
    fig = go.Figure(go.Scatter(x=[c["kl_ref"] for c in curve], y=[c["reward"] for c in curve],
                               **trace_style("optimum", mode="lines", name="exact π*<sub>β</sub> (β from 0.01 to 10)")))
    ex = fr["exact"]
    fig.add_trace(go.Scatter(x=[e["kl_ref"] for e in ex], y=[e["reward"] for e in ex], mode="markers",
                             name="exact π*<sub>β</sub> at the swept β", marker={"color": "black", "size": 7, "symbol": "circle-open"},
                             text=[f"β={format_beta(e['beta'])}" for e in ex], legendrank=0,
                             hovertemplate="exact π*, %{text}<br>KL %{x:.3f}<br>reward %{y:.3f}<extra></extra>"))
    kls = [c["kl_ref"] for c in curve if c["kl_ref"] > 0]
    methods = by_drawing_order(dict.fromkeys(p["method"] for p in fr["points"]))
    for m in methods:
        pts = [p for p in fr["points"] if p["method"] == m and p["kl_ref_mean"] is not None]
        kls += [p["kl_ref_mean"] for p in pts if p["kl_ref_mean"] > 0]
        style = trace_style(m, mode="markers+text" if m in ("shiq", "dpo") else "markers")
        if m != "shiq":
            style["marker"]["size"] = 8
        fig.add_trace(go.Scatter(
            x=[p["kl_ref_mean"] for p in pts], y=[p["reward_mean"] for p in pts],
            text=[f"β={format_beta(p['beta'])}" for p in pts], textposition="bottom right" if m == "shiq" else "top left",
            cliponaxis=False,
            textfont={"size": 11, "color": method_style(m).colour},
            hovertemplate=f"{method_style(m).label}, %{{text}}<br>KL %{{x:.3f}}<br>reward %{{y:.3f}}<extra></extra>",
            **style))
    axis = log_ticks(min(kls), max(kls)) if kls else {"type": "log"}
    fig.update_layout(title=f"Reward-KL frontier · tabular · {fr['task']} task · {fr['behaviour']} data",
                      xaxis={**axis, "title": "KL(π ‖ π_ref) of whole responses (log scale)"},
                      yaxis_title="mean reward", height=560)
    return responsive(fig)


#: what each key number of :func:`shiq_lab.bench.report.key_numbers` says, for tables a reader can read
KEY_NUMBER_TEXT: dict[str, str] = {
    "calibration_residual_shiq": "max mean |residual| at θ = ref, r = 0: ShiQ, n-step, one-step",
    "calibration_residual_sequence": "max mean |residual| at θ = ref, r = 0: DPO, soft DPO, DRO, CoPG",
    "calibration_residual_unshifted_min": "min mean |residual| at θ = ref, r = 0: naive and scoring",
    "shiq_tabular_offpolicy_min": "ShiQ tabular, uniform/mix data: worst normalised return over tasks",
    "shiq_tabular_offpolicy_kl_max": "ShiQ tabular, uniform/mix data: largest KL(π‖π*) over tasks",
    "shiq_tabular_offpolicy_reached": "ShiQ tabular reaches the target on every task from uniform and mix data (1 = yes)",
    "shiq_tabular_offpolicy_sequences_max": "ShiQ tabular, uniform/mix data: most sequences needed for the target",
    "unshifted_tabular_max": "naive and scoring, tabular: best normalised return anywhere",
    "dpo_minus_shiq_tabular_uniform_max": "DPO (ordered) minus ShiQ, tabular, uniform data: largest difference over tasks",
    "dpo_peak_tabular_uniform_mean": "DPO (ordered), tabular, uniform: best point of its learning curve, mean over tasks",
    "dpo_peak_minus_final_tabular_uniform_min": "DPO (ordered): best point minus end of budget, smallest over tasks",
    "dpo_bt_copg_gap_tabular_offpolicy_max": "|soft-label DPO - CoPG|, tabular, uniform/mix: largest over tasks",
    "skewed_tabular_best": "skewed data, tabular: best normalised return of any method",
    "skewed_minus_uniform_tabular_max": "skewed minus uniform data, methods that reach π*: largest difference",
    "shiq_frontier_min": "frontier: ShiQ's worst normalised return over β",
    "shiq_frontier_gap_max": "frontier: ShiQ's largest reward gap to the exact curve at equal KL",
    "dpo_frontier_gap_mean": "frontier: DPO's (ordered) mean reward gap to the exact curve",
    "exact_frontier_kl_range": "frontier: KL at the smallest β over KL at the largest, exact π*",
    "dpo_frontier_kl_range": "frontier: the same KL ratio for DPO (ordered)",
    "shiq_frontier_kl_range": "frontier: the same KL ratio for ShiQ",
    "shiq_efficiency_pairs_worse": "data efficiency: (task, data, baseline) cells where ShiQ needs more sequences",
    "shiq_efficiency_pairs_better": "data efficiency: cells where ShiQ needs fewer sequences",
    "shiq_minus_best_sequence_neural_min": "neural: ShiQ minus the best sequence-level method, worst data",
    "shiq_neural_offpolicy_mean": "neural, uniform/mix data: ShiQ's mean normalised return",
    "unshifted_neural_max": "neural: best normalised return of naive and scoring",
}


def findings_frame(numbers: dict[str, float], keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The key numbers ``keys`` as a two-column table (what it measures, value rounded to 3 significant digits)."""
    unknown = [k for k in keys if k not in numbers]
    if unknown:
        raise KeyError(f"not among the key numbers: {unknown} (have {sorted(numbers)})")
    return pd.DataFrame({"measures": [KEY_NUMBER_TEXT.get(k, k) for k in keys],
                         "value": [f"{numbers[k]:.3g}" for k in keys]}, index=pd.Index(list(keys), name="key number"))
