"""The synthetic benchmark: ShiQ against its ablations and DPO / DRO / CoPG on token trees.

Every method of :data:`~shiq_lab.tasks.synthetic.harness.METHODS` is trained on the same offline data
(:mod:`shiq_lab.tasks.synthetic.problems`), with the same optimiser (full-batch Adam from the reference) and the
same number of steps, for each task, behaviour policy and seed, with two policy parameterisations:
``tabular`` (one logit vector per state) and ``neural`` (a tiny transformer over the path tokens,
:mod:`shiq_lab.tasks.synthetic.neural_policy`). Everything is measured against the exact optimum.

Protocol (also written into the results):

1. Learning-rate sweep at the main dataset size (``main_size``); for each
   (parameterisation, task, method, behaviour) the learning rate with the best final normalised
   return, averaged over seeds, is kept. This oracle selection gives every method its best shot.
2. Data efficiency (``sizes``): the same runs on nested smaller and larger datasets at the kept
   learning rate; :func:`~shiq_lab.tasks.synthetic.metrics.sequences_to_target` reads off how many sequences reach 99 %
   of the optimal improvement (or of the method's own plateau).
3. Reward-KL frontier: one task and behaviour, a sweep of beta, each method at its best learning
   rate for each beta, next to the exact optimum's frontier.

:func:`run_suite` returns the results as a plain dict (written as JSON by :func:`write_results`);
:mod:`shiq_lab.tasks.synthetic.report` renders the markdown tables.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from shiq_lab.exact.tree import OfflineDataset, TokenTree, expected_reward, sequence_kl, solve
from shiq_lab.infra.runtime import cpu_threads
from shiq_lab.tasks.synthetic.forest import stack_datasets, stack_trees
from shiq_lab.tasks.synthetic.harness import METHODS, TablePolicy, TabularPolicy, calibration_residual, train_forest
from shiq_lab.tasks.synthetic.metrics import exact_frontier, reward_gap, sequences_to_target
from shiq_lab.tasks.synthetic.neural_policy import NeuralPolicy
from shiq_lab.tasks.synthetic.problems import (
    BEHAVIOURS,
    TASKS,
    behaviour_dataset,
    dataset_fingerprint,
    make_task_tree,
    task_specs,
)

__all__ = ["PARAMETERISATIONS", "SuiteConfig", "run_suite", "write_results", "summary_rows", "with_overrides"]

PARAMETERISATIONS = ("tabular", "neural")
_CURVE_KEYS = ("normalised_return", "kl_seq", "kl_states", "residual")
_FINAL_KEYS = ("kl_states", "kl_seq", "kl_ref", "reward", "return", "optimal_return", "reference_return", "normalised_return", "residual")


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that defines a run of the suite (stored in the results' ``meta.config``).

    ``steps`` is the training budget of every run (full-batch Adam steps); ``main_size`` the
    dataset size of the learning-rate sweep, the tables and the frontier; ``sizes`` the nested
    dataset sizes of the data-efficiency sweep (tabular; it contains ``main_size``);
    ``neural_sizes`` the sizes also run with the neural policy (by default only the main size).
    """

    scale: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    beta: float = 0.5
    steps: int = 200
    eval_every: int = 20
    main_size: int = 512
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    neural_sizes: tuple[int, ...] = (512,)
    tabular_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    neural_lrs: tuple[float, ...] = (0.001, 0.003, 0.01)
    nstep: int = 2
    target: float = 0.99
    tasks: tuple[str, ...] = TASKS
    behaviours: tuple[str, ...] = BEHAVIOURS
    methods: tuple[str, ...] = tuple(METHODS)
    parameterisations: tuple[str, ...] = PARAMETERISATIONS
    frontier_task: str = "token"
    frontier_behaviour: str = "uniform"
    frontier_betas: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)
    neural_width: int = 16
    neural_layers: int = 2

    @classmethod
    def quick(cls) -> SuiteConfig:
        """Small trees, one seed, one learning rate, short budget: the whole suite in under a minute on one core."""
        return cls(scale="quick", seeds=(0,), steps=60, eval_every=10, main_size=512, sizes=(32, 128, 512), neural_sizes=(512,),
                   tabular_lrs=(0.3,), neural_lrs=(0.01,), frontier_betas=(0.25, 1.0, 4.0))

    def validate(self) -> None:
        """Clear errors for bad settings (the CLI passes user input through here)."""
        bad = {
            "tasks": set(self.tasks) - set(TASKS), "behaviours": set(self.behaviours) - set(BEHAVIOURS),
            "methods": set(self.methods) - set(METHODS), "parameterisations": set(self.parameterisations) - set(PARAMETERISATIONS),
        }
        for name, unknown in bad.items():
            if unknown:
                raise ValueError(f"{name}: unknown {sorted(unknown)}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: the budget must be at least 1 optimiser step")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 2:
            raise ValueError(f"sizes={self.sizes}: need strictly increasing dataset sizes >= 2")
        if self.main_size not in self.sizes:
            raise ValueError(f"main_size={self.main_size} must be one of sizes={self.sizes}")
        if not set(self.neural_sizes) <= set(self.sizes) or self.main_size not in self.neural_sizes:
            raise ValueError(f"neural_sizes={self.neural_sizes}: must be among sizes={self.sizes} and include main_size={self.main_size}")
        if self.frontier_task not in self.tasks or self.frontier_behaviour not in self.behaviours:
            raise ValueError(f"frontier_task={self.frontier_task!r} / frontier_behaviour={self.frontier_behaviour!r} must be among tasks / behaviours")

    @property
    def largest_size(self) -> int:
        """Size of the datasets drawn per (task, seed, behaviour); every smaller one is a prefix."""
        return max(self.sizes)

    def lrs(self, param: str) -> tuple[float, ...]:
        return self.tabular_lrs if param == "tabular" else self.neural_lrs


