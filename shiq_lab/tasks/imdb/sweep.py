"""The IMDB task end to end: positive continuations of movie-review openings.

1. **Prompts**: the first words of IMDB reviews (:func:`shiq_lab.tasks.imdb.reviews.imdb_prompts`), train side for
   the offline data, test side for evaluation.
2. **Reward**: P(positive) of the continuation under the sentiment classifier trained here
   (:mod:`shiq_lab.tasks.imdb.reward`, held-out accuracy stored with it).
3. **Offline dataset**: responses sampled from the reference with their rewards
   (:func:`offline_dataset`, cached on disk; also the ``dataset:`` of ``shiq-lab train`` configs).
4. **Training**: ShiQ, DPO, DRO and CoPG through :class:`shiq_lab.train.trainer.ShiQTrainer`, for each beta.
5. **Evaluation**: every ``eval_every`` steps, fresh generations on held-out prompts: mean reward
   and KL(pi || pi_ref) on the same samples (:mod:`shiq_lab.evaluation`); together, the reward-KL
   frontier, saved (CSV / JSON / HTML) and plotted.

::

    python -m shiq_lab.tasks.imdb.sweep --config configs/train/imdb_tiny.yaml [--field value ...]

Batch sizes count responses for every loss type: the pairwise losses (DPO, CoPG) get
``batch_size // samples_per_prompt`` prompts per step, so each loss sees as many responses per step.

Run types (``loss_types``): the four losses of :data:`shiq_lab.losses.LOSS_TYPES`, which all train
on the sequence score (on the last token for ShiQ), and ``shiq_token``: ShiQ on the exact per-token
increments of the same score (:meth:`shiq_lab.tasks.imdb.reward.SentimentReward.token_rewards`), same
data, same returns. ``use_lora`` trains LoRA adapters (the reference is the base model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset, load_from_disk

from shiq_lab.evaluation.frontier import pareto_mask, save_frontier
from shiq_lab.evaluation.generations import FRONTIER_COLUMNS, PolicyEval, evaluate_policy
from shiq_lab.evaluation.sampling import build_offline_dataset
from shiq_lab.infra.config import report_errors
from shiq_lab.infra.models import MODEL_BUILDERS, cache_dir, load_model, model_folder
from shiq_lab.infra.runtime import cpu_threads as use_cpu_threads
from shiq_lab.losses import LOSS_TYPES, PAIRWISE_LOSSES
from shiq_lab.tasks.imdb import lm as imdb_model  # noqa: F401 -- registers "imdb-small"
from shiq_lab.tasks.imdb.reviews import imdb_prompts
from shiq_lab.tasks.imdb.reward import RewardModelConfig, SentimentReward, load_reward_model
from shiq_lab.train.config import ShiQConfig
from shiq_lab.train.progress import quiet_library_bars
from shiq_lab.train.sweep import FrontierCallback, _dtype, train_run

__all__ = ["RUN_TYPES", "ImdbTaskConfig", "offline_dataset", "add_token_rewards", "FrontierCallback", "train_run", "ImdbTaskResult", "run_imdb_task", "main"]


#: what ``loss_types`` may hold: the losses, plus ShiQ on token-level rewards
RUN_TYPES = (*LOSS_TYPES, "shiq_token")


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

    Columns of :func:`shiq_lab.evaluation.sampling.build_offline_dataset` (``prompt``, ``completion``, ``reward``,
    ``group``, ``prompt_ids``, ``completion_ids``, ``finished``). Saved once under
    ``<cache>/imdb_data/`` and reloaded for the same arguments and the same model weights. This is
    the function a ``shiq-lab train`` config names: ``dataset: shiq_lab.tasks.imdb.sweep:offline_dataset``.
    ``cpu_threads`` applies while sampling on the CPU.
    """
    _require_model(model)
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


def _require_model(model: str) -> None:
    """A registered model whose asset is missing: say which command fetches it (before any work)."""
    from shiq_lab.infra import assets

    needs = {"smollm2-135m": "smollm2"}.get(model)
    if needs and needs in assets.ASSETS and not assets.is_fetched(needs) \
            and not (cache_dir() / "models" / model / ".complete").exists():
        raise SystemExit(f"model {model!r} is not fetched: run `make assets` (or `shiq-lab models fetch {model}`) first")


