"""Markdown tables of a synthetic-benchmark results dict (:func:`shiq_lab.tasks.synthetic.suite.run_suite`).

``render_markdown`` writes the whole report; ``headline_table`` is the compact table the README
shows. Cells read "mean ± spread" with the spread the population standard deviation over seeds.
"""

from __future__ import annotations

import math

from shiq_lab.losses import LOSSES

#: the sequence-level methods, in the registry's order (dpo, dpo_bt, dro, copg)
_SEQUENCE_LEVEL = tuple(name for name, spec in LOSSES.items() if spec.level == "sequence")

__all__ = ["render_markdown", "headline_table", "efficiency_table", "fmt", "calibration_table", "frontier_table", "mean_curves", "efficiency_curves", "key_numbers"]

_LABEL = {
    "shiq": "ShiQ (full path)", "shiq_nstep": "ShiQ n-step", "shiq_1step": "shifted one-step",
    "scoring": "unshifted scoring (step 2)", "naive": "naive logits-as-Q (step 1)",
    "dpo": "DPO (ordered by return)", "dpo_bt": "DPO, soft BT labels (diag.)", "dro": "DRO (learned V)", "copg": "CoPG",
}


def fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    """``0.981 ± 0.004``; ``diverged`` for a missing value."""
    if mean is None or not math.isfinite(mean):
        return "diverged"
    text = f"{mean:.{digits}f}" if abs(mean) < 1000 else f"{mean:.3g}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _selected_main(results: dict) -> list[dict]:
    main = results["meta"]["config"]["main_size"]
    sel = results["selected_lr"]
    return [r for r in results["runs"] if r["size"] == main and r["lr"] == sel[r["param"]][r["task"]][r["method"]][r["behaviour"]]]


def _over_tasks(results: dict, param: str, method: str, behaviour: str, key: str) -> tuple[float | None, float | None]:
    """Mean and std over seeds of the task-averaged final ``key``."""
    runs = [r for r in _selected_main(results) if (r["param"], r["method"], r["behaviour"]) == (param, method, behaviour)]
    by_seed: dict[int, list[float | None]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r["final"][key])
    if not by_seed or any(v is None for vals in by_seed.values() for v in vals):
        return None, None
    per_seed = [sum(v) / len(v) for v in by_seed.values()]  # type: ignore[arg-type]
    mean = sum(per_seed) / len(per_seed)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in per_seed) / len(per_seed))


