"""BFCL results: the committed JSON + markdown, and the README block generated from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["findings", "RESULTS", "load_results", "readme_section", "results_table", "write_results"]

RESULTS = Path("benchmarks/results/bfcl_cpu.json")
_LABELS = {"reference": "reference (SmolLM2-135M-Instruct)", "shiq_turn": "ShiQ, per-turn rewards",
           "shiq_final": "ShiQ, final score only", "dro": "DRO", "copg": "CoPG", "dpo": "DPO (pairs by return)"}


def load_results(root: Path) -> dict[str, Any]:
    path = Path(root) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make bench-bfcl` (writes it) or check out the committed file")
    return json.loads(path.read_text())


def _ordered(mapping: dict[str, Any], order: list[str]) -> list[tuple[str, Any]]:
    """Items in a fixed order (the JSON file stores keys sorted), unknown keys last, sorted."""
    return [(k, mapping[k]) for k in order if k in mapping] + sorted((k, v) for k, v in mapping.items() if k not in order)


def results_table(doc: dict[str, Any]) -> str:
    """Markdown table: per-turn accuracy, official score and KL for the reference and each variant."""
    lines = ["| policy | per-turn accuracy | official score | KL(pi‖pi_ref) (± sem) |", "|---|---:|---:|---:|"]
    for name, r in _ordered(doc["results"], list(_LABELS)):
        lines.append(f"| {_LABELS.get(name, name)} | {r['turn_accuracy']:.3f} | {r['score']:.3f} | "
                     f"{r['kl_states_mean']:.2f} ± {r['kl_states_sem']:.2f} |")
    return "\n".join(lines)


def _scale(doc: dict[str, Any]) -> str:
    c, s, d = doc["config"], doc["subset"], doc["offline_data"]
    sources = ", ".join(f"{k} {d['n_by_source'][k]} (score {v:.2f})"
                        for k, v in _ordered(d["score_by_source"], ["ground_truth", "drop", "swap", "perturb", "sample"]))
    ref = doc["results"]["reference"]
    return (f"Scale: `{c['model']}`, BFCL-V3 `{c['category']}`, the {c['n_entries']} entries with the shortest "
            f"ground-truth conversation ({s['tokens_mean']:.0f} tokens on average, docs profile `{c['docs']}`), "
            f"{len(s['train'])} for training and {len(s['held_out'])} held out (split by entry id). Offline data: "
            f"{d['n']} trajectories ({sources}). {c['max_steps']} steps of {c['batch_size']} rows per variant, "
            f"beta {c['beta']:g}, learning rate {c['learning_rate']:g}; evaluation: {ref['n_trajectories']} sampled "
            f"episodes ({ref['n_turns']} turns) at temperature {c['eval_temperature']:g}, KL on the same samples. "
            f"Wall time {doc['seconds'] / 60:.0f} min on the CPU.")


def findings(doc: dict[str, Any]) -> str:
    """What the comparison showed, in words generated from the numbers (no number typed by hand)."""
    res = doc["results"]
    ref = res["reference"]
    n = max(int(ref["n_turns"]), 1)
    variants = {k: v for k, v in _ordered(res, list(_LABELS)) if k != "reference"}
    if not variants:
        return "Only the reference was evaluated."
    best = max(variants.values(), key=lambda r: (r["turn_accuracy"], r["score"]))
    leaders = [k for k, r in variants.items() if r["turn_accuracy"] == best["turn_accuracy"]]
    p = best["turn_accuracy"]
    # binomial standard error of a per-turn accuracy over the held-out turns (turns of one episode are not
    # independent, so this is optimistic)
    sem = (max(p * (1 - p), 1 / n) / n) ** 0.5
    parts = [f"The reference solves {ref['turn_accuracy']:.3f} of the {n} held-out turns "
             f"(official score {ref['score']:.3f})."]
    names = " and ".join(_LABELS.get(k, k) for k in leaders)
    if best["turn_accuracy"] > ref["turn_accuracy"]:
        parts.append(f"The best per-turn accuracy, {p:.3f}, is {names}'s, at KL {best['kl_states_mean']:.2f}.")
    else:
        parts.append("No variant improves on the reference's per-turn accuracy at this scale.")
    if "shiq_turn" in variants and "shiq_final" in variants:
        a, b = variants["shiq_turn"], variants["shiq_final"]
        gap = a["turn_accuracy"] - b["turn_accuracy"]
        if abs(gap) < 2 * sem:
            verdict = "within two standard errors of each other: no measurable effect of the per-turn rewards here"
        elif gap > 0:
            verdict = "per-turn rewards ahead"
        else:
            verdict = "the final score alone ahead"
        parts.append(f"ShiQ with per-turn rewards vs with the final score only: {a['turn_accuracy']:.3f} vs "
                     f"{b['turn_accuracy']:.3f} per-turn accuracy ({verdict}).")
    parts.append(f"One standard error of a per-turn accuracy near {p:.2f} over {n} turns is about {sem:.3f}; "
                 "smaller differences are noise at this scale.")
    return " ".join(parts)


def write_results(doc: dict[str, Any], base: Path) -> list[Path]:
    """``base.json`` (the results document) and ``base.md`` (scale + table), byte-deterministic."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    js, md = base.with_suffix(".json"), base.with_suffix(".md")
    js.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    md.write_text(f"# BFCL-V3 multi-turn tool use, CPU scale\n\n{_scale(doc)}\n\n{results_table(doc)}\n\n"
                  f"{findings(doc)}\n")
    return [js, md]


def readme_section(root: Path) -> str:
    """The README block ``bfcl``: scale and results table from the committed results file."""
    doc = load_results(root)
    return f"{_scale(doc)}\n\n{results_table(doc)}\n\n{findings(doc)}\n"