def _finite(x: float) -> float | None:
    """JSON has no NaN: a diverged run's metric is written as null."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


@dataclass
class _Copy:
    seed: int
    behaviour: str
    lr: float
    size: int


@dataclass
class _TaskData:
    trees: dict[int, TokenTree]
    pools: dict[tuple[int, str], OfflineDataset] = field(default_factory=dict)


def _make_policy(param: str, forest, seeds: list[int], cfg: SuiteConfig) -> TablePolicy:
    if param == "tabular":
        return TabularPolicy(forest)
    return NeuralPolicy(forest, seeds, d_model=cfg.neural_width, n_layers=cfg.neural_layers)


def _train_copies(
    param: str, task: str, method: str, copies: list[_Copy], data: _TaskData, cfg: SuiteConfig, *, beta: float
) -> list[dict]:
    """Train one forest (one copy per entry of ``copies``) and return one record per copy."""
    forest = stack_trees([data.trees[c.seed] for c in copies])
    merged, copy_of_row = stack_datasets(forest, [data.pools[(c.seed, c.behaviour)].subset(slice(0, c.size)) for c in copies])
    # one initial network per (seed, behaviour): every method, learning rate and size starts from it
    policy = _make_policy(param, forest, [1000 * c.seed + BEHAVIOURS.index(c.behaviour) for c in copies], cfg)
    calib = calibration_residual(method, policy, forest, merged, copy_of_row, beta=beta, nstep=cfg.nstep)
    lr = torch.tensor([c.lr for c in copies], dtype=torch.float64)
    result = train_forest(policy, method, forest, merged, copy_of_row, beta=beta, lr=lr, steps=cfg.steps,
                          eval_every=cfg.eval_every, nstep=cfg.nstep)
    records = []
    for k, c in enumerate(copies):
        records.append({
            "param": param, "task": task, "method": method, "behaviour": c.behaviour, "seed": c.seed,
            "lr": c.lr, "size": c.size, "beta": beta,
            "final": {**{key: _finite(float(result.final(key)[k])) for key in _FINAL_KEYS},
                      # best point of the learning curve: what early stopping on the true metric would give
                      "peak_normalised_return": _finite(float(result.curves["normalised_return"][:, k].nan_to_num(nan=-math.inf).max()))},
            "calibration_residual": _finite(float(calib[k])),
            "curve": {"step": result.steps, **{key: [_finite(float(v)) for v in result.curves[key][:, k]] for key in _CURVE_KEYS}},
        })
    return records


def _score(record: dict) -> float:
    value = record["final"]["normalised_return"]
    return -math.inf if value is None else value


def _select_lr(records: list[dict], lrs: tuple[float, ...]) -> float:
    """The learning rate with the best seed-averaged final normalised return (ties: the smaller lr)."""
    def mean_score(lr: float) -> float:
        scores = [_score(r) for r in records if r["lr"] == lr]
        return sum(scores) / len(scores) if scores else -math.inf
    return max(lrs, key=lambda lr: (mean_score(lr), -lr))


def _run_method(param: str, task: str, method: str, data: _TaskData, cfg: SuiteConfig, selected: dict) -> list[dict]:
    """Learning-rate sweep at the main size, then the other dataset sizes at the kept learning rate.

    With a single learning rate there is nothing to select, and both passes share one forest.
    """
    lrs = cfg.lrs(param)
    sizes = cfg.sizes if param == "tabular" else cfg.neural_sizes
    cells = [(s, b) for s in cfg.seeds for b in cfg.behaviours]
    first_sizes = sizes if len(lrs) == 1 else (cfg.main_size,)
    recs = _train_copies(param, task, method, [_Copy(s, b, lr, n) for s, b in cells for lr in lrs for n in first_sizes], data, cfg, beta=cfg.beta)
    main = [r for r in recs if r["size"] == cfg.main_size]
    chosen = {b: _select_lr([r for r in main if r["behaviour"] == b], lrs) for b in cfg.behaviours}
    selected.setdefault(param, {}).setdefault(task, {})[method] = chosen
    others = [n for n in sizes if n not in first_sizes]
    if others:
        recs += _train_copies(param, task, method, [_Copy(s, b, chosen[b], n) for s, b in cells for n in others], data, cfg, beta=cfg.beta)
    for r in recs:  # learning curves are kept for the selected runs at the main size only (a small JSON)
        if r["size"] != cfg.main_size or r["lr"] != chosen[r["behaviour"]]:
            r.pop("curve")
    return recs


def _task_data(task: str, cfg: SuiteConfig) -> _TaskData:
    spec = task_specs(cfg.scale)[task]
    data = _TaskData(trees={s: make_task_tree(spec, s) for s in cfg.seeds})
    for s in cfg.seeds:
        for b in cfg.behaviours:
            data.pools[(s, b)] = behaviour_dataset(data.trees[s], b, cfg.largest_size, seed=s)
    return data


def run_suite(cfg: SuiteConfig, *, log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark; returns ``{"meta", "selected_lr", "runs", "summary", "frontier"}``.

    It runs on one thread (the results state "1 core"; tiny tensors gain nothing from threads) and
    gives the caller's thread count back afterwards.
    """
    cfg.validate()
    with cpu_threads(1):
        return _run_suite(cfg, log)


