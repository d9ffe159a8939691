"""BFCL-V3 offline sweep: ShiQ (per-turn rewards), ShiQ (final score only), DRO, CoPG and DPO on the same data.

1. **Subset**: the ``n_entries`` entries of ``category`` whose rendered ground-truth conversation is shortest
   (under the model's tokenizer and the docs profile), split by entry id: every ``holdout_every``-th id
   (in id order) is held out for evaluation, the rest is training data.
2. **Offline data** (:mod:`.dataset`): per training entry its ground truth, one corruption of each kind
   (drop / swap / perturb one call; later turns run on the corrupted state) and ``samples_per_entry``
   trajectories played by the reference, all executed and scored turn by turn.
3. **Training**: :func:`shiq_lab.train.sweep.train_run` (the tasks' shared sweep runner) for each
   variant, from the reference, with the same :class:`ShiQConfig` (``beta``, ``max_steps``...).
4. **Evaluation** on the held-out entries: the policy writes each assistant turn, its calls are executed and
   the results fed back (:func:`.rollout.rollouts`,
   ``rollout_batch_size`` trajectories per generation); per-turn accuracy, the official score and
   ``sum_t KL(pi||pi_ref)`` on the same samples, for the reference and each variant.

::

    python -m shiq_lab.tasks.bfcl.sweep --config configs/sweep/bfcl_cpu.yaml [--field value ...] [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from shiq_lab.infra.config import report_errors
from shiq_lab.infra.models import load_model
from shiq_lab.infra.runtime import cpu_threads as use_cpu_threads
from shiq_lab.tasks.bfcl.checker import check_episode
from shiq_lab.tasks.bfcl.dataset import offline_rows
from shiq_lab.tasks.bfcl.episodes import Episode, load_episodes
from shiq_lab.tasks.bfcl.prompts import PromptConfig, conversation
from shiq_lab.tasks.bfcl.rollout import Trajectory, rollouts, trajectory_kl
from shiq_lab.train.config import ShiQConfig

__all__ = ["TRAINING_DEFAULTS", "VARIANTS", "BfclEval", "BfclSweepConfig", "evaluate_bfcl", "main", "run_sweep", "select_subset"]

# name -> (loss type, reward mode of the data)
VARIANTS: dict[str, tuple[str, str]] = {
    "shiq_turn": ("shiq", "turn"),
    "shiq_final": ("shiq", "final"),
    "dro": ("dro", "turn"),
    "copg": ("copg", "turn"),
    "dpo": ("dpo", "turn"),
}


@dataclass
class BfclSweepConfig:
    """The task's own settings of a BFCL sweep; training settings are a :class:`ShiQConfig` beside it
    (:data:`TRAINING_DEFAULTS` under the file; ``beta``, ``max_steps``, ``per_device_train_batch_size``... are
    its fields). Defaults: the CPU run of ``configs/sweep/bfcl_cpu.yaml``."""

    model: str = "smollm2-135m"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    # subset and prompts
    category: str = "base"
    n_entries: int = 20
    holdout_every: int = 4
    docs: str = "signatures"
    max_result_chars: int = 200
    # data
    corruptions_per_kind: int = 1
    samples_per_entry: int = 1
    sample_temperature: float = 1.0
    max_new_tokens: int = 40
    # trajectories generated together at every assistant step (:func:`.rollout.rollouts`); only speed depends on it
    rollout_batch_size: int = 4
    samples_per_prompt: int = 5  # rows per entry: pairwise losses take whole entries (batch // this per step)
    # evaluation
    eval_samples_per_entry: int = 1
    eval_temperature: float = 1.0
    eval_seed: int = 1234
    eval_every: int = 0  # 0: only after the last step
    # where and how
    results: str | None = None  # write the committed results (JSON + markdown) here, e.g. benchmarks/results/bfcl_cpu
    device: str = "cpu"
    cpu_threads: int | None = 1
    dtype: str = "float32"
    save_models: bool = False

    def __post_init__(self) -> None:
        self.variants = list(self.variants)
        if self.rollout_batch_size < 1:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size}: must be >= 1 (1 plays one trajectory at a time)")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"variants={bad}: choose among {', '.join(VARIANTS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(docs=self.docs, max_result_chars=self.max_result_chars)


#: the training settings of a BFCL sweep, under the YAML file and the flags
TRAINING_DEFAULTS: dict[str, Any] = {
    "beta": 0.1, "max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 1e-4,
    "lr_scheduler_type": "constant", "reward_normalization": "zscore", "max_length": 1024,
    "output_dir": "runs/bfcl_cpu", "logging_steps": 1, "save_strategy": "no", "report_to": "none",
    "disable_tqdm": True,
}


@dataclass
class BfclEval:
    """Held-out evaluation of one policy (duck-types the ``PolicyEval`` fields that ``train_run`` logs)."""

    turn_accuracy: float
    score: float
    kl_states_mean: float
    kl_states_sem: float
    n_trajectories: int
    n_turns: int
    tokens_mean: float
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reward_mean(self) -> float:
        return self.turn_accuracy

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "examples"}


def episode_tokens(tokenizer: Any, episode: Episode, config: PromptConfig) -> int:
    """Tokens of the episode's ground-truth conversation through the chat template (the budget of a row)."""
    result = check_episode(episode, episode.ground_truth)
    messages = conversation(episode, episode.ground_truth, [t.results for t in result.turns], None, config)
    return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"])


