"""The ``shiq-lab`` command line.

::

    shiq-lab train --config configs/tiny_cpu.yaml [--beta 0.2 --loss_type dpo ...]
    shiq-lab precompute-ref --config configs/tiny_cpu.yaml [--output DIR]
    shiq-lab evaluate [...]
    shiq-lab models [list]                     # registered models and whether they are built
    shiq-lab models fetch NAME [NAME ...]

Every field of the YAML config is also a flag, and a flag overrides the file. The fields are those
of :class:`RunArguments` (model, data, LoRA) and of :class:`shiq_lab.trainer.ShiQConfig` (all of
``transformers.TrainingArguments`` plus the ShiQ fields); ``shiq-lab train --help`` lists them.

``evaluate`` delegates to ``shiq_lab.evaluation.cli_main(argv)`` when that module provides it (task
evaluation: sampling, rewards, KL of generations). Without it, or with ``--offline``, it computes
the loss metrics of a checkpoint on a dataset (``--config`` + ``--checkpoint``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunArguments", "parse_config", "build_run", "main"]


@dataclass
class RunArguments:
    """Model, data and adapter fields of a run (the training fields live in ``ShiQConfig``)."""

    model: str = field(default="tiny", metadata={"help": "registered model name (shiq-lab models list), folder or hub id"})
    ref_model: str | None = field(default=None, metadata={"help": "separate reference model (default: the model itself)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 | auto"})
    dataset: str = field(default="synthetic", metadata={
        "help": "file (.jsonl/.json/.csv/.parquet), save_to_disk folder, 'synthetic[:kind]' or 'package.module:function'"})
    dataset_kwargs: str | None = field(default=None, metadata={"help": "JSON object of keyword arguments for the dataset"})
    eval_dataset: str | None = field(default=None, metadata={"help": "evaluation dataset, same forms as dataset"})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "hold out this fraction of the prompts (with all their responses) for evaluation"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first n rows of the dataset"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (reference = adapters disabled)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps theta = ref exact at start)"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names or all-linear"})


def _parser(prog: str, parents: list[argparse.ArgumentParser] | None = None):
    from transformers import HfArgumentParser

    from .trainer import ShiQConfig

    return HfArgumentParser((RunArguments, ShiQConfig), prog=prog, parents=parents or [])


def _field_names() -> set[str]:
    from .trainer import ShiQConfig

    return {f.name for f in dataclasses.fields(RunArguments)} | {f.name for f in dataclasses.fields(ShiQConfig) if f.init}


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise SystemExit(f"config file {path} does not exist (shipped configs are in configs/)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path} must be a YAML mapping of field: value")
    unknown = sorted(set(data) - _field_names())
    if unknown:
        raise SystemExit(f"config file {path}: unknown field(s) {unknown}; see `shiq-lab train --help` for the fields")
    if isinstance(data.get("dataset_kwargs"), dict):
        data["dataset_kwargs"] = json.dumps(data["dataset_kwargs"])
    return data


def parse_config(argv: list[str], *, extra: argparse.ArgumentParser | None = None,
                 prog: str = "shiq-lab train") -> tuple[Any, Any, argparse.Namespace]:
    """``(RunArguments, ShiQConfig, extra namespace)`` from ``--config FILE`` and flags (flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    extra_ns = argparse.Namespace()
    if extra is not None and ("-h" in rest or "--help" in rest):
        _parser(prog, parents=[extra]).parse_args(rest)  # --help: one list of every flag, the extra ones included
    if extra is not None:
        extra_ns, rest = extra.parse_known_args(rest)
    parser = _parser(prog)
    parser.add_argument("--config", default=None, help="YAML file of field: value (flags override it)")
    if known.config:
        parser.set_defaults(**_read_config(known.config))
    try:
        run, cfg = parser.parse_args_into_dataclasses(args=rest)[:2]
    except ValueError as err:  # unknown flags, bad field values (ShiQConfig validation)
        raise SystemExit(f"shiq-lab: {err}") from None
    return run, cfg, extra_ns


def _dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SystemExit(f"dtype={name!r}: choose float32, bfloat16, float16 or auto") from None


def _datasets(run: RunArguments, seed: int):
    from .data import load_dataset_spec, split_by_prompt

    kwargs = json.loads(run.dataset_kwargs) if run.dataset_kwargs else {}
    if not isinstance(kwargs, dict):
        raise SystemExit("dataset_kwargs must be a JSON object / YAML mapping")
    train = load_dataset_spec(run.dataset, **kwargs)
    if run.max_rows is not None:
        train = train.select(range(min(run.max_rows, len(train))))
    evals = load_dataset_spec(run.eval_dataset, **kwargs) if run.eval_dataset else None
    if run.eval_fraction > 0:
        if evals is not None:
            raise SystemExit("give either eval_dataset or eval_fraction, not both")
        train, evals = split_by_prompt(train, run.eval_fraction, seed=seed)
    return train, evals


def _lora_config(run: RunArguments):
    if not run.use_lora:
        return None
    from peft import LoraConfig

    targets: Any = run.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def build_run(run: RunArguments, cfg: Any, *, with_train: bool = True):
    """``ShiQTrainer`` of a parsed config: model, reference, data and LoRA as the config says."""
    from .models import load_model
    from .trainer import ShiQTrainer

    model, tokenizer = load_model(run.model, dtype=_dtype(run.dtype))
    ref = load_model(run.ref_model, dtype=_dtype(run.dtype))[0] if run.ref_model else None
    train, evals = _datasets(run, cfg.seed)
    return ShiQTrainer(model=model, args=cfg, train_dataset=train if with_train else None, eval_dataset=evals,
                       processing_class=tokenizer, ref_model=ref, peft_config=_lora_config(run))


# ---------------------------------------------------------------------------------------------
# sub-commands
# ---------------------------------------------------------------------------------------------


def _train(argv: list[str]) -> int:
    run, cfg, _ = parse_config(argv)
    trainer = build_run(run, cfg)
    resume = cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(cfg.output_dir)
        if resume is None:
            raise SystemExit(f"resume_from_checkpoint={cfg.resume_from_checkpoint}: no checkpoint-* folder in {cfg.output_dir}")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    if trainer.args.should_save:
        target = Path(cfg.output_dir) / "log_history.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        os.replace(tmp, target)  # never a half-written history
        print(f"trained {result.global_step} steps, final train loss {result.training_loss:.6g}; model in {cfg.output_dir}")
    return 0


def _precompute(argv: list[str]) -> int:
    from .data import tokenize_dataset
    from .models import load_model
    from .reference import (ReferenceCache, dataset_fingerprint, precompute_reference, reference_identity,
                            write_reference_stats)
    from .trainer import autocast_dtype

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--output", default=None, help="write the entry here (then train with --ref_stats_path DIR)")
    run, cfg, ns = parse_config(argv, extra=extra, prog="shiq-lab precompute-ref")
    ref_name = run.ref_model or run.model
    model, tokenizer = load_model(ref_name, dtype=_dtype(run.dtype))
    model.to(cfg.device)
    train, evals = _datasets(run, cfg.seed)
    for split, ds in (("train", train), ("eval", evals)):
        if ds is None:
            continue
        tok = tokenize_dataset(ds, tokenizer, max_length=cfg.max_length, truncation=cfg.truncation, add_eos=cfg.add_eos,
                               preference_rewards=(cfg.chosen_reward, cfg.rejected_reward))
        kwargs = dict(batch_size=cfg.ref_batch_size, chunk_size=cfg.logits_chunk_size, logits_mode=cfg.logits_mode,
                      autocast_dtype=autocast_dtype(cfg))
        if ns.output and split == "train":
            where = write_reference_stats(ns.output, model, tok, reference_id=cfg.reference_id, **kwargs)
        else:
            precompute_reference(model, tok, cache_dir=cfg.ref_cache_dir, reference_id=cfg.reference_id, **kwargs)
            cache = ReferenceCache(cfg.ref_cache_dir)
            ident = reference_identity(model, cfg.reference_id, autocast_dtype(cfg))
            where = cache.path(cache.key(dataset_fingerprint(tok), ident))
        print(f"reference statistics ({split}, {len(tok)} rows, reference {ref_name}): {where}")
    return 0


def _evaluate_offline(argv: list[str]) -> int:
    import torch

    from .models import load_model
    from .trainer import ShiQTrainer

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--checkpoint", required=True, help="trained model folder (full or LoRA adapter)")
    run, cfg, ns = parse_config(argv, extra=extra, prog="shiq-lab evaluate --offline")
    ckpt = Path(ns.checkpoint)
    if (ckpt / "adapter_config.json").exists():
        from peft import PeftModel

        base, tokenizer = load_model(run.model, dtype=_dtype(run.dtype))
        policy = PeftModel.from_pretrained(base, str(ckpt))
    else:
        policy, tokenizer = load_model(str(ckpt), dtype=_dtype(run.dtype))
    reference = load_model(run.ref_model or run.model, dtype=_dtype(run.dtype))[0]
    train, evals = _datasets(run, cfg.seed)
    data = evals if evals is not None else train
    trainer = ShiQTrainer(model=policy, args=cfg, eval_dataset=data, processing_class=tokenizer, ref_model=reference)
    del reference
    with torch.no_grad():
        metrics = trainer.evaluate()
    print(json.dumps(metrics, indent=1))
    return 0


def _evaluate(argv: list[str]) -> int:
    if "--offline" in argv:
        return _evaluate_offline([a for a in argv if a != "--offline"])
    try:
        from .evaluation import cli_main  # task evaluation (sampling, rewards, KL of generations)
    except ImportError:
        cli_main = None
    if cli_main is None:
        return _evaluate_offline(argv)
    return int(cli_main(argv) or 0)


def _models(argv: list[str]) -> int:
    from .models import MODEL_BUILDERS, cache_dir, model_folder

    parser = argparse.ArgumentParser(prog="shiq-lab models", description="registered models (built once, offline)")
    sub = parser.add_subparsers(dest="cmd")
    fetch = sub.add_parser("fetch", help="build / convert a registered model into the local cache")
    fetch.add_argument("names", nargs="+", help=f"one of: {', '.join(MODEL_BUILDERS)}")
    fetch.add_argument("--rebuild", action="store_true")
    sub.add_parser("list", help="registered models and whether they are built")
    args = parser.parse_args(argv)
    if args.cmd in (None, "list"):  # `shiq-lab models` alone lists them
        for name in MODEL_BUILDERS:
            built = (cache_dir() / "models" / name / ".complete").exists()
            print(f"{name:16s} {'built' if built else 'not built'}")
        return 0
    for name in args.names:
        if name not in MODEL_BUILDERS:
            raise SystemExit(f"unknown model {name!r}; registered: {', '.join(MODEL_BUILDERS)}")
        if name == "smollm2-135m":
            from .assets import fetch as fetch_asset

            fetch_asset("smollm2")
        print(f"{name}: {model_folder(name, rebuild=args.rebuild)}")
    return 0


COMMANDS = {
    "train": (_train, "fine-tune with ShiQ / DPO / DRO / CoPG from a YAML config"),
    "precompute-ref": (_precompute, "compute and cache the reference statistics of a config's data"),
    "evaluate": (_evaluate, "evaluate a checkpoint (task evaluation, or --offline loss metrics)"),
    "models": (_models, "fetch / list registered models"),
}


def _usage() -> str:
    lines = ["usage: shiq-lab COMMAND [--config FILE] [--field value ...]", "", "commands:"]
    lines += [f"  {name:15s} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`shiq-lab COMMAND --help` lists every field."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shiq-lab``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"shiq-lab: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from shiq_lab.train.progress import quiet_library_bars

    with quiet_library_bars():  # the training bar and its log lines, not one bar per dataset map or model save
        return COMMANDS[cmd][0](rest)


if __name__ == "__main__":
    sys.exit(main())