def _run_suite(cfg: SuiteConfig, log: Callable[[str], None]) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    runs: list[dict] = []
    selected: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    fingerprints: dict[str, dict[str, str]] = {}
    task_cache: dict[str, _TaskData] = {}
    timings: dict[str, float] = {}
    for task in cfg.tasks:
        data = task_cache[task] = _task_data(task, cfg)
        fingerprints[task] = {f"seed{s}/{b}": dataset_fingerprint(data.pools[(s, b)]) for s in cfg.seeds for b in cfg.behaviours}
        for param in cfg.parameterisations:
            t_param = time.perf_counter()
            for method in cfg.methods:
                runs += _run_method(param, task, method, data, cfg, selected)
            timings[f"{param}/{task}"] = round(time.perf_counter() - t_param, 1)
            log(f"[synthetic] {param:7s} {task:9s} done in {timings[f'{param}/{task}']:.0f} s")
    t_front = time.perf_counter()
    frontier = _run_frontier(cfg, task_cache[cfg.frontier_task])
    timings["frontier"] = round(time.perf_counter() - t_front, 1)
    log(f"[synthetic] frontier done in {timings['frontier']:.0f} s")
    wall = time.perf_counter() - t0
    results = {
        "meta": {
            "suite": "synthetic", "config": asdict(cfg), "wall_time_s": round(wall, 1),
            "cpu_time_s": round(time.process_time() - cpu0, 1), "timings_s": timings,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "tasks": {t: task_specs(cfg.scale)[t].describe() for t in cfg.tasks},
            "methods": {m: METHODS[m] for m in cfg.methods},
            "dataset_fingerprints": fingerprints,
            "protocol": (
                "full-batch Adam from pi_ref, the same step budget for every method; learning rate chosen per "
                "(parameterisation, task, method, behaviour) by the best seed-averaged final normalised return at "
                "the main size (oracle selection); data efficiency on nested smaller and larger datasets at that learning rate; "
                "frontier: a learning-rate sweep for each (method, beta)"
            ),
        },
        "selected_lr": selected,
        "runs": runs,
        "frontier": frontier,
    }
    results["summary"] = summary_rows(results)
    return results


