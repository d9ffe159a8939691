"""The reward-KL frontier over checkpoints: discovery, evaluation, Pareto set, files and figure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from shiq_lab.evaluation.generations import PolicyEval, evaluate_policy
from shiq_lab.evaluation.sampling import RewardFn
from shiq_lab.lm.modes import device_of

#: columns of a frontier frame, in order
FRONTIER_COLUMNS = ["label", "loss_type", "beta", "step", "reward_mean", "reward_sem", "kl_mean", "kl_sem",
                    "kl_states_mean", "kl_states_sem", "length_mean", "finished_fraction", "n", "path"]

# ----------------------------------------------------------------------------------------------
# checkpoints and the frontier
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckpointSpec:
    """A saved policy to put on the frontier."""

    path: str
    loss_type: str = "?"
    beta: float = float("nan")
    step: int = -1
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.loss_type} beta={self.beta:g} step={self.step}"


def _checkpoint_meta(folder: Path) -> dict[str, Any]:
    """loss_type / beta / step of a checkpoint folder, from ``run.json`` or the Trainer's files."""
    meta: dict[str, Any] = {}
    for candidate in (folder / "run.json", folder.parent / "run.json"):
        if candidate.exists():
            data = json.loads(candidate.read_text())
            meta.update({k: data[k] for k in ("loss_type", "beta") if k in data})
            break
    state = folder / "trainer_state.json"
    if state.exists():
        meta.setdefault("step", int(json.loads(state.read_text()).get("global_step", -1)))
    elif folder.name.startswith("checkpoint-") and folder.name.split("-")[-1].isdigit():
        meta.setdefault("step", int(folder.name.split("-")[-1]))
    elif (folder / "log_history.json").exists():  # a final model of `shiq-lab train`: its last logged step
        steps = [row.get("step", -1) for row in json.loads((folder / "log_history.json").read_text())]
        if steps:
            meta.setdefault("step", int(max(steps)))
    args_file = folder / "training_args.bin"
    if ("loss_type" not in meta or "beta" not in meta) and args_file.exists():
        try:  # a pickle the user's own Trainer wrote (the format transformers itself reloads on resume)
            args = torch.load(args_file, weights_only=False)
            meta.setdefault("loss_type", getattr(args, "loss_type", "?"))
            meta.setdefault("beta", float(getattr(args, "beta", float("nan"))))
        except Exception:  # noqa: BLE001 -- unreadable args only lose the labels, not the evaluation
            pass
    return meta


def find_checkpoints(run_dir: str | Path) -> list[CheckpointSpec]:
    """Every model folder below ``run_dir`` (``checkpoint-*`` and final models: folders with a ``config.json``)."""
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run_dir {root} does not exist")
    specs = []
    for config in sorted(root.rglob("config.json")):
        folder = config.parent
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            continue
        meta = _checkpoint_meta(folder)
        specs.append(CheckpointSpec(path=str(folder), loss_type=str(meta.get("loss_type", "?")),
                                    beta=float(meta.get("beta", float("nan"))), step=int(meta.get("step", -1))))
    if not specs:
        raise FileNotFoundError(f"no model folder (config.json + weights) below {root}")
    # a final model saved at the step of a checkpoint is that checkpoint: list it once, as the checkpoint
    paths = {Path(s.path) for s in specs}
    return [s for s in specs if Path(s.path) / f"checkpoint-{s.step}" not in paths]


def _reference_row(result: PolicyEval) -> dict[str, Any]:
    return {"label": "reference", "loss_type": "reference", "beta": float("nan"), "step": 0, "path": "",
            **result.row()}


def evaluate_checkpoints(
    checkpoints: Sequence[CheckpointSpec],
    reference: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    include_reference: bool = True,
    dtype: torch.dtype = torch.float32,
    **eval_kwargs: Any,
) -> pd.DataFrame:
    """The frontier table: one :func:`evaluate_policy` row per checkpoint (and the reference's).

    Every policy is sampled with the same seed and prompts. ``eval_kwargs`` go to
    :func:`evaluate_policy` (``samples_per_prompt``, ``max_new_tokens``, ``batch_size``, ``seed``,
    ``device``).
    """
    from shiq_lab.infra.models import load_model

    rows = []
    if include_reference:
        rows.append(_reference_row(evaluate_policy(reference, reference, tokenizer, prompts, reward_fn, **eval_kwargs)))
    for spec in checkpoints:
        policy, _ = load_model(spec.path, dtype=dtype, device=device_of(reference))
        result = evaluate_policy(policy, reference, tokenizer, prompts, reward_fn, **eval_kwargs)
        rows.append({"label": spec.label, "loss_type": spec.loss_type, "beta": spec.beta, "step": spec.step,
                     "path": spec.path, **result.row()})
        del policy
    return pd.DataFrame(rows)[FRONTIER_COLUMNS]


def pareto_mask(frame: pd.DataFrame, *, by: str | None = "loss_type", kl: str = "kl_states_mean",
                reward: str = "reward_mean") -> pd.Series:
    """True on points no other point (of the same ``by`` group) beats: KL as low and reward higher, or vice versa."""
    out = pd.Series(False, index=frame.index)
    groups = frame.groupby(by) if by else [(None, frame)]
    for _, g in groups:
        k, r = g[kl].to_numpy(), g[reward].to_numpy()
        for idx, ki, ri in zip(g.index, k, r):
            dominated = ((k <= ki) & (r >= ri) & ((k < ki) | (r > ri))).any()
            out[idx] = not dominated
    return out


