"""Evaluating a policy against its reference on held-out prompts: reward and KL of fresh generations.

The headline metric of METHOD.md: sample responses from the policy, score them, and measure
KL(pi || pi_ref) *on the same samples*:

- ``kl_mean``: mean over samples of ``sum_t ln pi(a_t|s_t) - ln pi_ref(a_t|s_t)`` over the sampled
  response tokens (EOS included). An unbiased estimate of the sequence KL; one sample can be < 0.
- ``kl_states_mean``: mean over samples of ``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))``, the exact
  per-state KL summed along the sampled path. Also unbiased for the sequence KL (the chain rule of
  KL), never negative, and of lower variance: the number to trust at small sample sizes.

Both are exactly 0 for the reference itself (same code path, same tensors). Log-probabilities are
recomputed by teacher forcing on the sampled token ids (never re-tokenised text).

Over a sweep of beta and checkpoints, the points (KL, reward) form the reward-KL frontier:
:func:`evaluate_checkpoints` -> a ``pandas.DataFrame``, :func:`save_frontier` (CSV + JSON + HTML),
:func:`plot_frontier` (plotly), :func:`pareto_mask`. :func:`cli_main` is ``shiq-lab evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from .cpu import cpu_threads
from .sampling import RewardFn, Samples, sample_completions, score_samples

__all__ = [
    "FRONTIER_COLUMNS",
    "SequenceStats",
    "sequence_stats",
    "PolicyEval",
    "evaluate_policy",
    "CheckpointSpec",
    "find_checkpoints",
    "evaluate_checkpoints",
    "pareto_mask",
    "save_frontier",
    "plot_frontier",
    "frontier_summary",
    "cli_main",
]

#: columns of a frontier frame, in order
FRONTIER_COLUMNS = ["label", "loss_type", "beta", "step", "reward_mean", "reward_sem", "kl_mean", "kl_sem",
                    "kl_states_mean", "kl_states_sem", "length_mean", "finished_fraction", "n", "path"]


@dataclass
class SequenceStats:
    """Per-sample statistics of sampled responses under a policy and its reference."""

    logratio: np.ndarray  # [N] sum over response tokens of ln pi - ln pi_ref at the sampled tokens
    kl_states: np.ndarray  # [N] sum over response states of KL(pi(.|s) || pi_ref(.|s))
    policy_logp: np.ndarray  # [N] sum over response tokens of ln pi
    lengths: np.ndarray  # [N] response tokens


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference model: ``reference``, or the PEFT ``policy`` with its adapters disabled."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("reference=None means 'the policy with its adapters disabled', which needs a peft model; "
                         "pass the reference model instead")
    with policy.disable_adapter():
        yield policy


@torch.no_grad()
def _response_log_softmax(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                          starts: Sequence[int], lengths: Sequence[int]) -> list[torch.Tensor]:
    """Per row, [n_i, V] fp32 log-softmax of the states before each response token."""
    model.eval()
    device = _device_of(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for b, (s, n) in enumerate(zip(starts, lengths)):
        # logits[t] is the state before token t+1: the response's states are s-1 .. s+n-2
        out.append(torch.log_softmax(logits[b, s - 1:s + n - 1].float(), dim=-1))
    return out


@torch.no_grad()
def sequence_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    samples: Samples,
    *,
    pad_id: int,
    batch_size: int = 32,
) -> SequenceStats:
    """Teacher-forced log-ratio and per-state KL of each sampled response (see the module docstring).

    ``reference=None`` uses the PEFT ``policy`` with its adapters disabled. When ``reference is
    policy`` the reference pass is skipped and every statistic is exactly 0.
    """
    n_all = len(samples)
    logratio, kl_states, logp_sum = np.zeros(n_all), np.zeros(n_all), np.zeros(n_all)
    lengths = np.array([len(c) for c in samples.completion_ids])
    if (lengths == 0).any():
        raise ValueError("a sample has an empty response: nothing to evaluate")
    for k in range(0, n_all, batch_size):
        rows = range(k, min(n_all, k + batch_size))
        seqs = [samples.prompt_ids[i] + samples.completion_ids[i] for i in rows]
        starts = [len(samples.prompt_ids[i]) for i in rows]
        ns = [len(samples.completion_ids[i]) for i in rows]
        if min(starts) < 1:
            raise ValueError("a sample has an empty prompt: its first response token has no state to score")
        ids, mask = _right_pad(seqs, pad_id)
        pol = _response_log_softmax(policy, ids, mask, starts, ns)
        if reference is policy:
            ref = pol
        else:
            with _as_reference(policy, reference) as ref_model:
                ref = _response_log_softmax(ref_model, ids, mask, starts, ns)
        for j, i in enumerate(rows):
            actions = torch.as_tensor(samples.completion_ids[i], dtype=torch.long, device=pol[j].device)
            lp = pol[j].gather(-1, actions[:, None]).squeeze(-1)
            rp = ref[j].to(pol[j].device).gather(-1, actions[:, None]).squeeze(-1)
            logratio[i] = float((lp - rp).sum())
            logp_sum[i] = float(lp.sum())
            per_state = (pol[j].exp() * (pol[j] - ref[j].to(pol[j].device))).sum(-1)
            # exp(-inf) * (-inf - x) is nan for tokens the policy cannot emit: they contribute 0
            kl_states[i] = float(torch.nan_to_num(per_state, nan=0.0).clamp(min=0.0).sum())
    return SequenceStats(logratio=logratio, kl_states=kl_states, policy_logp=logp_sum, lengths=lengths)


def _sem(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


@dataclass
class PolicyEval:
    """Reward and KL of a policy's fresh generations on a prompt set (means and standard errors)."""

    reward_mean: float
    reward_sem: float
    kl_mean: float
    kl_sem: float
    kl_states_mean: float
    kl_states_sem: float
    length_mean: float
    finished_fraction: float
    n: int
    samples: Samples = field(repr=False)
    stats: SequenceStats = field(repr=False)

    def row(self) -> dict[str, float]:
        """The numbers (no samples), for a frontier table."""
        return {k: v for k, v in asdict(self).items() if k not in ("samples", "stats")}

    def frame(self) -> pd.DataFrame:
        """One row per sample: prompt, completion, reward, log-ratio, per-state KL, length, finished."""
        return pd.DataFrame({
            "prompt": self.samples.prompts, "completion": self.samples.completions, "reward": self.samples.rewards,
            "logratio": self.stats.logratio, "kl_states": self.stats.kl_states, "length": self.stats.lengths,
            "finished": self.samples.finished,
        })