def add_token_rewards(ds: Dataset, tokenizer: Any, reward_fn: SentimentReward, *, atol: float = 1e-5) -> Dataset:
    """Add ``token_rewards``: the exact per-token increments of each row's ``reward`` (one per completion token).

    Raises if a row's increments do not sum to its stored reward (a tokenizer or classifier mismatch).
    """
    rows = reward_fn.token_rewards(ds["prompt"], ds["completion_ids"], tokenizer)
    for i, (inc, total) in enumerate(zip(rows, ds["reward"])):
        if abs(sum(inc) - total) > atol:
            raise ValueError(f"row {i}: token rewards sum to {sum(inc):.6f} but the sequence reward is {total:.6f}: "
                             "the dataset was scored with another classifier or tokenizer; rebuild it")
    return ds.add_column("token_rewards", rows)


#: the task's defaults for training fields (the quick CPU run of notebook 04 and CI); a sweep YAML or a flag
#: overrides any of them, and any other ``ShiQConfig`` field can be given the same way
TRAINING_DEFAULTS: dict[str, Any] = {
    "max_steps": 40,  # x per_device_train_batch_size = n_train_prompts x samples_per_prompt: one pass over the data
    "per_device_train_batch_size": 16,  # responses per step, for every loss type (see the module docstring)
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant",
    "reward_normalization": "zscore",  # a per-state value offset of E[R]/beta is hard to learn: centre R
    "max_length": 64,
    "output_dir": "runs/imdb",
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": ["tensorboard"],  # events in each run's folder: tensorboard --logdir runs/
    "seed": 0,  # the task's seed (TrainingArguments' default is 42): offline data, eval prompts (seed + 1), init
    "disable_tqdm": True,  # the sweep's own bar (ImdbTaskConfig.progress) counts the steps of every run
}
#: names of the flat config of release 0.1 (one release of support): old name -> ShiQConfig field
_LEGACY_TRAINING_NAMES = {"batch_size": "per_device_train_batch_size"}


@dataclass
class ImdbTaskConfig:
    """The task's own settings of an IMDB sweep; training settings are a :class:`ShiQConfig` beside it.

    A sweep is ``(ImdbTaskConfig, ShiQConfig)``: one YAML file holds the fields of both (see
    ``configs/sweep/``); :func:`split_config` splits a flat mapping the same way.
    """

    model: str = "imdb-small"  # reference and starting point: registered name, folder or hub id
    loss_types: list[str] = field(default_factory=lambda: list(LOSS_TYPES))  # any of RUN_TYPES
    betas: list[float] = field(default_factory=lambda: [0.1, 0.5])  # in reward spreads when rewards are z-scored
    # data
    n_train_prompts: int = 160  # x samples_per_prompt = max_steps x batch size: one pass over the data
    samples_per_prompt: int = 4  # responses per train prompt (pairs for DPO / CoPG)
    n_words: int = 8  # words per prompt
    max_new_tokens: int = 16
    reward: str = "prob"  # "prob" = P(positive), "logit" = log-odds
    # evaluation
    eval_every: int = 20  # steps between frontier points (also evaluates after the last step)
    n_eval_prompts: int = 64
    eval_samples_per_prompt: int = 2
    eval_seed: int = 1234  # sampling seed, the same for every policy (common random numbers)
    sample_batch_size: int = 64
    # where and how
    device: str = "cpu"
    cpu_threads: int | None = 1  # torch threads of a CPU run (small models: 1 is fastest); None: torch's setting
    dtype: str = "float32"
    save_models: bool = True
    use_lora: bool = False  # LoRA adapters on every linear layer; the reference is the base model
    lora_r: int = 16
    lora_alpha: int = 32
    progress: bool = True  # one bar over runs x steps (tqdm.auto: a widget in notebooks)

    def __post_init__(self) -> None:
        self.loss_types = list(self.loss_types)
        self.betas = [float(b) for b in self.betas]
        bad = [lt for lt in self.loss_types if lt not in RUN_TYPES]
        if bad:
            raise ValueError(f"loss_types={bad}: choose among {RUN_TYPES}")
        if not self.betas or any(not (b > 0 and b < float("inf")) for b in self.betas):
            raise ValueError(f"betas={self.betas}: give at least one beta, each > 0 and finite")
        if self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every}: must be >= 1")
        pairwise = sorted(set(PAIRWISE_LOSSES) & set(self.loss_types))
        if pairwise and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: {pairwise} need >= 2 responses per prompt")

    def check_training(self, training: ShiQConfig) -> None:
        """What this task needs of the training config (raises ``ValueError`` naming both fields)."""
        if training.max_steps < 1:
            raise ValueError(f"max_steps={training.max_steps}: the sweep needs a step budget >= 1")
        if set(PAIRWISE_LOSSES) & set(self.loss_types) and training.per_device_train_batch_size < self.samples_per_prompt:
            raise ValueError(f"per_device_train_batch_size={training.per_device_train_batch_size} < samples_per_prompt="
                             f"{self.samples_per_prompt}: a pairwise step needs at least one whole prompt group")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_learning_rate(model: str) -> float:
    """The task's learning rate: 1e-3 for the small models built here (``imdb-small``, ``tiny``), else 1e-5."""
    return 1e-3 if model in ("imdb-small", "tiny") else 1e-5


