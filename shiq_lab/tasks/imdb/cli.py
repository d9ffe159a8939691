"""``shiq-lab evaluate``: the IMDB reward-KL frontier of a run's checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from shiq_lab.evaluation.frontier import (
    CheckpointSpec,
    _checkpoint_meta,
    evaluate_checkpoints,
    find_checkpoints,
    save_frontier,
)
from shiq_lab.infra.registry import register_evaluator
from shiq_lab.infra.runtime import cpu_threads

# ----------------------------------------------------------------------------------------------
# command line: shiq-lab evaluate
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shiq-lab evaluate", description=(
        "Reward and KL(pi||pi_ref) of fresh generations on held-out IMDB prompts, for each checkpoint; "
        "writes the frontier (CSV, JSON, HTML). Use --offline for the loss metrics of a checkpoint on a dataset."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", help="model folders to evaluate")
    src.add_argument("--run_dir", help="evaluate every model folder below this one (checkpoint-*, final models)")
    p.add_argument("--reference", default=None, help="reference model: registered name, folder or hub id "
                   "(default: the 'model' field of the run's run.json)")
    p.add_argument("--n_prompts", type=int, default=64, help="held-out IMDB prompts (test side of the split)")
    p.add_argument("--n_words", type=int, default=8, help="words per prompt")
    p.add_argument("--samples_per_prompt", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every checkpoint)")
    p.add_argument("--prompt_seed", type=int, default=1, help="seed of the held-out prompt pick")
    p.add_argument("--reward", choices=("prob", "logit"), default="prob", help="P(positive) or its log-odds")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--cpu_threads", type=int, default=1, help="torch threads on the CPU (small models: 1 is fastest; 0 = torch's setting)")
    p.add_argument("--out", default=None, help="folder for frontier.csv/json/html (default: RUN_DIR/frontier or ./frontier)")
    return p


def _reference_name(specs: Sequence[CheckpointSpec]) -> str | None:
    for spec in specs:
        for candidate in (Path(spec.path) / "run.json", Path(spec.path).parent / "run.json"):
            if candidate.exists():
                model = json.loads(candidate.read_text()).get("model")
                if model:
                    return str(model)
    return None


def cli_main(argv: list[str] | None = None) -> int:
    """``shiq-lab evaluate``: the frontier of some checkpoints on held-out IMDB prompts."""
    from shiq_lab.infra.models import load_model
    from shiq_lab.tasks.imdb import lm as imdb_model  # noqa: F401 -- registers imdb-small
    from shiq_lab.tasks.imdb.reviews import imdb_prompts
    from shiq_lab.tasks.imdb.reward import SentimentReward, load_reward_model

    args = _parser().parse_args(argv)
    specs = find_checkpoints(args.run_dir) if args.run_dir else [
        CheckpointSpec(path=c, **{k: v for k, v in _checkpoint_meta(Path(c)).items() if k in ("loss_type", "beta", "step")})
        for c in args.checkpoints]
    missing = [s.path for s in specs if not Path(s.path).exists()]
    if missing:
        raise SystemExit(f"checkpoint folder(s) not found: {missing}")
    reference_name = args.reference or _reference_name(specs)
    if reference_name is None:
        raise SystemExit("--reference is needed: no run.json next to the checkpoints names the reference model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference, tokenizer = load_model(reference_name, device=device)
    reward = SentimentReward(load_reward_model(), kind=args.reward)
    prompts = imdb_prompts("test", args.n_prompts, n_words=args.n_words, seed=args.prompt_seed)
    with cpu_threads((args.cpu_threads or None) if device == "cpu" else None):
        frame = evaluate_checkpoints(specs, reference, tokenizer, prompts, reward,
                                     samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                     batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out) if args.out else (Path(args.run_dir) / "frontier" if args.run_dir else Path("frontier"))
    paths = save_frontier(frame, out)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(frame.drop(columns=["path"]).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"\nfrontier: {paths['csv']}  {paths['json']}  {paths.get('html', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())


register_evaluator("imdb", cli_main)