def _run_frontier(cfg: SuiteConfig, data: _TaskData) -> dict:
    """Mean reward and KL(pi || pi_ref) over a sweep of beta, tabular, next to the exact optimum.

    Each (method, beta) gets its own learning-rate sweep (the best seed-averaged normalised return
    wins): the learning rate that suits beta = 0.5 need not suit beta = 0.1. ``reward_gap`` is how
    far below the exact frontier the point lies at its own KL (per seed, then averaged).
    """
    task, behaviour = cfg.frontier_task, cfg.frontier_behaviour
    exact = [_exact_point(data, cfg.seeds, beta) for beta in cfg.frontier_betas]
    dense_betas = [10 ** (-2 + 3 * i / 60) for i in range(61)]  # beta 0.01 .. 10
    dense = [_exact_point(data, cfg.seeds, beta) for beta in dense_betas[::2]]
    frontiers = {s: exact_frontier(data.trees[s], dense_betas) for s in cfg.seeds}
    points = []
    if "tabular" in cfg.parameterisations:
        lrs = cfg.tabular_lrs
        for method in cfg.methods:
            for beta in cfg.frontier_betas:
                copies = [_Copy(s, behaviour, lr, cfg.main_size) for lr in lrs for s in cfg.seeds]
                recs = _train_copies("tabular", task, method, copies, data, cfg, beta=beta)
                lr = _select_lr(recs, lrs)
                best = [r for r in recs if r["lr"] == lr]
                for r in best:
                    fin = r["final"]
                    fin["reward_gap"] = _finite(reward_gap(*frontiers[r["seed"]], fin["kl_ref"] if fin["kl_ref"] is not None else math.nan,
                                                           fin["reward"] if fin["reward"] is not None else math.nan))
                points.append({"method": method, "beta": beta, "lr": lr,
                               **_mean_std(best, ("reward", "kl_ref", "normalised_return", "kl_seq", "reward_gap"))})
    return {"task": task, "behaviour": behaviour, "size": cfg.main_size, "exact": exact, "exact_curve": dense, "points": points}


def _exact_point(data: _TaskData, seeds: tuple[int, ...], beta: float) -> dict[str, float | None]:
    """Mean reward and KL(pi* || pi_ref) of the exact optimum at ``beta``, averaged over seeds."""
    rewards, kls = [], []
    for s in seeds:
        tree = data.trees[s]
        sol = solve(tree, beta)
        rewards.append(expected_reward(tree, sol.log_pi))
        kls.append(sequence_kl(tree, sol.log_pi, tree.ref_log_probs))
    return {"beta": _finite(beta), "reward": _finite(sum(rewards) / len(rewards)), "kl_ref": _finite(sum(kls) / len(kls))}


def _mean_std(records: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in keys:
        vals = [r["final"][key] for r in records]
        if any(v is None for v in vals):
            out[f"{key}_mean"] = out[f"{key}_std"] = None
            continue
        t = torch.tensor(vals, dtype=torch.float64)
        out[f"{key}_mean"] = _finite(float(t.mean()))
        out[f"{key}_std"] = _finite(float(t.std(unbiased=False)))
    return out


def summary_rows(results: dict) -> list[dict]:
    """One row per (parameterisation, task, method, behaviour) at the selected learning rate.

    Holds mean and spread (population std over seeds) of every final metric at the main size, the
    initial calibration residual, and the data efficiency (sequences to the target, on the
    seed-averaged normalised return of each dataset size).
    """
    cfg = results["meta"]["config"]
    main = cfg["main_size"]
    groups: dict[tuple[str, str, str, str], list[dict]] = {}
    for r in results["runs"]:
        lr = results["selected_lr"][r["param"]][r["task"]][r["method"]][r["behaviour"]]
        if r["lr"] == lr:
            groups.setdefault((r["param"], r["task"], r["method"], r["behaviour"]), []).append(r)
    rows = []
    for (param, task, method, behaviour), recs in groups.items():
        at_main = [r for r in recs if r["size"] == main]
        calib = [r["calibration_residual"] for r in at_main]
        row = {"param": param, "task": task, "method": method, "behaviour": behaviour,
               "lr": at_main[0]["lr"], "size": main, "seeds": len(at_main),
               **_mean_std(at_main, (*_FINAL_KEYS, "peak_normalised_return")),
               "calibration_residual_mean": None if any(c is None for c in calib) else _finite(sum(calib) / len(calib))}
        sizes = sorted({r["size"] for r in recs})
        if len(sizes) > 1:
            curve = []
            for n in sizes:
                vals = [_score(r) for r in recs if r["size"] == n]
                curve.append(sum(vals) / len(vals))
            n_target, reached = sequences_to_target(sizes, curve, cfg["target"])
            row.update({"efficiency_sizes": sizes, "efficiency_scores": [_finite(v) if math.isfinite(v) else None for v in curve],
                        "sequences_to_target": n_target, "reached_target": reached})
        rows.append(row)
    return rows


def write_results(results: dict, out_dir: str | Path, *, name: str = "synthetic") -> tuple[Path, Path]:
    """Write ``<name>.json`` (everything) and ``<name>.md`` (the tables) into ``out_dir``."""
    from shiq_lab.tasks.synthetic.report import render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def with_overrides(cfg: SuiteConfig, *, seeds: list[int] | None = None, budget: int | None = None) -> SuiteConfig:
    """The CLI's ``--seeds`` and ``--budget`` (steps per run) applied to a preset."""
    if seeds is not None:
        cfg = replace(cfg, seeds=tuple(seeds))
    if budget is not None:
        cfg = replace(cfg, steps=budget, eval_every=max(1, min(cfg.eval_every, budget // 4 or 1)))
    cfg.validate()
    return cfg