def select_subset(config: BfclSweepConfig, tokenizer: Any) -> tuple[list[Episode], list[Episode], dict[str, int]]:
    """(train, held-out, tokens per entry) of the ``n_entries`` shortest entries, split by entry id."""
    episodes = load_episodes(config.category)
    tokens = {e.id: episode_tokens(tokenizer, e, config.prompt) for e in episodes}
    chosen = sorted(episodes, key=lambda e: (tokens[e.id], e.id))[: config.n_entries]
    chosen.sort(key=lambda e: int(e.id.rsplit("_", 1)[1]))
    held = [e for i, e in enumerate(chosen) if i % config.holdout_every == config.holdout_every - 1]
    train = [e for e in chosen if e not in held]
    return train, held, {e.id: tokens[e.id] for e in chosen}


def evaluate_bfcl(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, episodes: Sequence[Episode],
                  config: BfclSweepConfig) -> BfclEval:
    """Play every held-out entry ``eval_samples_per_entry`` times; accuracy, score and KL on the same samples."""
    jobs = [(e, config.eval_seed + 1000 * i + s) for i, e in enumerate(episodes)
            for s in range(config.eval_samples_per_entry)]
    played = rollouts(policy, tokenizer, [e for e, _ in jobs], [seed for _, seed in jobs], config=config.prompt,
                      max_new_tokens=config.max_new_tokens, temperature=config.eval_temperature,
                      batch_size=config.rollout_batch_size)
    turns, scores, kls, lengths, examples = [], [], [], [], []
    for j, t in enumerate(played):
        turns += t.rewards
        scores.append(t.score)
        kls.append(trajectory_kl(policy, reference, t.input_ids, t.action_mask))
        lengths.append(len(t.input_ids))
        if j % config.eval_samples_per_entry == 0:  # the first sample of each entry
            examples.append({"episode_id": t.episode_id, "texts": t.texts, "rewards": t.rewards})
    k = np.array(kls)
    return BfclEval(turn_accuracy=float(np.mean(turns)), score=float(np.mean(scores)), kl_states_mean=float(k.mean()),
                    kl_states_sem=float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else 0.0,
                    n_trajectories=len(scores), n_turns=len(turns), tokens_mean=float(np.mean(lengths)),
                    examples=examples)


def _sample_data(reference: torch.nn.Module, tokenizer: Any, episodes: Sequence[Episode],
                 config: BfclSweepConfig, seed: int) -> list[Trajectory]:
    jobs = [(e, seed + 1000 * i + s) for i, e in enumerate(episodes) for s in range(config.samples_per_entry)]
    return rollouts(reference, tokenizer, [e for e, _ in jobs], [s for _, s in jobs], config=config.prompt,
                    max_new_tokens=config.max_new_tokens, temperature=config.sample_temperature,
                    batch_size=config.rollout_batch_size)