def evaluate_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> PolicyEval:
    """Sample from ``policy`` on ``prompts``, score the responses, and measure KL to ``reference`` on them.

    Args:
        policy: the model to evaluate (left in eval mode).
        reference: the reference model (same tokenizer), or None for a PEFT policy's disabled adapters.
        tokenizer: the shared tokenizer.
        prompts: held-out prompts (e.g. ``imdb_prompts("test")``).
        reward_fn: ``reward_fn(prompts, completions) -> [N]`` rewards.
        samples_per_prompt, max_new_tokens, batch_size: sampling settings (see
            :func:`shiq_lab.sampling.sample_completions`).
        seed: sampling seed: use the same one for every policy compared (common random numbers).
        device: where to sample (default: the policy's device); the reference is moved there.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one held-out prompt")
    samples = sample_completions(policy, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device)
    score_samples(samples, reward_fn)
    if reference is not None and reference is not policy and _device_of(reference) != _device_of(policy):
        reference.to(_device_of(policy))
    stats = sequence_stats(policy, reference, samples, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    rewards = np.asarray(samples.rewards, dtype=np.float64)
    return PolicyEval(
        reward_mean=float(rewards.mean()), reward_sem=_sem(rewards),
        kl_mean=float(stats.logratio.mean()), kl_sem=_sem(stats.logratio),
        kl_states_mean=float(stats.kl_states.mean()), kl_states_sem=_sem(stats.kl_states),
        length_mean=float(stats.lengths.mean()), finished_fraction=float(np.mean(samples.finished)),
        n=len(samples), samples=samples, stats=stats,
    )


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
    return specs


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
    from .models import load_model

    rows = []
    if include_reference:
        rows.append(_reference_row(evaluate_policy(reference, reference, tokenizer, prompts, reward_fn, **eval_kwargs)))
    for spec in checkpoints:
        policy, _ = load_model(spec.path, dtype=dtype, device=_device_of(reference))
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

    from .views.style import (
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
    from .views.style import format_beta

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


# ----------------------------------------------------------------------------------------------
# command line: shiq-lab evaluate
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shiq-lab evaluate", description=(
        "Reward and KL(pi||pi_ref) of fresh generations on held-out IMDB prompts, for each checkpoint; "
        "writes the frontier (CSV, JSON, HTML). Use --offline for the loss metrics of a checkpoint on a dataset."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", help="model folders to evaluate")
    src.add_argument("--run_dir", help="evaluate every model folder below this one (checkpoint-*, final models)")
    p.add_argument("--reference", default=None, help="reference model: registered name, folder or hub id "
                   "(default: the 'model' field of the run's run.json)")
    p.add_argument("--n_prompts", type=int, default=64, help="held-out IMDB prompts (test side of the split)")
    p.add_argument("--n_words", type=int, default=8, help="words per prompt")
    p.add_argument("--samples_per_prompt", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every checkpoint)")
    p.add_argument("--prompt_seed", type=int, default=1, help="seed of the held-out prompt pick")
    p.add_argument("--reward", choices=("prob", "logit"), default="prob", help="P(positive) or its log-odds")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--cpu_threads", type=int, default=1, help="torch threads on the CPU (small models: 1 is fastest; 0 = torch's setting)")
    p.add_argument("--out", default=None, help="folder for frontier.csv/json/html (default: RUN_DIR/frontier or ./frontier)")
    return p


def _reference_name(specs: Sequence[CheckpointSpec]) -> str | None:
    for spec in specs:
        for candidate in (Path(spec.path) / "run.json", Path(spec.path).parent / "run.json"):
            if candidate.exists():
                model = json.loads(candidate.read_text()).get("model")
                if model:
                    return str(model)
    return None


def cli_main(argv: list[str] | None = None) -> int:
    """``shiq-lab evaluate``: the frontier of some checkpoints on held-out IMDB prompts."""
    from . import imdb_model  # noqa: F401 -- registers imdb-small
    from .imdb import imdb_prompts
    from .models import load_model
    from .reward_model import SentimentReward, load_reward_model

    args = _parser().parse_args(argv)
    specs = find_checkpoints(args.run_dir) if args.run_dir else [
        CheckpointSpec(path=c, **{k: v for k, v in _checkpoint_meta(Path(c)).items() if k in ("loss_type", "beta", "step")})
        for c in args.checkpoints]
    missing = [s.path for s in specs if not Path(s.path).exists()]
    if missing:
        raise SystemExit(f"checkpoint folder(s) not found: {missing}")
    reference_name = args.reference or _reference_name(specs)
    if reference_name is None:
        raise SystemExit("--reference is needed: no run.json next to the checkpoints names the reference model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference, tokenizer = load_model(reference_name, device=device)
    reward = SentimentReward(load_reward_model(), kind=args.reward)
    prompts = imdb_prompts("test", args.n_prompts, n_words=args.n_words, seed=args.prompt_seed)
    with cpu_threads((args.cpu_threads or None) if device == "cpu" else None):
        frame = evaluate_checkpoints(specs, reference, tokenizer, prompts, reward,
                                     samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out) if args.out else (Path(args.run_dir) / "frontier" if args.run_dir else Path("frontier"))
    paths = save_frontier(frame, out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(frame.drop(columns=["path"]).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"\nfrontier: {paths['csv']}  {paths['json']}  {paths.get('html', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