def one_pass_prompts(max_steps: int, batch_size: int, samples_per_prompt: int) -> int:
    """Train prompts for one pass over the offline data in ``max_steps`` steps of ``batch_size`` responses."""
    return max(8, max_steps * batch_size // samples_per_prompt)


def default_training(**overrides: Any) -> ShiQConfig:
    """The task's training config: :data:`TRAINING_DEFAULTS` with ``overrides`` (any ``ShiQConfig`` field)."""
    from shiq_lab.train.config import ShiQConfig

    return ShiQConfig(**{**TRAINING_DEFAULTS, **overrides})


def split_config(values: dict[str, Any]) -> tuple[ImdbTaskConfig, ShiQConfig]:
    """A flat mapping of task and training fields -> ``(ImdbTaskConfig, ShiQConfig)`` (task defaults filled in).

    Accepts release 0.1's names for one release (``batch_size``, ``trainer_args: {...}``).
    """
    values = dict(values)
    values.update(values.pop("trainer_args", None) or {})
    for old, new in _LEGACY_TRAINING_NAMES.items():
        if old in values:
            values[new] = values.pop(old)
    task_fields = {f.name for f in dataclasses.fields(ImdbTaskConfig)}
    task = ImdbTaskConfig(**{k: v for k, v in values.items() if k in task_fields})
    training = default_training(**{k: v for k, v in values.items() if k not in task_fields})
    task.check_training(training)
    return task, training


@dataclass
class ImdbTaskResult:
    """What :func:`run_imdb_task` measured."""

    config: ImdbTaskConfig
    training: ShiQConfig
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


def run_imdb_task(config: ImdbTaskConfig | None = None, training: ShiQConfig | None = None, *,
                  log: Callable[[str], None] = print) -> ImdbTaskResult:
    """The whole task: classifier -> offline data -> every (loss type, beta) -> frontier (saved).

    ``training`` is the template of every run's ``ShiQConfig`` (default: :func:`default_training`); each run
    replaces its ``loss_type``, ``beta``, ``output_dir`` (``<output_dir>/<loss>-beta<beta>``) and batch size.
    ``log`` receives one line per step of the pipeline and per frontier point.
    """
    config = config or ImdbTaskConfig()
    training = training or default_training()
    config.check_training(training)
    with use_cpu_threads(config.cpu_threads if config.device == "cpu" else None), quiet_library_bars():
        return _run(config, training, log)


def _run(config: ImdbTaskConfig, training: ShiQConfig, log: Callable[[str], None]) -> ImdbTaskResult:
    start = time.perf_counter()
    _require_model(config.model)
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), **_training_fields(training)}, indent=1))
    torch.manual_seed(training.seed)

    classifier = load_reward_model()
    log(f"reward model: held-out accuracy {classifier.meta['accuracy_test']:.3f} on {classifier.meta['n_test_reviews']} IMDB test reviews")
    reward_fn = SentimentReward(classifier, kind=config.reward)
    dataset = offline_dataset(config.model, n_prompts=config.n_train_prompts, samples_per_prompt=config.samples_per_prompt,
                              n_words=config.n_words, max_new_tokens=config.max_new_tokens, seed=training.seed,
                              reward=config.reward, batch_size=config.sample_batch_size, device=config.device)
    reference, tokenizer = load_model(config.model, dtype=_dtype(config.dtype), device=config.device)
    cut = sum(f is False for f in dataset["finished"])
    log(f"offline dataset: {len(dataset)} responses, mean reward {pd.Series(dataset['reward']).mean():.3f}; "
        f"{cut} of {len(dataset)} reached max_new_tokens={config.max_new_tokens} without EOS (treated as terminal)")
    if "shiq_token" in config.loss_types:
        dataset = add_token_rewards(dataset, tokenizer, reward_fn)
    eval_prompts = imdb_prompts("test", config.n_eval_prompts, n_words=config.n_words, seed=training.seed + 1)

    def evaluate(policy: torch.nn.Module) -> PolicyEval:
        return evaluate_policy(policy, reference, tokenizer, eval_prompts, reward_fn,
                               samples_per_prompt=config.eval_samples_per_prompt, max_new_tokens=config.max_new_tokens,
                               batch_size=config.sample_batch_size, seed=config.eval_seed, device=config.device)

    reference_eval = evaluate(reference)
    log(f"reference: reward {reference_eval.reward_mean:.3f} on {reference_eval.n} held-out samples")
    rows = [{"label": "reference", "loss_type": "reference", "beta": float("nan"), "step": 0, "path": "",
             **reference_eval.row()}]
    history, final_evals = [], {}
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        n_runs = len(config.loss_types) * len(config.betas)
        bar = tqdm(total=n_runs * training.max_steps, desc=f"{n_runs} runs x {training.max_steps} steps", unit="step",
                   dynamic_ncols=True)
        plain = log

        def log(line: str) -> None:  # above the bar, not through it
            with tqdm.external_write_mode():
                plain(line)

    for loss_type in config.loss_types:
        for beta in config.betas:
            run = train_run(config, training, loss_type, beta, dataset, evaluate, log=log, bar=bar)
            for step, result in run["points"]:
                rows.append({"label": f"{loss_type} beta={beta:g} step={step}", "loss_type": loss_type, "beta": beta,
                             "step": step, "path": str(run["folder"]), **result.row()})
            history += [{"loss_type": loss_type, "beta": beta, **h} for h in run["history"]]
            final_evals[(loss_type, beta)] = run["points"][-1][1]
    if bar is not None:
        bar.close()
    frontier = pd.DataFrame(rows)[FRONTIER_COLUMNS]
    frontier["pareto"] = pareto_mask(frontier, by=None)
    paths = save_frontier(frontier, out / "frontier")
    history_frame = pd.DataFrame(history)
    paths["history"] = out / "history.csv"
    history_frame.to_csv(paths["history"], index=False)
    result = ImdbTaskResult(config=config, training=training, frontier=frontier, history=history_frame, reference_eval=reference_eval,
                            final_evals=final_evals, classifier_meta=classifier.meta, dataset=dataset, paths=paths,
                            seconds=time.perf_counter() - start)
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(json.dumps(result.summary(), indent=1))
    return result