def run_sweep(config: BfclSweepConfig | None = None, training: ShiQConfig | None = None, *,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole sweep; returns (and writes to ``<output_dir>/results.json``) the results document."""
    from shiq_lab.train.sweep import train_run

    config = config or BfclSweepConfig()
    training = training or ShiQConfig(**TRAINING_DEFAULTS)
    every = config.eval_every or training.max_steps
    run_config = dataclasses.replace(config, eval_every=every)
    with use_cpu_threads(config.cpu_threads if config.device == "cpu" else None):
        start = time.perf_counter()
        out = Path(training.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(training.seed)
        reference, tokenizer = load_model(config.model, device=config.device)
        reference.requires_grad_(False)
        train, held, tokens = select_subset(config, tokenizer)
        log(f"subset: {len(train)} train + {len(held)} held-out {config.category} entries, "
            f"{np.mean(list(tokens.values())):.0f} tokens per ground-truth episode (docs={config.docs})")
        t0 = time.perf_counter()
        samples = _sample_data(reference, tokenizer, train, config, training.seed)
        sample_seconds = time.perf_counter() - t0
        datasets = {mode: offline_rows(train, corruptions_per_kind=config.corruptions_per_kind, samples=samples,
                                       reward_mode=mode, seed=training.seed, config=config.prompt)
                    for mode in ("turn", "final")}
        rows = datasets["turn"]
        by_source: dict[str, list[float]] = {}
        for r in rows:
            by_source.setdefault(r["source"], []).append(r["score"])
        log(f"offline data: {len(rows)} trajectories; official score by source: "
            + ", ".join(f"{k} {np.mean(v):.2f} (n={len(v)})" for k, v in by_source.items()))

        def evaluate(policy: torch.nn.Module) -> BfclEval:
            return evaluate_bfcl(policy, reference, tokenizer, held, config)

        t0 = time.perf_counter()
        results: dict[str, Any] = {"reference": evaluate(reference).row() | {"seconds": round(time.perf_counter() - t0, 1)}}
        log(f"reference: turn accuracy {results['reference']['turn_accuracy']:.3f}, "
            f"score {results['reference']['score']:.3f}")
        examples = {}
        for name in config.variants:
            loss_type, mode = VARIANTS[name]
            ds = Dataset.from_list([{"messages": r["messages"]} for r in datasets[mode]])
            run = train_run(run_config, dataclasses.replace(training, output_dir=str(out / name)), loss_type,
                            training.beta, ds, evaluate, log=log)
            final = run["points"][-1][1]
            results[name] = final.row() | {"loss_type": loss_type, "reward_mode": mode,
                                           "train_seconds": round(run["seconds"], 1),
                                           "final_loss": run["history"][-1]["loss"] if run["history"] else None}
            examples[name] = final.examples[:2]
            log(f"{name}: turn accuracy {final.turn_accuracy:.3f}, score {final.score:.3f}, "
                f"KL {final.kl_states_mean:.3f}")
        # the training fields the report reads, beside the task's own
        config_doc = config.to_dict() | {"beta": training.beta, "max_steps": training.max_steps,
                                         "batch_size": training.per_device_train_batch_size,
                                         "learning_rate": training.learning_rate, "max_length": training.max_length,
                                         "reward_normalization": training.reward_normalization,
                                         "output_dir": training.output_dir, "seed": training.seed}
        doc = {
            "config": config_doc,
            "subset": {"train": [e.id for e in train], "held_out": [e.id for e in held], "tokens": tokens,
                       "tokens_mean": float(np.mean(list(tokens.values())))},
            "offline_data": {"n": len(rows), "score_by_source": {k: float(np.mean(v)) for k, v in by_source.items()},
                             "n_by_source": {k: len(v) for k, v in by_source.items()},
                             "sample_seconds": round(sample_seconds, 1)},
            "results": results,
            "examples": examples,
            "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__,
        }
        (out / "results.json").write_text(json.dumps(doc, indent=1))
        return doc


#: flags of ``--quick``: a smoke run that never writes the committed results
QUICK = ["--n_entries", "4", "--holdout_every", "2", "--samples_per_entry", "0", "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--max_new_tokens", "8", "--max_length", "768",
         "--output_dir", "runs/bfcl_quick"]


@report_errors
def main(argv: list[str] | None = None) -> int:
    """``python -m shiq_lab.tasks.bfcl.sweep --config FILE [--field value ...] [--quick]``."""
    from shiq_lab.infra.config import parse_config
    from shiq_lab.tasks.bfcl.report import write_results

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    argv = (QUICK if quick else []) + [a for a in argv if a != "--quick"]  # explicit flags win over --quick
    config, training = parse_config((BfclSweepConfig, ShiQConfig), argv, defaults=TRAINING_DEFAULTS,
                                    prog="python -m shiq_lab.tasks.bfcl.sweep", description=__doc__)
    doc = run_sweep(config, training)
    if config.results and not quick:
        paths = write_results(doc, Path(config.results))
        print(f"results: {', '.join(str(p) for p in paths)}")
    print(json.dumps(doc["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
