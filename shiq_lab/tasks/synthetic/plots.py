"""Plotly figures of a synthetic-benchmark results dict: learning curves, data efficiency, frontier."""

from __future__ import annotations

import plotly.graph_objects as go

from shiq_lab.tasks.synthetic.report import _LABEL, efficiency_curves, mean_curves

__all__ = ["learning_curves_figure", "efficiency_figure", "frontier_figure"]

_FLOOR = -1.0  # normalised returns below this (far worse than pi_ref) are drawn at the floor


def _clip(values: list[float | None]) -> list[float | None]:
    return [None if v is None else max(v, _FLOOR) for v in values]


def learning_curves_figure(results: dict, param: str, task: str, behaviour: str) -> go.Figure:
    """Normalised return against optimiser steps, one line per method (seed mean, selected lr)."""
    fig = go.Figure()
    for m, (steps, values) in mean_curves(results, param, task, behaviour).items():
        fig.add_trace(go.Scatter(x=steps, y=_clip(values), mode="lines+markers", name=_LABEL.get(m, m)))
    fig.update_layout(title=f"Learning curves · {param} · {task} task · {behaviour} data",
                      xaxis_title="Adam steps", yaxis_title=f"normalised return (clipped at {_FLOOR:g})", yaxis_range=[_FLOOR - 0.05, 1.05])
    return fig


def efficiency_figure(results: dict, param: str, task: str, behaviour: str) -> go.Figure:
    """Final normalised return against the number of training sequences, one line per method."""
    target = results["meta"]["config"]["target"]
    fig = go.Figure()
    for m, (sizes, scores) in efficiency_curves(results, param, task, behaviour).items():
        fig.add_trace(go.Scatter(x=sizes, y=_clip(scores), mode="lines+markers", name=_LABEL.get(m, m)))
    fig.add_hline(y=target, line_dash="dot", annotation_text=f"{target:.0%} of the optimal improvement")
    fig.update_layout(title=f"Data efficiency · {param} · {task} task · {behaviour} data", xaxis_type="log",
                      xaxis_title="training sequences", yaxis_title=f"normalised return (clipped at {_FLOOR:g})", yaxis_range=[_FLOOR - 0.05, 1.05])
    return fig


def frontier_figure(results: dict) -> go.Figure:
    """Mean reward against KL(pi || pi_ref): the exact optimum's curve over beta and each method's points."""
    fr = results["frontier"]
    curve = fr["exact_curve"]
    fig = go.Figure(go.Scatter(x=[c["kl_ref"] for c in curve], y=[c["reward"] for c in curve], mode="lines",
                               name="exact π* (β from 0.01 to 10)", line={"color": "black"}))
    for m in dict.fromkeys(p["method"] for p in fr["points"]):
        pts = [p for p in fr["points"] if p["method"] == m and p["kl_ref_mean"] is not None]
        fig.add_trace(go.Scatter(x=[p["kl_ref_mean"] for p in pts], y=[p["reward_mean"] for p in pts], mode="markers",
                                 name=_LABEL.get(m, m), text=[f"β={p['beta']:g}" for p in pts]))
    fig.update_layout(title=f"Reward-KL frontier · tabular · {fr['task']} task · {fr['behaviour']} data",
                      xaxis_title="KL(π ‖ π_ref) of whole responses", yaxis_title="mean reward")
    return fig
