"""Committed results of the IMDB sweep and the README blocks rendered from them.

``python -m shiq_lab.tasks.imdb.sweep --config configs/sweep/imdb_sweep_tiny.yaml --results benchmarks/results/imdb_sweep_tiny.json``
writes the results file (:func:`write_results`); :func:`readme_tiny`, :func:`readme_mid` and
:func:`readme_pieces` render the README's tables from it (:mod:`shiq_lab.infra.readme`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "results_record", "write_results", "readme_tiny", "readme_mid", "readme_pieces"]

RESULTS = {"tiny": "benchmarks/results/imdb_sweep_tiny.json", "mid": "benchmarks/results/imdb_mid.json"}
_NAMES = {"shiq": "ShiQ", "dpo": "DPO", "dro": "DRO", "copg": "CoPG"}
_FRONTIER_KEYS = ("loss_type", "beta", "step", "reward_mean", "reward_sem", "kl_mean", "kl_sem", "kl_states_mean",
                  "kl_states_sem", "length_mean", "finished_fraction", "n", "pareto")


def _clean(value: Any) -> Any:
    """JSON-safe and short: floats to 6 significant digits, NaN to None, numpy scalars to Python."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else float(f"{value:.6g}")
    return value


def results_record(result: Any, *, command: str, cpu_seconds: float) -> dict[str, Any]:
    """What the README needs from an :class:`~shiq_lab.tasks.imdb.sweep.ImdbTaskResult`, as a JSON-ready dict."""
    frontier = [{k: _clean(row[k]) for k in _FRONTIER_KEYS} for _, row in result.frontier.iterrows()]
    classifier = {k: _clean(v) for k, v in result.classifier_meta.items() if k != "config"}
    return {
        "reference_model": _reference_model_meta(result.config.model),
        "command": command,
        # the task's fields and the training fields the tables name (batch_size: responses per step, every loss)
        "config": {**result.config.to_dict(), "max_steps": result.training.max_steps,
                   "batch_size": result.training.per_device_train_batch_size,
                   "learning_rate": result.training.learning_rate, "seed": result.training.seed},
        "n_offline_responses": len(result.dataset),
        "wall_seconds": round(result.seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "classifier": classifier,
        "frontier": frontier,
    }


def _reference_model_meta(name: str) -> dict[str, Any]:
    """Size, held-out loss and build time of a model built here (``pretrain.json``), else its name only."""
    from shiq_lab.infra.models import MODEL_BUILDERS, model_folder

    meta: dict[str, Any] = {"name": name}
    if name in MODEL_BUILDERS:
        report = model_folder(name) / "pretrain.json"
        if report.exists():
            data = json.loads(report.read_text())
            meta.update({k: _clean(data[k]) for k in ("heldout_loss", "n_parameters", "seconds") if k in data})
    return meta


def write_results(result: Any, path: str | Path, *, command: str, cpu_seconds: float) -> Path:
    """Write :func:`results_record` to ``path`` (sorted keys: the same run gives the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = results_record(result, command=command, cpu_seconds=cpu_seconds)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def _load(root: Path, which: str) -> dict[str, Any]:
    return json.loads((Path(root) / RESULTS[which]).read_text())


def _final(data: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    """Last frontier point of each (loss type, beta)."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for row in data["frontier"]:
        if row["loss_type"] == "reference":
            continue
        key = (row["loss_type"], row["beta"])
        if key not in out or row["step"] > out[key]["step"]:
            out[key] = row
    return out


def _reference(data: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in data["frontier"] if r["loss_type"] == "reference")


def _table(data: dict[str, Any]) -> str:
    cfg = data["config"]
    betas = cfg["betas"]
    final = _final(data)
    head = "| final policy (step {}) | ".format(cfg["max_steps"]) + " | ".join(
        f"beta {b:g}: reward | KL" for b in betas) + " |"
    lines = [head, "|---|" + "---|---|" * len(betas)]
    for lt in cfg["loss_types"]:
        cells = [f"{final[(lt, b)]['reward_mean']:.3f} | {final[(lt, b)]['kl_states_mean']:.2f}" for b in betas]
        lines.append(f"| {_NAMES.get(lt, lt)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setting(data: dict[str, Any]) -> str:
    cfg = data["config"]
    ref = _reference(data)
    sem = max(r["reward_sem"] for r in data["frontier"])
    steps = sorted({r["step"] for r in data["frontier"] if r["loss_type"] != "reference"})
    return (f"{data['n_offline_responses']:,} offline responses, {cfg['max_steps']} steps of {cfg['batch_size']} "
            f"responses, lr {cfg['learning_rate']:g}, betas {' / '.join(f'{b:g}' for b in cfg['betas'])}, evaluated at "
            f"steps {', '.join(map(str, steps))} on {ref['n']} held-out samples (reward s.e. ≤ {sem:.3f}); "
            f"{data['cpu_seconds']:.0f} s of CPU ({data['wall_seconds']:.0f} s wall). "
            f"Reference reward {ref['reward_mean']:.3f}.\n\n`{data['command']}`")


def readme_tiny(root: Path) -> str:
    """The notebook-default sweep: setting, final table and what the notebook asserts, with its numbers."""
    data = _load(root, "tiny")
    final = _final(data)
    ref = _reference(data)["reward_mean"]
    mean_final = sum(r["reward_mean"] for r in final.values()) / len(final)
    lower = all(final[(lt, max(data["config"]["betas"]))]["kl_states_mean"]
                < final[(lt, min(data["config"]["betas"]))]["kl_states_mean"] for lt in data["config"]["loss_types"])
    return "\n".join([
        f"Notebook default (CI): {_setting(data)}", "", _table(data), "",
        "What the notebook asserts: classifier held-out accuracy > 0.88 "
        f"(here {data['classifier']['accuracy_test']:.3f}); "
        "reference KL exactly 0; per-state KL >= 0 and the sampled log-ratio within 5 s.e. of it; for every loss, "
        f"the final KL at the larger beta below the one at the smaller ({'holds' if lower else 'FAILS'} here); "
        "the final "
        f"policies' mean reward ({mean_final:.3f}) above the reference's ({ref:.3f}) by > 0.02.",
    ])


def readme_mid(root: Path, kl_max: float = 4.0) -> str:
    """The mid-scale sweep: setting, final table, and the best points below ``kl_max`` nats."""
    data = _load(root, "mid")
    runs = [r for r in data["frontier"] if r["loss_type"] != "reference"]
    low = sorted((r for r in runs if r["kl_states_mean"] < kl_max), key=lambda r: -r["reward_mean"])
    best = low[0] if low else None
    lines = [f"Mid-scale CPU run: {_setting(data)}", "", _table(data), ""]
    dpo = sorted((r for r in runs if r["loss_type"] == "dpo" and r["beta"] == min(data["config"]["betas"])),
                 key=lambda r: r["step"])
    if best is not None:
        other = next((r for r in low if r["loss_type"] != best["loss_type"]), None)
        text = (f"Below KL {kl_max:g} the most rewarded point is {_NAMES[best['loss_type']]}'s: "
                f"{best['reward_mean']:.3f} "
                f"at KL {best['kl_states_mean']:.2f} (beta {best['beta']:g}, step {best['step']})")
        if other is not None:
            text += (f"; the best other method there is {_NAMES[other['loss_type']]} with "
                     f"{other['reward_mean']:.3f} at KL "
                     f"{other['kl_states_mean']:.2f} (beta {other['beta']:g}, step {other['step']})")
        top = max(runs, key=lambda r: r["reward_mean"])
        text += (f". The highest reward of the sweep is {_NAMES[top['loss_type']]}'s {top['reward_mean']:.3f}, at KL "
                 f"{top['kl_states_mean']:.2f} (beta {top['beta']:g}, step {top['step']}).")
        if dpo:
            kls = ", ".join(f"{r['kl_states_mean']:.1f}" for r in dpo)
            steps = ", ".join(str(r["step"]) for r in dpo)
            text += f" DPO at beta {dpo[0]['beta']:g} is at KL {kls} at steps {steps}."
        lines.append(text)
    return "\n".join(lines)


def readme_pieces(root: Path) -> str:
    """The table of locally built pieces and the classifier's held-out accuracy, as the committed sweep built them."""
    data = _load(root, "tiny")
    c, m = data["classifier"], data.get("reference_model", {})
    n_reviews = c["n_train_reviews"] + c["n_test_reviews"]
    lm = (f"{m['n_parameters'] / 1e6:.1f}M-parameter Llama-shaped LM + 2048-token BPE, pretrained on train reviews "
          f"(held-out loss {m['heldout_loss']:.2f} nats/token)") if "n_parameters" in m else "small Llama-shaped LM"
    rows = [
        "| piece | module | what it is | build time (one CPU core) |", "|---|---|---|---|",
        f"| split and prompts | `shiq_lab.tasks.imdb.reviews` | {n_reviews:,} de-duplicated IMDB reviews, fixed 80/20 split (seed 0) "
        "| seconds |",
        "| reward model | `shiq_lab.tasks.imdb.reward` | logistic regression on hashed word 1-2-grams, mean-bag score, "
        "trained "
        f"on reviews and 8-48-word windows of them | {c['seconds']:.0f} s |",
        f"| `imdb-small` | `shiq_lab.tasks.imdb.lm` | {lm} | {m.get('seconds', float('nan')):.0f} s |",
        "| offline data | `shiq_lab.tasks.imdb.sweep.offline_dataset` | 4 continuations of 16 tokens per train prompt, with "
        "rewards, exact token ids | seconds |",
    ]
    return "\n".join(rows) + "\n\n" + (
            f"Held-out accuracy of the classifier ({c['n_test_reviews']:,} test reviews never seen in training, "
            f"{c['n_train_reviews']:,} train reviews): **{c['accuracy_test']:.3f}** on full reviews, "
            f"{c['accuracy_test_windows']:.3f} on random 8-48-word windows of them (the length of a continuation), "
            f"{c['accuracy_rotten_tomatoes']:.3f} on Rotten Tomatoes one-liners (another site, out of domain).")