def headline_table(results: dict, key: str = "normalised_return") -> str:
    """Methods x (parameterisation, behaviour): ``key`` averaged over the tasks."""
    cfg = results["meta"]["config"]
    params, behaviours = cfg["parameterisations"], cfg["behaviours"]
    head = "| method | " + " | ".join(f"{p} · {b}" for p in params for b in behaviours) + " |"
    lines = [head, "|" + "---|" * (1 + len(params) * len(behaviours))]
    for m in cfg["methods"]:
        cells = [fmt(*_over_tasks(results, p, m, b, key), digits=2) for p in params for b in behaviours]
        lines.append(f"| {_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows(results: dict) -> dict[tuple[str, str, str, str], dict]:
    return {(r["param"], r["task"], r["method"], r["behaviour"]): r for r in results["summary"]}


def efficiency_table(results: dict, param: str = "tabular", behaviours: tuple[str, ...] | None = None) -> str:
    """Methods x (task, behaviour): sequences needed for the target fraction of the optimal improvement.

    ``n`` when the seed-averaged normalised return reaches the target with n sequences; ``(n)`` with
    the plateau value when it never does (n then reaches 99 % of the method's own plateau).
    """
    cfg = results["meta"]["config"]
    rows = _rows(results)
    cols = [(t, b) for t in cfg["tasks"] for b in (behaviours or cfg["behaviours"])]
    lines = ["| method | " + " | ".join(f"{t} · {b}" for t, b in cols) + " |", "|" + "---|" * (1 + len(cols))]
    for m in cfg["methods"]:
        cells = []
        for t, b in cols:
            row = rows.get((param, t, m, b))
            if row is None or "sequences_to_target" not in row:
                cells.append("–")
            elif row["reached_target"]:
                cells.append(str(row["sequences_to_target"]))
            else:
                best = max((s for s in row["efficiency_scores"] if s is not None), default=None)
                cells.append(f"({row['sequences_to_target']}; plateau {fmt(best, digits=2)})")
        lines.append(f"| {_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _detail_table(results: dict, param: str, task: str) -> str:
    cfg = results["meta"]["config"]
    rows = _rows(results)
    lines = ["| method | " + " | ".join(cfg["behaviours"]) + " |", "|" + "---|" * (1 + len(cfg["behaviours"]))]
    for m in cfg["methods"]:
        cells = []
        for b in cfg["behaviours"]:
            r = rows.get((param, task, m, b))
            if r is None:
                cells.append("–")
                continue
            cells.append(f"{fmt(r['normalised_return_mean'], r['normalised_return_std'])} · KL {fmt(r['kl_states_mean'], digits=4)} · lr {r['lr']:g}")
        lines.append(f"| {_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(results: dict) -> str:
    """Methods x (parameterisation, task): mean |residual| at theta = ref with the rewards set to 0."""
    cfg = results["meta"]["config"]
    rows = _rows(results)
    cols = [(p, t) for p in cfg["parameterisations"] for t in cfg["tasks"]]
    lines = ["| method | " + " | ".join(f"{p} · {t}" for p, t in cols) + " |", "|" + "---|" * (1 + len(cols))]
    for m in cfg["methods"]:
        cells = []
        for p, t in cols:
            vals = [rows[(p, t, m, b)]["calibration_residual_mean"] for b in cfg["behaviours"] if (p, t, m, b) in rows]
            cells.append("–" if not vals or any(v is None for v in vals) else f"{sum(vals) / len(vals):.3g}")
        lines.append(f"| {_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_table(results: dict) -> str:
    """Methods x beta: mean reward @ KL(pi || pi_ref), the exact optimum first."""
    fr = results["frontier"]
    betas = [e["beta"] for e in fr["exact"]]
    lines = ["| method | " + " | ".join(f"β={b:g}" for b in betas) + " |", "|" + "---|" * (1 + len(betas))]
    lines.append("| **exact π\\*** | " + " | ".join(f"{fmt(e['reward'], digits=2)} @ {fmt(e['kl_ref'], digits=2)}" for e in fr["exact"]) + " |")
    methods = list(dict.fromkeys(p["method"] for p in fr["points"]))
    for m in methods:
        cells = []
        for b in betas:
            p = next((q for q in fr["points"] if q["method"] == m and q["beta"] == b), None)
            cells.append("–" if p is None else f"{fmt(p['reward_mean'], digits=2)} @ {fmt(p['kl_ref_mean'], digits=2)}")
        lines.append(f"| {_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """The full report: set-up, headline, data efficiency, per-task details, calibration, frontier."""
    meta, cfg = results["meta"], results["meta"]["config"]
    mach = meta["machine"]
    out = [
        "# Synthetic benchmark: ShiQ against its ablations and DPO / DRO / CoPG",
        "",
        f"Scale `{cfg['scale']}`, seeds {list(cfg['seeds'])}, beta = {cfg['beta']}, budget {cfg['steps']} full-batch Adam steps "
        f"per run, main dataset size {cfg['main_size']} sequences. Wall time {meta['wall_time_s']:.0f} s "
        f"(CPU time {meta.get('cpu_time_s', float('nan')):.0f} s) on {mach['processor']} ({mach['platform']}), "
        f"{mach['threads']} thread, torch {mach['torch']}.",
        "",
        "Tasks: " + "; ".join(f"**{t}**: {d}" for t, d in meta["tasks"].items()) + ".",
        "",
        f"Protocol: {meta['protocol']}.",
        "",
        "**Normalised return** = (J_beta(pi) - J_beta(pi_ref)) / (J_beta(pi*) - J_beta(pi_ref)): 0 at the reference, "
        "1 at the exact optimum, negative when the policy is worse than the reference. KL = KL(pi || pi*) "
        "averaged over the tree's states. Spread: std over seeds.",
        "",
        "## Headline: normalised return at the main size (mean over tasks)",
        "",
        headline_table(results),
        "",
        "## Early stopping: best normalised return along the learning curve (mean over tasks)",
        "",
        "The same runs read at their best evaluation instead of their last (an oracle stopping time). It matters for "
        "DPO with pairs ordered by return, whose loss has no finite minimiser: it passes near pi_ref's improvement "
        "and then overshoots.",
        "",
        headline_table(results, key="peak_normalised_return"),
        "",
    ]
    if "tabular" in cfg["parameterisations"] and len(cfg["sizes"]) > 1:
        out += [
            f"## Data efficiency (tabular): sequences to reach {cfg['target']:.0%} of the optimal improvement",
            "",
            "Grid " + ", ".join(str(s) for s in cfg["sizes"]) + "; `(n; plateau p)`: never reached, n sequences reach "
            f"{cfg['target']:.0%} of the method's own plateau p.",
            "",
            efficiency_table(results),
            "",
        ]
    for p in cfg["parameterisations"]:
        for t in cfg["tasks"]:
            out += [f"## {p} · {t}: normalised return · KL(pi‖pi*) over states · selected lr", "", _detail_table(results, p, t), ""]
    out += [
        "## Calibration: mean |residual| at initialisation with the rewards set to 0",
        "",
        "0 means the loss is calibrated at theta = ref (docs/method.md step 3).",
        "",
        calibration_table(results),
        "",
    ]
    if results["frontier"]["points"]:
        fr = results["frontier"]
        out += [
            f"## Reward-KL frontier (tabular, {fr['task']} task, {fr['behaviour']} data, {fr['size']} sequences)",
            "",
            "Each cell: mean reward @ KL(pi‖pi_ref) of whole responses, mean over seeds.",
            "",
            frontier_table(results),
            "",
        ]
    return "\n".join(out)


def mean_curves(results: dict, param: str, task: str, behaviour: str, key: str = "normalised_return") -> dict[str, tuple[list[int], list[float | None]]]:
    """Learning curve of each method (selected lr, main size), averaged over seeds: ``{method: (steps, values)}``."""
    out: dict[str, tuple[list[int], list[float | None]]] = {}
    for m in results["meta"]["config"]["methods"]:
        curves = [r["curve"] for r in _selected_main(results) if (r["param"], r["task"], r["method"], r["behaviour"]) == (param, task, m, behaviour) and "curve" in r]
        if not curves:
            continue
        steps = curves[0]["step"]
        values: list[float | None] = []
        for i in range(len(steps)):
            col = [c[key][i] for c in curves]
            values.append(None if any(v is None for v in col) else sum(col) / len(col))
        out[m] = (steps, values)
    return out


def efficiency_curves(results: dict, param: str, task: str, behaviour: str) -> dict[str, tuple[list[int], list[float | None]]]:
    """Seed-averaged normalised return against dataset size: ``{method: (sizes, scores)}``."""
    rows = _rows(results)
    return {m: (rows[k]["efficiency_sizes"], rows[k]["efficiency_scores"])
            for m in results["meta"]["config"]["methods"]
            if (k := (param, task, m, behaviour)) in rows and "efficiency_sizes" in rows[k]}


def _kl_range(points: list[dict]) -> float:
    """KL(pi || pi_ref) at the smallest beta over KL at the largest beta."""
    if not points:
        return math.nan
    by_beta = sorted(points, key=lambda p: p["beta"])
    return by_beta[0]["kl_ref_mean"] / by_beta[-1]["kl_ref_mean"]


def _efficiency_cells(rows: dict, tasks, behaviours, methods):
    """``(task, behaviour, method, ShiQ's sequences to target, the method's)`` per tabular cell (inf: never reached)."""
    for t in tasks:
        for b in behaviours:
            shiq = rows[("tabular", t, "shiq", b)]
            for m in methods:
                other = rows[("tabular", t, m, b)]
                if "reached_target" not in shiq or "reached_target" not in other:
                    continue
                yield (t, b, m, shiq["sequences_to_target"] if shiq["reached_target"] else math.inf,
                       other["sequences_to_target"] if other["reached_target"] else math.inf)


def key_numbers(results: dict) -> dict[str, float]:
    """The numbers behind the benchmark's headline findings (the notebook asserts them).

    Needs every method and behaviour in the results; "off-policy" means uniform and mix data.
    """
    cfg = results["meta"]["config"]
    rows = _rows(results)
    tasks = cfg["tasks"]

    def val(param: str, task: str, method: str, behaviour: str, key: str = "normalised_return_mean") -> float:
        v = rows[(param, task, method, behaviour)][key]
        return -math.inf if v is None else v

    off = ("uniform", "mix")
    shifted = ("shiq", "shiq_nstep", "shiq_1step")
    calib = lambda ms: [rows[(p, t, m, b)]["calibration_residual_mean"] for p in cfg["parameterisations"] for t in tasks for m in ms for b in cfg["behaviours"]]  # noqa: E731
    fr = results["frontier"]
    front = lambda m: [p for p in fr["points"] if p["method"] == m]  # noqa: E731
    eff = [rows[("tabular", t, "shiq", b)] for t in tasks for b in off]
    numbers = {
        "calibration_residual_shiq": max(calib(shifted)),
        "calibration_residual_sequence": max(calib(_SEQUENCE_LEVEL)),
        "calibration_residual_unshifted_min": min(calib(("naive", "scoring"))),
        "shiq_tabular_offpolicy_min": min(val("tabular", t, "shiq", b) for t in tasks for b in off),
        "shiq_tabular_offpolicy_kl_max": max(val("tabular", t, "shiq", b, "kl_states_mean") for t in tasks for b in off),
        # data efficiency sweep: does ShiQ reach the target from off-policy data on every task, and with how much
        "shiq_tabular_offpolicy_reached": float(all(r.get("reached_target", False) for r in eff)),
        "shiq_tabular_offpolicy_sequences_max": float(max(r.get("sequences_to_target", math.inf) for r in eff)),
        "unshifted_tabular_max": max(val("tabular", t, m, b) for t in tasks for m in ("naive", "scoring") for b in cfg["behaviours"]),
        "dpo_minus_shiq_tabular_uniform_max": max(val("tabular", t, "dpo", "uniform") - val("tabular", t, "shiq", "uniform") for t in tasks),
        "dpo_peak_tabular_uniform_mean": sum(val("tabular", t, "dpo", "uniform", "peak_normalised_return_mean") for t in tasks) / len(tasks),
        "dpo_peak_minus_final_tabular_uniform_min": min(val("tabular", t, "dpo", "uniform", "peak_normalised_return_mean") - val("tabular", t, "dpo", "uniform") for t in tasks),
        "dpo_bt_copg_gap_tabular_offpolicy_max": max(abs(val("tabular", t, "dpo_bt", b) - val("tabular", t, "copg", b)) for t in tasks for b in off),
        "skewed_tabular_best": max(val("tabular", t, m, "skewed") for t in tasks for m in cfg["methods"]),
        # among the methods that reach pi* with full coverage: what the skewed data's coverage costs
        "skewed_minus_uniform_tabular_max": max(val("tabular", t, m, "skewed") - val("tabular", t, m, "uniform")
                                                for t in tasks for m in (*shifted, "dro", "copg", "dpo_bt")),
        "shiq_frontier_min": min((p["normalised_return_mean"] for p in front("shiq")), default=math.nan),
        "shiq_frontier_gap_max": max((p["reward_gap_mean"] for p in front("shiq")), default=math.nan),
        "dpo_frontier_gap_mean": sum(p["reward_gap_mean"] for p in front("dpo")) / max(1, len(front("dpo"))),
        # how much KL(pi || pi_ref) changes from the smallest to the largest beta: pi* moves a lot, DPO little
        "exact_frontier_kl_range": fr["exact"][0]["kl_ref"] / fr["exact"][-1]["kl_ref"],
        "dpo_frontier_kl_range": _kl_range(front("dpo")),
        "shiq_frontier_kl_range": _kl_range(front("shiq")),
    }
    # data efficiency, ShiQ against each sequence-level method, (task, behaviour) cell by cell
    worse = better = 0
    for _, _, _, n_shiq, n_other in _efficiency_cells(rows, tasks, cfg["behaviours"], _SEQUENCE_LEVEL):
        worse += n_other < n_shiq
        better += n_shiq < n_other
    numbers["shiq_efficiency_pairs_worse"] = float(worse)
    numbers["shiq_efficiency_pairs_better"] = float(better)
    if "neural" in cfg["parameterisations"]:
        sequence_level = _SEQUENCE_LEVEL
        mean_over_tasks = lambda m, b: sum(val("neural", t, m, b) for t in tasks) / len(tasks)  # noqa: E731
        numbers["shiq_minus_best_sequence_neural_min"] = min(
            mean_over_tasks("shiq", b) - max(mean_over_tasks(m, b) for m in sequence_level) for b in cfg["behaviours"])
        numbers["shiq_neural_offpolicy_mean"] = sum(val("neural", t, "shiq", b) for t in tasks for b in off) / (2 * len(tasks))
        numbers["unshifted_neural_max"] = max(val("neural", t, m, b) for t in tasks for m in ("naive", "scoring") for b in cfg["behaviours"])
    return numbers


# ---------------------------------------------------------------------------------------------
# README blocks (shiq_lab.infra.readme): rendered from the committed benchmarks/results/synthetic.json
# ---------------------------------------------------------------------------------------------

_REACH_PI_STAR = ("dpo_bt", "dro", "copg")  # the sequence-level baselines that can reach pi*


def _committed(root) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(root) / "benchmarks" / "results" / "synthetic.json").read_text())


def _span(values: list[float], digits: int = 2) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}–{hi}"


def readme_run(root) -> str:
    """The sentence on the full run's cost and machine."""
    meta = _committed(root)["meta"]
    wall, cpu = meta["wall_time_s"], meta["cpu_time_s"]
    torch_version = meta["machine"]["torch"].split("+")[0]
    return (f"The full run took **{wall:.0f} s wall ({wall / 60:.1f} min) and {cpu:.0f} s of CPU ({cpu / 60:.1f} min) "
            f"on {meta['machine']['threads']} thread{'s' if meta['machine']['threads'] != 1 else ''}** "
            f"(torch {torch_version} CPU, Python {meta['machine']['python'].rsplit('.', 1)[0]}).")


def readme_headline(root) -> str:
    """The headline table: normalised return at the main size, averaged over the tasks."""
    return headline_table(_committed(root))


def readme_efficiency(root) -> str:
    """Sequences to the target (tabular), off-policy behaviours."""
    return efficiency_table(_committed(root), behaviours=("uniform", "mix"))


def readme_findings(root) -> str:
    """The bullet list of findings, every number computed from the results."""
    results = _committed(root)
    cfg = results["meta"]["config"]
    rows = _rows(results)
    tasks, params, behaviours = cfg["tasks"], cfg["parameterisations"], cfg["behaviours"]
    k = key_numbers(results)
    def head(p: str, m: str, b: str) -> float:  # task-averaged final normalised return; -inf if a run diverged
        mean = _over_tasks(results, p, m, b, "normalised_return")[0]
        return -math.inf if mean is None else mean

    calib = [rows[(p, t, m, b)]["calibration_residual_mean"] for p in params for t in tasks for m in ("naive", "scoring")
             for b in behaviours]
    off = ("uniform", "mix")
    eff = [rows[("tabular", t, "shiq", b)]["sequences_to_target"] for t in tasks for b in off]
    unshifted = [head(p, m, b) for p in params for m in ("naive", "scoring") for b in behaviours]
    # data efficiency, cell by cell against the baselines that reach pi*; the first cell where ShiQ needs fewer
    fewer, example = 0, ""
    for t, b, _, n_shiq, n_other in _efficiency_cells(rows, tasks, behaviours, _REACH_PI_STAR):
        if n_shiq < n_other:
            fewer += 1
            example = example or f"{t}·{b}: {n_shiq} against {n_other if n_other < math.inf else 'never'}"
    target = f"{cfg['target'] * 100:.0f} %"
    betas = cfg["frontier_betas"]
    neural_uniform = [head("neural", m, "uniform") for m in _REACH_PI_STAR]
    dpo_final = sum(rows[("tabular", t, "dpo", "uniform")]["normalised_return_mean"] for t in tasks) / len(tasks)
    skewed_best = max(head("tabular", m, "skewed") for m in cfg["methods"])
    lead = k["shiq_minus_best_sequence_neural_min"]
    residual = k["calibration_residual_shiq"]
    calib_shifted = "exactly 0" if residual == 0 else f"at most {residual:.2g}"
    bullets = [
        f"**Calibration.** With the rewards set to 0 at θ = ref, the shifted losses have a residual of "
        f"{calib_shifted}. "
        f"The unshifted scoring and naive losses start at {_span(calib, 0)} (reward units): the reference logits' "
        "per-state offsets.",
        f"**ShiQ reaches π\\* from off-policy data.** From uniform or mixed data it reaches {target} of the optimal "
        f"improvement on {'every' if k['shiq_tabular_offpolicy_reached'] else 'not every'} task with "
        f"{min(eff)}–{max(eff)} sequences. This includes the multi-turn task, where the value bridges across "
        f"environment tokens. On the frontier (β from {betas[0]:g} to {betas[-1]:g}) its points sit on the exact curve "
        f"(reward gap ≤ {k['shiq_frontier_gap_max']:.3f} at equal KL), and its KL moves ×{k['shiq_frontier_kl_range']:.0f} "
        f"over the sweep, as π\\*'s does (×{k['exact_frontier_kl_range']:.0f}).",
        f"**The unshifted ablations end worse than π_ref** (normalised return {max(unshifted):.0f} to "
        f"{min(unshifted):.0f}). Their fixed point pins absolute logits, so a token the data never shows keeps the "
        "reference's huge offset and takes the probability mass. With every (state, token) seen, L-BFGS does take "
        "them to π\\*, but Adam needs thousands of steps to undo the offsets.",
        "**DRO and CoPG match ShiQ on tabular policies, and this was to be expected.** On a token tree their zero-loss "
        "sets equal ShiQ's: ShiQ's per-prefix conditions follow from DRO's on the observed responses, because a "
        "state's value is a free offset of its logits. "
        + ("ShiQ never needed more sequences than any baseline. " if k["shiq_efficiency_pairs_worse"] == 0 else
           f"ShiQ needed more sequences than a baseline in {k['shiq_efficiency_pairs_worse']:.0f} cells. ")
        + f"Against DRO, CoPG or soft-label DPO it needed fewer in {fewer} (task, behaviour, baseline) "
          f"triple{'s' if fewer != 1 else ''}" + (f", for example {example}." if example else ".")
        + f" Counting DPO with ordered pairs too, it needed fewer in {k['shiq_efficiency_pairs_better']:.0f}.",
        f"**With the neural policy ShiQ is {'level with or ahead of' if lead >= -0.005 else 'behind'} every "
        f"sequence-level method** in each column (smallest lead over the best of them: {lead:+.3f}). From uniform data: "
        f"{head('neural', 'shiq', 'uniform'):.2f} against {_span(neural_uniform)} for soft-label DPO, DRO and CoPG.",
        f"**DPO with pairs ordered by return cannot reach π\\*.** Deterministic labels leave it no finite minimiser: "
        f"the best point along its learning curve is {k['dpo_peak_tabular_uniform_mean']:.2f} (tabular, uniform data), "
        f"and it ends at {dpo_final:.2f}. Its KL barely responds to β: ×{k['dpo_frontier_kl_range']:.1f} over the sweep, "
        f"where π\\* moves ×{k['exact_frontier_kl_range']:.0f}. With Bradley–Terry soft labels σ(R − R′) it matches CoPG "
        f"to within {k['dpo_bt_copg_gap_tabular_offpolicy_max']:.3f}, and that is the condition under which DPO's fixed "
        "point is π\\*.",
        f"**Skewed data limits every method** to {skewed_best:.2f} at best (tabular, averaged over the tasks). The data "
        "hides actions, and no offline loss can value an action it never sees.",
    ]
    return "\n".join(f"- {b}" for b in bullets)
