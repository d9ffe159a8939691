"""The IMDB task end to end: positive continuations of movie-review openings.

1. **Prompts**: the first words of IMDB reviews (:func:`shiq_lab.imdb.imdb_prompts`), train side for
   the offline data, test side for evaluation.
2. **Reward**: P(positive) of the continuation under the sentiment classifier trained here
   (:mod:`shiq_lab.reward_model`, held-out accuracy stored with it).
3. **Offline dataset**: responses sampled from the reference with their rewards
   (:func:`offline_dataset`, cached on disk; also the ``dataset:`` of ``shiq-lab train`` configs).
4. **Training**: ShiQ, DPO, DRO and CoPG through :class:`shiq_lab.trainer.ShiQTrainer`, for each beta.
5. **Evaluation**: every ``eval_every`` steps, fresh generations on held-out prompts: mean reward
   and KL(pi || pi_ref) on the same samples (:mod:`shiq_lab.evaluation`); together, the reward-KL
   frontier, saved (CSV / JSON / HTML) and plotted.

::

    python -m shiq_lab.imdb_task --config configs/imdb_tiny.yaml [--field value ...]

Batch sizes count responses for every loss type: the pairwise losses (DPO, CoPG) get
``batch_size // samples_per_prompt`` prompts per step, so each loss sees as many responses per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from datasets import Dataset, load_from_disk
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from . import imdb_model  # noqa: F401 -- registers "imdb-small"
from .cpu import cpu_threads as use_cpu_threads
from .evaluation import FRONTIER_COLUMNS, PolicyEval, evaluate_policy, pareto_mask, save_frontier
from .imdb import imdb_prompts
from .losses import LOSS_TYPES
from .models import MODEL_BUILDERS, cache_dir, load_model, model_folder
from .reward_model import RewardModelConfig, SentimentReward, load_reward_model
from .sampling import build_offline_dataset

__all__ = ["ImdbTaskConfig", "offline_dataset", "FrontierCallback", "train_run", "ImdbTaskResult", "run_imdb_task", "main"]


def _model_identity(name_or_path: str) -> str:
    """Name plus size / mtime of its weight files: a rebuilt model gets a new offline dataset."""
    folder = model_folder(name_or_path) if name_or_path in MODEL_BUILDERS else Path(name_or_path)
    if not folder.exists():
        return name_or_path  # a hub id: its name is all we have offline
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return name_or_path + "|" + "|".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


def offline_dataset(
    model: str = "imdb-small",
    n_prompts: int = 160,
    samples_per_prompt: int = 4,
    n_words: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
    reward: str = "prob",
    batch_size: int = 64,
    device: str | None = None,
    cache: bool = True,
    cpu_threads: int | None = 1,
) -> Dataset:
    """Responses sampled from ``model`` (the reference) to train-side IMDB prompts, with their rewards.

    Columns of :func:`shiq_lab.sampling.build_offline_dataset` (``prompt``, ``completion``, ``reward``,
    ``group``, ``prompt_ids``, ``completion_ids``, ``finished``). Saved once under
    ``<cache>/imdb_data/`` and reloaded for the same arguments and the same model weights. This is
    the function a ``shiq-lab train`` config names: ``dataset: shiq_lab.imdb_task:offline_dataset``.
    ``cpu_threads`` applies while sampling on the CPU.
    """
    settings = dict(model=model, n_prompts=n_prompts, samples_per_prompt=samples_per_prompt, n_words=n_words,
                    max_new_tokens=max_new_tokens, seed=seed, reward=reward, batch_size=batch_size)
    # the model's weights and the classifier's training config are part of the key: rebuilding either
    # one gives a new dataset instead of stale samples or rewards
    identity = {"model": _model_identity(model), "reward_model": RewardModelConfig().key()}
    key = hashlib.sha256(json.dumps({**settings, **identity}, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "imdb_data" / f"{Path(model).name}-{key}"
    if cache and (folder / "dataset_info.json").exists():
        return load_from_disk(str(folder))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference, tokenizer = load_model(model, device=device)
    prompts = imdb_prompts("train", n_prompts, n_words=n_words, seed=seed)
    reward_fn = SentimentReward(load_reward_model(), kind=reward)
    with use_cpu_threads(cpu_threads if device == "cpu" else None):
        ds = build_offline_dataset(reference, tokenizer, prompts, reward_fn, samples_per_prompt=samples_per_prompt,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    if cache:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(folder.name + ".tmp")
        ds.save_to_disk(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    return ds


@dataclass
class ImdbTaskConfig:
    """Every setting of an IMDB run (the defaults are the quick CPU run of notebook 04 and CI)."""

    model: str = "imdb-small"  # reference and starting point: registered name, folder or hub id
    loss_types: Sequence[str] = LOSS_TYPES
    betas: Sequence[float] = (0.1, 0.5)  # in units of the reward's spread when rewards are z-scored
    # data
    n_train_prompts: int = 160  # x samples_per_prompt = max_steps x batch_size: one pass over the data
    samples_per_prompt: int = 4  # responses per train prompt (pairs for DPO / CoPG)
    n_words: int = 8  # words per prompt
    max_new_tokens: int = 16
    reward: str = "prob"  # "prob" = P(positive), "logit" = log-odds
    # training
    max_steps: int = 40
    batch_size: int = 16  # responses per step, for every loss type
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "constant"
    reward_normalization: str = "zscore"  # a per-state value offset of E[R]/beta is hard to learn: centre R
    max_length: int = 64
    trainer_args: dict[str, Any] = field(default_factory=dict)  # any other ShiQConfig field
    # evaluation
    eval_every: int = 20  # steps between frontier points (also evaluates after the last step)
    n_eval_prompts: int = 64
    eval_samples_per_prompt: int = 2
    eval_seed: int = 1234  # sampling seed, the same for every policy (common random numbers)
    sample_batch_size: int = 64
    # where and how
    output_dir: str = "runs/imdb"
    device: str = "cpu"
    cpu_threads: int | None = 1  # torch threads of a CPU run (small models: 1 is fastest); None: torch's setting
    dtype: str = "float32"
    save_models: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.loss_types = tuple(self.loss_types)
        self.betas = tuple(float(b) for b in self.betas)
        bad = [lt for lt in self.loss_types if lt not in LOSS_TYPES]
        if bad:
            raise ValueError(f"loss_types={bad}: choose among {LOSS_TYPES}")
        if not self.betas or any(b <= 0 for b in self.betas):
            raise ValueError(f"betas={self.betas}: give at least one beta, each > 0")
        if self.eval_every < 1 or self.max_steps < 1:
            raise ValueError(f"eval_every={self.eval_every}, max_steps={self.max_steps}: both must be >= 1")
        pairwise = {"dpo", "copg"} & set(self.loss_types)
        if pairwise and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: {sorted(pairwise)} need >= 2 responses per prompt")
        if pairwise and self.batch_size < self.samples_per_prompt:
            raise ValueError(f"batch_size={self.batch_size} < samples_per_prompt={self.samples_per_prompt}: "
                             "a pairwise step needs at least one whole prompt group")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss_types"], d["betas"] = list(self.loss_types), list(self.betas)
        return d


class FrontierCallback(TrainerCallback):
    """Evaluates the live policy every ``every`` steps and after the last one (a frontier point each)."""

    def __init__(self, every: int, evaluate: Callable[[torch.nn.Module], PolicyEval], *, on_point: Callable | None = None):
        self.every = every
        self.evaluate = evaluate
        self.on_point = on_point
        self.points: list[tuple[int, PolicyEval]] = []

    def _point(self, model: torch.nn.Module, step: int) -> None:
        if self.points and self.points[-1][0] == step:
            return
        was_training = model.training
        result = self.evaluate(model)
        model.train(was_training)
        self.points.append((step, result))
        if self.on_point is not None:
            self.on_point(step, result)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D401 -- Trainer hook
        if state.global_step % self.every == 0:
            self._point(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._point(model, state.global_step)


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype={name!r}: choose float32, bfloat16 or float16") from None


def train_run(
    config: ImdbTaskConfig,
    loss_type: str,
    beta: float,
    dataset: Dataset,
    evaluate: Callable[[torch.nn.Module], PolicyEval],
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one (loss type, beta) from the reference with :class:`~shiq_lab.trainer.ShiQTrainer`.

    Returns ``{"points": [(step, PolicyEval)], "history": trainer log rows, "folder": run folder,
    "seconds": ...}``; writes ``run.json`` (and the final model when ``save_models``) into the folder.
    """
    from .trainer import ShiQConfig, ShiQTrainer

    folder = Path(config.output_dir) / f"{loss_type}-beta{beta:g}"
    folder.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = load_model(config.model, dtype=_dtype(config.dtype))
    pairwise = loss_type in ("dpo", "copg")
    batch = max(1, config.batch_size // config.samples_per_prompt) if pairwise else config.batch_size
    args = ShiQConfig(
        output_dir=str(folder), loss_type=loss_type, beta=beta, max_length=config.max_length,
        per_device_train_batch_size=batch, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type, max_steps=config.max_steps,
        reward_normalization=config.reward_normalization, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=config.seed, use_cpu=config.device == "cpu",
        **config.trainer_args,
    )
    callback = FrontierCallback(config.eval_every, evaluate, on_point=lambda s, r: log(
        f"   {loss_type:4s} beta={beta:<5g} step {s:4d}: reward {r.reward_mean:.3f}  KL {r.kl_states_mean:.3f}"))
    start = time.perf_counter()
    trainer = ShiQTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the per-step dicts: they are in the returned history
    trainer.train()
    seconds = time.perf_counter() - start
    if config.save_models:
        trainer.save_model(str(folder / "final"))
    history = [dict(row) for row in trainer.state.log_history if "loss" in row]
    (folder / "run.json").write_text(json.dumps({
        "model": config.model, "loss_type": loss_type, "beta": beta, "max_steps": config.max_steps,
        "seconds": round(seconds, 2), "history": history,
        # the z-scoring the trainer applied to the returns: per-token values in training units need it
        "reward_stats": trainer.reward_stats,
        "points": [{"step": s, **r.row()} for s, r in callback.points],
    }, indent=1))
    return {"points": callback.points, "history": history, "folder": folder, "seconds": seconds,
            "reward_stats": trainer.reward_stats}


@dataclass
class ImdbTaskResult:
    """What :func:`run_imdb_task` measured."""

    config: ImdbTaskConfig
    frontier: pd.DataFrame  # FRONTIER_COLUMNS + "pareto"
    history: pd.DataFrame  # one row per training log step: loss_type, beta, step, loss, kl, ...
    reference_eval: PolicyEval
    final_evals: dict[tuple[str, float], PolicyEval]  # last point of each run (samples "after")
    classifier_meta: dict[str, Any]
    dataset: Dataset
    paths: dict[str, Path]
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Key numbers: classifier accuracy, reference and best points, wall time."""
        runs = self.frontier[self.frontier["loss_type"] != "reference"]
        final = runs.loc[runs.groupby(["loss_type", "beta"])["step"].idxmax()]
        out: dict[str, Any] = {
            "classifier_accuracy_test": self.classifier_meta["accuracy_test"],
            "reference_reward": self.reference_eval.reward_mean,
            "offline_reward_mean": float(pd.Series(self.dataset["reward"]).mean()),
            "seconds": round(self.seconds, 1),
        }
        for _, row in final.iterrows():
            tag = f"{row['loss_type']}_beta{row['beta']:g}"
            out[f"{tag}_reward"] = row["reward_mean"]
            out[f"{tag}_kl"] = row["kl_states_mean"]
        return out


def run_imdb_task(config: ImdbTaskConfig = ImdbTaskConfig(), *, log: Callable[[str], None] = print) -> ImdbTaskResult:
    """The whole task: classifier -> offline data -> every (loss type, beta) -> frontier (saved).

    ``log`` receives one line per step of the pipeline and per frontier point.
    """
    with use_cpu_threads(config.cpu_threads if config.device == "cpu" else None):
        return _run(config, log)


def _run(config: ImdbTaskConfig, log: Callable[[str], None]) -> ImdbTaskResult:
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    torch.manual_seed(config.seed)

    classifier = load_reward_model()
    log(f"reward model: held-out accuracy {classifier.meta['accuracy_test']:.3f} on {classifier.meta['n_test_reviews']} IMDB test reviews")
    reward_fn = SentimentReward(classifier, kind=config.reward)
    dataset = offline_dataset(config.model, n_prompts=config.n_train_prompts, samples_per_prompt=config.samples_per_prompt,
                              n_words=config.n_words, max_new_tokens=config.max_new_tokens, seed=config.seed,
                              reward=config.reward, batch_size=config.sample_batch_size, device=config.device)
    log(f"offline dataset: {len(dataset)} responses, mean reward {pd.Series(dataset['reward']).mean():.3f}")

    reference, tokenizer = load_model(config.model, dtype=_dtype(config.dtype), device=config.device)
    eval_prompts = imdb_prompts("test", config.n_eval_prompts, n_words=config.n_words, seed=config.seed + 1)

    def evaluate(policy: torch.nn.Module) -> PolicyEval:
        return evaluate_policy(policy, reference, tokenizer, eval_prompts, reward_fn,
                               samples_per_prompt=config.eval_samples_per_prompt, max_new_tokens=config.max_new_tokens,
                               batch_size=config.sample_batch_size, seed=config.eval_seed, device=config.device)

    reference_eval = evaluate(reference)
    log(f"reference: reward {reference_eval.reward_mean:.3f} on {reference_eval.n} held-out samples")
    rows = [{"label": "reference", "loss_type": "reference", "beta": float("nan"), "step": 0, "path": "",
             **reference_eval.row()}]
    history, final_evals = [], {}
    for loss_type in config.loss_types:
        for beta in config.betas:
            run = train_run(config, loss_type, beta, dataset, evaluate, log=log)
            for step, result in run["points"]:
                rows.append({"label": f"{loss_type} beta={beta:g} step={step}", "loss_type": loss_type, "beta": beta,
                             "step": step, "path": str(run["folder"]), **result.row()})
            history += [{"loss_type": loss_type, "beta": beta, **h} for h in run["history"]]
            final_evals[(loss_type, beta)] = run["points"][-1][1]
    frontier = pd.DataFrame(rows)[FRONTIER_COLUMNS]
    frontier["pareto"] = pareto_mask(frontier, by=None)
    paths = save_frontier(frontier, out / "frontier")
    history_frame = pd.DataFrame(history)
    paths["history"] = out / "history.csv"
    history_frame.to_csv(paths["history"], index=False)
    result = ImdbTaskResult(config=config, frontier=frontier, history=history_frame, reference_eval=reference_eval,
                            final_evals=final_evals, classifier_meta=classifier.meta, dataset=dataset, paths=paths,
                            seconds=time.perf_counter() - start)
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(result.summary(), indent=1))
    return result


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: must be a YAML mapping of ImdbTaskConfig fields")
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m shiq_lab.imdb_task --config FILE [--field value ...]``: the sweep, then the frontier table."""
    fields = {f.name: f for f in dataclasses.fields(ImdbTaskConfig)}
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.imdb_task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of ImdbTaskConfig fields (flags override it)")
    for name in fields:
        parser.add_argument(f"--{name}", default=None, help="YAML value (lists: '[0.03, 0.1]')")
    args = parser.parse_args(argv)
    values = _read_yaml(args.config) if args.config else {}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"{args.config}: unknown field(s) {unknown}; fields: {', '.join(fields)}")
    import yaml

    for name in fields:
        flag = getattr(args, name)
        if flag is not None:
            values[name] = yaml.safe_load(flag)
    result = run_imdb_task(ImdbTaskConfig(**values))
    table = result.frontier.drop(columns=["path", "label"])
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(result.summary(), indent=1))
    print(f"frontier: {result.paths['csv']}  plot: {result.paths.get('html', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