def save_frontier(frame: pd.DataFrame, out_dir: str | Path, *, html: bool = True, kl: str = "kl_states_mean") -> dict[str, Path]:
    """Write ``frontier.csv``, ``frontier.json`` (records) and, with ``html``, ``frontier.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "frontier.csv", "json": out / "frontier.json"}
    frame.to_csv(paths["csv"], index=False)
    paths["json"].write_text(frame.to_json(orient="records", indent=1))
    if html:
        paths["html"] = out / "frontier.html"
        # plotly.js written once next to the page (no CDN: the page works offline)
        plot_frontier(frame, kl=kl).write_html(paths["html"], include_plotlyjs="directory")
    return paths


_DASHES = ["solid", "dot", "dash", "longdash", "dashdot"]


def plot_frontier(frame: pd.DataFrame, *, kl: str = "kl_states_mean", title: str = "Reward-KL frontier"):
    """Mean reward against KL(pi||pi_ref) of each evaluated policy, with standard-error bars.

    One colour and marker per loss type (:mod:`shiq_lab.views.style`: ShiQ in its own colour,
    drawn on top), one line dash per beta; lines join the checkpoints of a run in step order
    (starting from the reference, a star at KL = 0); the last point of a run is labelled with its
    beta and step, every point's hover text gives its step. The figure follows its container's width, with the
    legend below it.
    """
    import plotly.graph_objects as go

    from shiq_lab.views.style import (
        by_drawing_order,
        format_beta,
        method_style,
        responsive,
        trace_style,
    )

    if kl not in ("kl_states_mean", "kl_mean"):
        raise ValueError(f"kl={kl!r}: choose 'kl_states_mean' (exact per-state KL) or 'kl_mean' (sampled log-ratio)")
    sem = kl.replace("_mean", "_sem")
    fig = go.Figure()
    ref = frame[frame["loss_type"] == "reference"]
    runs = frame[frame["loss_type"] != "reference"]
    betas = sorted(b for b in runs["beta"].unique() if not pd.isna(b))
    groups = dict(list(runs.groupby(["loss_type", "beta"], dropna=False)))
    order = by_drawing_order(dict.fromkeys(lt for lt, _ in sorted(groups, key=lambda k: (k[0], k[1]))))
    for loss_type in order:
        for (lt, beta), g in sorted(groups.items(), key=lambda kv: kv[0][1]):
            if lt != loss_type:
                continue
            g = g.sort_values("step")
            last = g["step"].iloc[-1]
            # the label on the run's last point only (the others crowd near the reference); every point's hover has its step
            text = [f"β={format_beta(beta)}, step {s}" if s == last else "" for s in g["step"]]
            hover = [f"step {s}" for s in g["step"]]
            if len(ref):
                g = pd.concat([ref.assign(loss_type=loss_type, beta=beta), g])
                text, hover = [""] + text, ["reference"] + hover
            style = trace_style(loss_type, mode="lines+markers+text", name=f"{loss_type} β={format_beta(beta)}")
            style["line"].update(width=2 if loss_type == "shiq" else 1.5,
                                 dash=_DASHES[betas.index(beta) % len(_DASHES)] if beta in betas else "solid")
            fig.add_trace(go.Scatter(
                x=g[kl], y=g["reward_mean"], legendgroup=loss_type, text=text, textposition="top center", cliponaxis=False,
                textfont={"size": 10, "color": method_style(loss_type).colour},
                error_x={"type": "data", "array": g[sem], "thickness": 1},
                error_y={"type": "data", "array": g["reward_sem"], "thickness": 1},
                customdata=hover, hovertemplate="%{customdata}<br>KL %{x:.3f}<br>reward %{y:.3f}<extra>%{fullData.name}</extra>",
                **style,
            ))
    if len(ref):
        fig.add_trace(go.Scatter(x=ref[kl], y=ref["reward_mean"], error_y={"type": "data", "array": ref["reward_sem"]},
                                 **trace_style("reference", mode="markers", name="reference")))
    label = "KL(π‖π_ref), exact per state (nats)" if kl == "kl_states_mean" else "KL(π‖π_ref), sampled log-ratio (nats)"
    fig.update_layout(title=title, xaxis_title=label, yaxis_title="mean reward of fresh generations", height=520)
    return responsive(fig, legend_title="run (loss, β)")


def frontier_summary(frame: pd.DataFrame, *, digits: int = 3) -> pd.DataFrame:
    """A frontier frame as a compact table: run, step, reward ± sem, KL ± sem, Pareto flag (if present)."""
    from shiq_lab.views.style import format_beta

    out = pd.DataFrame({
        "run": [lt if lt == "reference" else f"{lt} β={format_beta(b)}" for lt, b in zip(frame["loss_type"], frame["beta"])],
        "step": frame["step"].astype(int),
        "reward": [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(frame["reward_mean"], frame["reward_sem"])],
        "KL per state": [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(frame["kl_states_mean"], frame["kl_states_sem"])],
        "KL log-ratio": [f"{m:.{digits}f}" for m in frame["kl_mean"]],
        "length": frame["length_mean"].round(1),
    })
    if "pareto" in frame:
        out["Pareto"] = frame["pareto"].map({True: "✓", False: ""})
    return out.reset_index(drop=True)
