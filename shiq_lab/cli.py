"""The ``shiq-lab`` command line.

::

    shiq-lab train --config configs/train/tiny_cpu.yaml [--beta 0.2 --loss_type dpo ...]
    shiq-lab precompute-ref --config configs/train/tiny_cpu.yaml [--output DIR]
    shiq-lab evaluate [...]
    shiq-lab models [list]                     # registered models and whether they are built
    shiq-lab models fetch NAME [NAME ...]

Every field of the YAML config is also a flag, and a flag overrides the file. The fields are those
of :class:`RunArguments` (model, data, LoRA) and of :class:`shiq_lab.train.config.ShiQConfig` (all of
``transformers.TrainingArguments`` plus the ShiQ fields); ``shiq-lab train --help`` lists them.

``evaluate`` runs a task's evaluator (``--task imdb`` by default: sampling, rewards, KL of generations,
registered by :mod:`shiq_lab.tasks.imdb`); with ``--offline`` it computes the loss metrics of a checkpoint
on a dataset (``--config`` + ``--checkpoint``). Tasks may add sub-commands (:mod:`shiq_lab.infra.registry`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shiq_lab.infra.config import report_errors
from shiq_lab.train.config import RunArguments, ShiQConfig

__all__ = ["RunArguments", "parse_config", "build_run", "main"]




def parse_config(argv: list[str], *, extra: argparse.ArgumentParser | None = None,
                 prog: str = "shiq-lab train") -> tuple[RunArguments, ShiQConfig, argparse.Namespace]:
    """``(RunArguments, ShiQConfig, extra namespace)`` from ``--config FILE`` and flags (flags win)."""
    from shiq_lab.infra.config import parse_config as parse

    extra_ns = argparse.Namespace()
    if extra is not None and ("-h" in argv or "--help" in argv):
        parse((RunArguments, ShiQConfig), argv, prog=prog, parents=[extra])  # one list of every flag, extra ones too
    if extra is not None:
        extra_ns, argv = extra.parse_known_args(argv)
    run, cfg = parse((RunArguments, ShiQConfig), argv, prog=prog)
    from shiq_lab.train.validation import validate_run

    validate_run(run)  # ranges of the model / data / LoRA fields (issue 12)
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
    from shiq_lab.data.batch import split_by_prompt
    from shiq_lab.data.formats import load_dataset_spec

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
    from shiq_lab.infra.models import load_model
    from shiq_lab.train.trainer import ShiQTrainer

    model, tokenizer = load_model(run.model, dtype=_dtype(run.dtype))
    ref = load_model(run.ref_model, dtype=_dtype(run.dtype))[0] if run.ref_model else None
    train, evals = _datasets(run, cfg.seed)
    return ShiQTrainer(model=model, args=cfg, train_dataset=train if with_train else None, eval_dataset=evals,
                       processing_class=tokenizer, ref_model=ref, peft_config=_lora_config(run))


# ---------------------------------------------------------------------------------------------
# sub-commands
# ---------------------------------------------------------------------------------------------


def _train(argv: list[str]) -> int:
    from shiq_lab.train import runs

    run, cfg, _ = parse_config(argv)
    # output folder and resume checks before any model load, tokenisation or reference pass (issue 12)
    fields = runs.run_fields(run)
    resume = runs.preflight(cfg, fields)
    from shiq_lab.infra.models import resolve_model

    for name in (run.model, run.ref_model):  # a missing folder / mistyped name / unreachable hub: now, not later
        if name:
            resolve_model(name)
    trainer = build_run(run, cfg)
    result = trainer.train(resume_from_checkpoint=resume, run_fields=fields)
    trainer.save_model()
    if trainer.args.should_save:
        target = Path(cfg.output_dir) / "log_history.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        os.replace(tmp, target)  # never a half-written history
        print(f"trained {result.global_step} steps, final train loss {result.training_loss:.6g}; model in {cfg.output_dir}")
    # Leave the process group cleanly: release the trainer and accelerate's references to the wrapped model (which
    # hold the group) while every rank still has the group, then meet and destroy it. Left to interpreter teardown,
    # a rank of a 2-process gloo run hung or aborted in the destructors ("terminate called without an active
    # exception") in 2 of 20 runs here; 0 of 20 this way
    accelerator = trainer.accelerator
    del trainer, result
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _precompute(argv: list[str]) -> int:
    from shiq_lab.data.encode import tokenize_dataset
    from shiq_lab.infra.models import load_model
    from shiq_lab.reference.cache import (
        ReferenceCache,
        dataset_fingerprint,
        precompute_reference,
        reference_identity,
        write_reference_stats,
    )
    from shiq_lab.train.trainer import autocast_dtype

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
                               preference_rewards=(cfg.chosen_reward, cfg.rejected_reward),
                               allow_zero_rewards=cfg.allow_zero_rewards)
        kwargs = dict(batch_size=cfg.ref_batch_size, chunk_size=cfg.logits_chunk_size, logits_mode=cfg.logits_mode,
                      autocast_dtype=autocast_dtype(cfg), cast_lm_head_to_fp32=cfg.cast_lm_head_to_fp32)
        if ns.output and split == "train":
            where = write_reference_stats(ns.output, model, tok, reference_id=cfg.reference_id, **kwargs)
        else:
            precompute_reference(model, tok, cache_dir=cfg.ref_cache_dir, reference_id=cfg.reference_id, **kwargs)
            cache = ReferenceCache(cfg.ref_cache_dir)
            ident = reference_identity(model, cfg.reference_id, autocast_dtype(cfg),
                                       cast_lm_head_to_fp32=cfg.cast_lm_head_to_fp32, logits_mode=cfg.logits_mode)
            where = cache.path(cache.key(dataset_fingerprint(tok), ident))
            if not where.exists():  # a read-only cache: computed in memory only (the cache warned why)
                print(f"reference statistics ({split}, {len(tok)} rows, reference {ref_name}): computed but NOT "
                      f"cached ({where.parent} is not writable; --output DIR writes them elsewhere)")
                continue
        print(f"reference statistics ({split}, {len(tok)} rows, reference {ref_name}): {where}")
    return 0


def _evaluate_offline(argv: list[str]) -> int:
    import torch

    from shiq_lab.infra.models import load_model
    from shiq_lab.train.trainer import ShiQTrainer

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
    from shiq_lab.infra.registry import EVALUATORS, load_tasks

    load_tasks()
    task = "imdb"  # the one task with a generation evaluator today; `--task NAME` picks another
    if "--task" in argv:
        i = argv.index("--task")
        task, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if task not in EVALUATORS:
        raise SystemExit(f"no evaluator for task {task!r}; tasks with one: {', '.join(sorted(EVALUATORS))}")
    return int(EVALUATORS[task](argv) or 0)


def _models(argv: list[str]) -> int:
    from shiq_lab.infra.models import MODEL_BUILDERS, cache_dir, model_folder, registered_models

    registered_models()  # tasks' models too

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
            from shiq_lab.infra.assets import fetch as fetch_asset

            fetch_asset("smollm2")
        print(f"{name}: {model_folder(name, rebuild=args.rebuild)}")
    return 0


COMMANDS = {
    "train": (_train, "fine-tune with ShiQ / DPO / DRO / CoPG from a YAML config"),
    "precompute-ref": (_precompute, "compute and cache the reference statistics of a config's data"),
    "evaluate": (_evaluate, "evaluate a checkpoint (task evaluation, or --offline loss metrics)"),
    "models": (_models, "fetch / list registered models"),
}


def _commands() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    """The core's sub-commands, then those tasks register."""
    from shiq_lab.infra.registry import COMMANDS as TASK_COMMANDS
    from shiq_lab.infra.registry import load_tasks

    load_tasks()
    return {**COMMANDS, **{k: v for k, v in TASK_COMMANDS.items() if k not in COMMANDS}}


def _usage() -> str:
    lines = ["usage: shiq-lab COMMAND [--config FILE] [--field value ...]", "", "commands:"]
    lines += [f"  {name:15s} {help_}" for name, (_, help_) in _commands().items()]
    lines += ["", "`shiq-lab COMMAND --help` lists every field."]
    return "\n".join(lines)


@report_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``shiq-lab``.

    The project's own errors (:class:`shiq_lab.errors.ShiQLabError`: bad data, stale caches, config,
    models, run folders) print as one message on stderr with exit code 2; ``--debug`` (anywhere on
    the line) or ``SHIQ_LAB_DEBUG=1`` shows the traceback instead (:func:`shiq_lab.errors.report_errors`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    commands = COMMANDS if cmd in COMMANDS else _commands()
    if cmd not in commands:
        print(f"shiq-lab: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from shiq_lab.train.progress import quiet_library_bars

    with quiet_library_bars():  # the training bar and its log lines, not one bar per dataset map or model save
        return commands[cmd][0](rest)


if __name__ == "__main__":
    sys.exit(main())
