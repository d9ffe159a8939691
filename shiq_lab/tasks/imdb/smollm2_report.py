"""Results of the IMDB sweep on SmolLM2-135M: one JSON file, its markdown, the HTML frontier, the README block.

:func:`results_record` turns a :class:`~shiq_lab.imdb_task.ImdbTaskResult` into a plain record
(every number rounded, so the files are byte-deterministic for the same run), :func:`write_results`
writes ``<name>.json`` / ``.md`` / ``.html``, and :func:`readme_section` renders the README block
``imdb-smollm2`` (:mod:`shiq_lab.infra.readme`) from the committed JSON alone. The derived comparisons are computed from the record, never stored
twice:

- **gain in standard errors**: ``(reward - reward_ref) / sqrt(sem^2 + sem_ref^2)``. Policy and
  reference are sampled with the same seed and prompts, so this independent-errors s.e. is
  conservative.
- **reward at matched KL**: the best mean reward among a run type's evaluated points (every beta,
  every checkpoint) whose per-state KL is at most K. A best-of-several is optimistic by selection;
  the final-step table next to it is not.
- **data efficiency**: responses seen (``step x batch_size``, one pass over the offline data) at
  the first checkpoint that reaches the target reward, the best over betas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["RUN_LABELS", "results_record", "write_results", "render_markdown", "readme_section", "gain_se",
           "best_at_kl", "responses_to_target", "final_points"]

#: how each run type is named in tables
RUN_LABELS = {
    "shiq_token": "ShiQ, token rewards",
    "shiq": "ShiQ, sequence reward on the last token",
    "dpo": "DPO",
    "dro": "DRO",
    "copg": "CoPG",
}

RESULTS_NAME = "imdb_smollm2_cpu"
KL_LEVELS = (1.0, 2.0, 5.0)


def _r(x: float, nd: int = 4) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def results_record(result: Any, *, command: str, machine: dict[str, Any], target_gain: float = 0.05,
                   name: str = RESULTS_NAME) -> dict[str, Any]:
    """A JSON-ready record of a sweep (``result`` is an ``ImdbTaskResult``); ``name`` names its files."""
    cfg = _flat_config(result)
    frame = result.frontier
    ref = result.reference_eval
    points = []
    for _, row in frame[frame["loss_type"] != "reference"].iterrows():
        points.append({
            "run": row["loss_type"], "beta": _r(row["beta"]), "step": int(row["step"]),
            "responses": int(row["step"]) * int(cfg["batch_size"]),
            "reward_mean": _r(row["reward_mean"]), "reward_sem": _r(row["reward_sem"]),
            "kl_states_mean": _r(row["kl_states_mean"]), "kl_states_sem": _r(row["kl_states_sem"]),
            "kl_mean": _r(row["kl_mean"]), "length_mean": _r(row["length_mean"], 2),
            "finished_fraction": _r(row["finished_fraction"], 3),
        })
    ds = result.dataset
    return {
        "name": name,
        "command": command,
        "config": cfg,
        "machine": machine,
        "seconds": round(result.seconds, 1),
        "classifier": {k: _r(result.classifier_meta[k], 3) for k in
                       ("accuracy_test", "accuracy_test_windows", "accuracy_rotten_tomatoes")},
        "offline": {"n": len(ds), "reward_mean": _r(sum(ds["reward"]) / len(ds)),
                    "cut_at_max_new_tokens": int(sum(f is False for f in ds["finished"]))},
        "reference": {"reward_mean": _r(ref.reward_mean), "reward_sem": _r(ref.reward_sem), "n": int(ref.n),
                      "length_mean": _r(ref.length_mean, 2), "finished_fraction": _r(ref.finished_fraction, 3)},
        "target_reward": _r(ref.reward_mean + target_gain),
        "points": points,
    }


#: the settings a results page states (task fields, then training fields under their 0.1 names)
_TASK_FIELDS = ("model", "loss_types", "betas", "n_train_prompts", "samples_per_prompt", "n_words", "max_new_tokens",
                "reward", "use_lora", "lora_r", "lora_alpha", "eval_every", "n_eval_prompts", "eval_samples_per_prompt",
                "eval_seed", "sample_batch_size", "device", "cpu_threads", "dtype")
_TRAINING_FIELDS = {"max_steps": "max_steps", "batch_size": "per_device_train_batch_size", "learning_rate": "learning_rate",
                    "lr_scheduler_type": "lr_scheduler_type", "reward_normalization": "reward_normalization",
                    "max_length": "max_length", "seed": "seed"}


def _flat_config(result: Any) -> dict[str, Any]:
    task = result.config.to_dict()
    out = {k: task[k] for k in _TASK_FIELDS}
    out["loss_types"], out["betas"] = list(out["loss_types"]), [float(b) for b in out["betas"]]
    for name, attr in _TRAINING_FIELDS.items():
        value = getattr(result.training, attr)
        out[name] = getattr(value, "value", value)  # enums (lr_scheduler_type) as their string
    return out


def gain_se(point: dict[str, Any], reference: dict[str, Any]) -> float:
    """Reward gain over the reference in (conservative, independent) standard errors."""
    se = math.hypot(point["reward_sem"], reference["reward_sem"])
    return (point["reward_mean"] - reference["reward_mean"]) / se


def final_points(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The last evaluated point of every (run type, beta), in config order."""
    last: dict[tuple[str, float], dict[str, Any]] = {}
    for p in record["points"]:
        key = (p["run"], p["beta"])
        if key not in last or p["step"] > last[key]["step"]:
            last[key] = p
    return list(last.values())