def _legacy_flags(argv: list[str]) -> list[str]:
    """Release 0.1's flag forms, for one release: ``--batch_size``, and YAML lists such as ``--betas '[0.1, 0.5]'``."""
    import yaml

    out: list[str] = []
    for a in argv:
        if a.startswith("--") and a[2:] in _LEGACY_TRAINING_NAMES:
            out.append(f"--{_LEGACY_TRAINING_NAMES[a[2:]]}")
        elif a.startswith("[") and a.endswith("]"):
            out += [str(v) for v in yaml.safe_load(a)]
        else:
            out.append(a)
    return out


def _training_fields(training: ShiQConfig) -> dict[str, Any]:
    """The training fields that differ from ``ShiQConfig``'s defaults (what a sweep's config.json records)."""
    from shiq_lab.train.config import ShiQConfig

    plain = ShiQConfig(output_dir=training.output_dir)
    return {f.name: getattr(training, f.name) for f in dataclasses.fields(training)
            if f.init and f.name != "output_dir" and repr(getattr(training, f.name)) != repr(getattr(plain, f.name))
            } | {"output_dir": training.output_dir}


@report_errors
def main(argv: list[str] | None = None) -> int:
    """``python -m shiq_lab.tasks.imdb.sweep --config FILE [--field value ...]``: the sweep, then the frontier table."""
    from shiq_lab.infra.config import parse_config
    from shiq_lab.train.config import ShiQConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    results = None
    if "--results" in argv:  # the README's results file (shiq_lab.tasks.imdb.report); not a config field
        i = argv.index("--results")
        results, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    command = shlex.join(["python", "-m", "shiq_lab.tasks.imdb.sweep", *argv])
    cpu0 = time.process_time()
    config, training = parse_config((ImdbTaskConfig, ShiQConfig), _legacy_flags(argv), defaults=TRAINING_DEFAULTS,
                                    prog="python -m shiq_lab.tasks.imdb.sweep", description=__doc__)
    try:
        config.check_training(training)
    except ValueError as err:
        raise SystemExit(f"shiq-lab: {err}") from None
    result = run_imdb_task(config, training)
    if results:
        from shiq_lab.tasks.imdb.report import write_results

        write_results(result, results, command=f"{command} --results {results}", cpu_seconds=time.process_time() - cpu0)
    table = result.frontier.drop(columns=["path", "label"])
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(result.summary(), indent=1))
    print(f"frontier: {result.paths['csv']}  plot: {result.paths.get('html', '')}")
    print(f"training curves: tensorboard --logdir {training.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