def best_at_kl(record: dict[str, Any], run: str, kl: float) -> dict[str, Any] | None:
    """The highest-reward point of ``run`` with per-state KL <= ``kl`` (None if there is none)."""
    ok = [p for p in record["points"] if p["run"] == run and p["kl_states_mean"] <= kl]
    return max(ok, key=lambda p: (p["reward_mean"], -p["kl_states_mean"])) if ok else None


def responses_to_target(record: dict[str, Any], run: str) -> int | None:
    """Fewest offline responses after which some beta of ``run`` reaches ``target_reward`` (None: never)."""
    hits = [p["responses"] for p in record["points"] if p["run"] == run and p["reward_mean"] >= record["target_reward"]]
    return min(hits) if hits else None


def _runs(record: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for p in record["points"]:
        if p["run"] not in seen:
            seen.append(p["run"])
    return seen


def _fmt_point(p: dict[str, Any] | None, ref: dict[str, Any]) -> str:
    if p is None:
        return "–"
    return f"{p['reward_mean']:.3f} ± {p['reward_sem']:.3f} (KL {p['kl_states_mean']:.2f}, β {p['beta']:g}, step {p['step']}; {gain_se(p, ref):+.1f} s.e.)"


def _tables(record: dict[str, Any]) -> list[str]:
    ref = record["reference"]
    cfg = record["config"]
    runs = _runs(record)
    lines = [
        f"Reference (SmolLM2-135M-Instruct): mean reward **{ref['reward_mean']:.3f} ± {ref['reward_sem']:.3f}** on "
        f"{ref['n']} fresh samples of {cfg['n_eval_prompts']} held-out prompts. Offline data: {record['offline']['n']} "
        f"responses sampled from the reference ({cfg['n_train_prompts']} train prompts × {cfg['samples_per_prompt']}), "
        f"mean reward {record['offline']['reward_mean']:.3f}; {record['offline']['cut_at_max_new_tokens']} of them reached "
        f"the {cfg['max_new_tokens']}-token limit without EOS (treated as terminal).",
        "",
        "Final checkpoint (step {}) of every run: mean reward ± s.e., per-state KL(π‖π_ref) in nats, and the gain over the "
        "reference in standard errors:".format(cfg["max_steps"]),
        "",
        "| run | " + " | ".join(f"β = {b:g}" for b in cfg["betas"]) + " |",
        "|---|" + "---|" * len(cfg["betas"]),
    ]
    finals = final_points(record)
    for run in runs:
        cells = []
        for b in cfg["betas"]:
            p = next((q for q in finals if q["run"] == run and q["beta"] == _r(b)), None)
            cells.append("–" if p is None else f"{p['reward_mean']:.3f} ± {p['reward_sem']:.3f}, KL {p['kl_states_mean']:.2f} "
                         f"({gain_se(p, ref):+.1f} s.e.)")
        lines.append(f"| {RUN_LABELS.get(run, run)} | " + " | ".join(cells) + " |")
    lines += ["", "Best reward at matched KL (any β, any checkpoint with per-state KL ≤ K; a best-of-several, so "
              "optimistic by selection) and offline responses needed to reach the target reward "
              f"{record['target_reward']:.3f} (reference + 0.05):", "",
              "| run | " + " | ".join(f"KL ≤ {k:g}" for k in KL_LEVELS) + " | responses to target |",
              "|---|" + "---|" * (len(KL_LEVELS) + 1)]
    for run in runs:
        n = responses_to_target(record, run)
        lines.append(f"| {RUN_LABELS.get(run, run)} | " + " | ".join(_fmt_point(best_at_kl(record, run, k), ref)
                                                                    for k in KL_LEVELS)
                     + f" | {n if n is not None else 'not reached'} |")
    lines += ["", *_verdict(record)]
    return lines


def _verdict(record: dict[str, Any]) -> list[str]:
    """The issue's two questions, answered from the numbers (sentences generated, never typed)."""
    ref = record["reference"]
    out = []
    for run in ("shiq_token", "shiq"):
        best = best_at_kl(record, run, 5.0)
        if best is None:
            continue
        g = gain_se(best, ref)
        out.append(f"- {RUN_LABELS[run]}: best held-out gain at KL ≤ 5 is {best['reward_mean'] - ref['reward_mean']:+.3f} "
                   f"({g:+.1f} s.e.), {'more' if g > 3 else 'not more'} than 3 standard errors over the reference.")
    tok, seq = (best_at_kl(record, r, 5.0) for r in ("shiq_token", "shiq"))
    if tok is not None and seq is not None:
        diff = tok["reward_mean"] - seq["reward_mean"]
        se = math.hypot(tok["reward_sem"], seq["reward_sem"])
        nt, ns = responses_to_target(record, "shiq_token"), responses_to_target(record, "shiq")
        out.append(f"- Token against sequence rewards (ShiQ, best at KL ≤ 5): {diff:+.3f} ± {se:.3f} "
                   f"({diff / se:+.1f} s.e.); responses to the target: {nt if nt is not None else 'not reached'} "
                   f"against {ns if ns is not None else 'not reached'}.")
    return out


def render_markdown(record: dict[str, Any]) -> str:
    """The full results page (``<name>.md``)."""
    cfg = record["config"]
    m = record["machine"]
    head = [
        f"# IMDB positive continuations on SmolLM2-135M-Instruct ({record['name']})",
        "",
        f"Generated from `{record['name']}.json` by `shiq_lab.tasks.imdb.smollm2_report`; reproduce with `{record['command']}`.",
        "",
        f"Setting: {'LoRA r=' + str(cfg['lora_r']) if cfg['use_lora'] else 'full fine-tuning'}, lr {cfg['learning_rate']:g} "
        f"({cfg['lr_scheduler_type']}), {cfg['max_steps']} steps of {cfg['batch_size']} responses, prompts of "
        f"{cfg['n_words']} words, responses of at most {cfg['max_new_tokens']} tokens, rewards "
        f"{cfg['reward_normalization']}-scored (β in units of the reward's standard deviation), evaluated every "
        f"{cfg['eval_every']} steps on {cfg['n_eval_prompts']} held-out prompts × {cfg['eval_samples_per_prompt']} samples. "
        f"Reward = P(positive) of the continuation under the project's classifier (held-out accuracy "
        f"{record['classifier']['accuracy_test']:.3f} on full reviews, {record['classifier']['accuracy_test_windows']:.3f} "
        "on 8-48-word windows).",
        "",
        f"Wall time {record['seconds'] / 60:.1f} min on {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, "
        f"torch threads {cfg.get('cpu_threads') or m.get('torch_threads', '?')}; load average at the end "
        f"{m.get('loadavg_1m_5m_15m', '?')}).",
        "",
    ]
    rows = ["", "## Every evaluated point", "", "| run | β | step | responses | reward | s.e. | KL per state | KL sampled | length | finished |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for p in record["points"]:
        rows.append(f"| {p['run']} | {p['beta']:g} | {p['step']} | {p['responses']} | {p['reward_mean']:.3f} | "
                    f"{p['reward_sem']:.3f} | {p['kl_states_mean']:.3f} | {p['kl_mean']:.3f} | {p['length_mean']:.1f} | "
                    f"{p['finished_fraction']:.2f} |")
    return "\n".join(head + _tables(record) + rows) + "\n"


def write_results(record: dict[str, Any], out_dir: str | Path, frontier=None) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (and ``<name>.html`` from a frontier frame) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{record['name']}.json", "md": out / f"{record['name']}.md"}
    paths["json"].write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    paths["md"].write_text(render_markdown(record))
    if frontier is not None:
        from shiq_lab.evaluation.frontier import plot_frontier

        paths["html"] = out / f"{record['name']}.html"
        fig = plot_frontier(frontier, title="Reward-KL frontier, SmolLM2-135M on IMDB (CPU sweep)")
        # plotly.js from its CDN (the page is small and byte-deterministic with a fixed div id)
        fig.write_html(paths["html"], include_plotlyjs="cdn", full_html=True, div_id="frontier")
    return paths


def load_record(root: Path, name: str = RESULTS_NAME) -> dict[str, Any] | None:
    """The committed record, or None when it has not been produced."""
    path = Path(root) / "benchmarks" / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def readme_section(root: Path) -> str:
    """The README block ``imdb-smollm2``: the tables of the committed CPU sweep."""
    record = load_record(root)
    if record is None:
        return "_The SmolLM2 CPU sweep has not been run yet: `make bench-imdb-smollm2`._\n"
    intro = (f"From `benchmarks/results/{record['name']}.json` ({record['seconds'] / 60:.0f} min wall, "
             f"`{record['command']}`; frontier plot in `{record['name']}.html`, every point in `{record['name']}.md`).")
    return "\n".join([intro, ""] + _tables(record)) + "\n"


def rerender(root: Path, name: str = RESULTS_NAME) -> list[Path]:
    """Rewrite ``<name>.md`` from the committed ``<name>.json``; returns what changed (the README block is
    rewritten by ``python -m shiq_lab.infra.readme --write``)."""
    changed = []
    record = load_record(root, name)
    if record is not None:
        md = Path(root) / "benchmarks" / "results" / f"{name}.md"
        text = render_markdown(record)
        if not md.exists() or md.read_text() != text:
            md.write_text(text)
            changed.append(md)
    return changed


if __name__ == "__main__":  # python -m shiq_lab.tasks.imdb.smollm2_report: re-render every SmolLM2 page
    import sys

    root = Path(__file__).resolve().parents[3]
    changed = [c for f in sorted((root / "benchmarks" / "results").glob("imdb_smollm2_*.json")) for c in rerender(root, f.stem)]
    print("rewrote " + ", ".join(str(c) for c in changed) if changed else "results pages already current")
    sys.exit(0)
