"""``imdb-small``: a small Llama-shaped LM pretrained here, in about a minute of CPU, on the IMDB train reviews.

It is the reference model of the CPU-scale IMDB task: unlike ``tiny`` (random weights), it writes
review-like text, so a sentiment reward has something to grade. The recipe:

1. a byte-level BPE tokenizer (:func:`shiq_lab.infra.models.train_tokenizer`) trained on train reviews;
2. every train review (cleaned, followed by EOS) tokenized and packed into ``block_size`` blocks;
3. next-token training with AdamW, linear warm-up and cosine decay; the held-out loss on test
   reviews is measured at the end and stored with the checkpoint (``pretrain.json``).

Importing this module registers ``imdb-small`` with :func:`shiq_lab.infra.models.register_model` (built
with :data:`QUICK`); :data:`FULL` is the "real" setting (a few minutes on a GPU, ~1 h on a CPU):

    python -m shiq_lab.tasks.imdb.lm --preset full --out checkpoints/imdb-small-full
    # then load_model("checkpoints/imdb-small-full")
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from shiq_lab.infra.models import build_tiny_model, register_model, train_tokenizer
from shiq_lab.infra.runtime import cpu_threads

__all__ = ["ImdbLMConfig", "QUICK", "FULL", "PRESETS", "pretrain_imdb_lm", "build_imdb_small"]


@dataclass(frozen=True)
class ImdbLMConfig:
    """Size and pretraining budget of the IMDB LM."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    block_size: int = 64  # tokens per training sequence
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    tokenizer_reviews: int = 3000  # train reviews the tokenizer is learnt from
    max_reviews: int | None = 3000  # train reviews tokenized for pretraining (None: all 20k)
    eval_reviews: int = 300  # held-out reviews for the final loss
    device: str = "cpu"
    cpu_threads: int | None = 1  # on the CPU: one thread is fastest at this size (None: torch's setting)
    seed: int = 0


#: the registry's ``imdb-small``: ~1 min on one CPU core, held-out loss ~5 nats/token
QUICK = ImdbLMConfig()
#: the real setting: a wider, deeper model trained ~25x longer (use ``--device cuda``)
FULL = ImdbLMConfig(vocab_size=8192, hidden_size=256, num_layers=6, num_heads=8, block_size=128,
                    batch_size=64, steps=4000, lr=1e-3, warmup_steps=200, tokenizer_reviews=20000,
                    max_reviews=None)
PRESETS = {"quick": QUICK, "full": FULL}


def _lr_at(step: int, config: ImdbLMConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _pack(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """[N, block_size] blocks of the concatenated token stream, each review followed by EOS."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [t for review in ids for t in (*review, tokenizer.eos_token_id)]
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens: too little text for one block of {block_size}")
    return torch.tensor(stream[: n * block_size]).view(n, block_size)


@torch.no_grad()
def _mean_loss(model, blocks: torch.Tensor, device: str, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(blocks), batch_size):
        batch = blocks[k:k + batch_size].to(device)
        out = model(input_ids=batch, labels=batch)
        total += float(out.loss) * len(batch)
        count += len(batch)
    model.train()
    return total / count


def pretrain_imdb_lm(folder: str | Path, config: ImdbLMConfig = QUICK, *, log_every: int = 50, verbose: bool = False) -> dict:
    """Train tokenizer and model on the IMDB train reviews and save both into ``folder``.

    Returns (and writes to ``folder/pretrain.json``) the config, the training-loss curve, the
    held-out loss on test reviews and the seconds it took.
    """
    with cpu_threads(config.cpu_threads if config.device == "cpu" else None):
        return _pretrain(Path(folder), config, log_every=log_every, verbose=verbose)


def _pretrain(folder: Path, config: ImdbLMConfig, *, log_every: int, verbose: bool) -> dict:
    from shiq_lab.tasks.imdb.reviews import split_reviews

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    split = split_reviews()
    train = split.train.sample(frac=1.0, random_state=config.seed)
    if config.max_reviews is not None:
        train = train.iloc[: config.max_reviews]
    tokenizer = train_tokenizer(list(train["text"].iloc[: config.tokenizer_reviews]), vocab_size=config.vocab_size)
    blocks = _pack(tokenizer, list(train["text"]), config.block_size)
    held_out = _pack(tokenizer, list(split.test["text"].iloc[: config.eval_reviews]), config.block_size)

    model = build_tiny_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, max_positions=max(512, config.block_size), seed=config.seed)
    model.to(config.device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(config.seed)
    curve = []
    order = torch.randperm(len(blocks), generator=gen)
    cursor = 0
    for step in range(config.steps):
        if cursor + config.batch_size > len(order):  # next epoch
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor:cursor + config.batch_size]].to(config.device)
        cursor += config.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == config.steps - 1:
            curve.append({"step": step, "loss": loss.item()})
            if verbose:
                print(f"step {step:5d}  loss {float(loss):.3f}", flush=True)
    report = {
        "config": asdict(config),
        "curve": curve,
        "heldout_loss": _mean_loss(model, held_out, config.device),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_train_blocks": len(blocks),
        "epochs": config.steps * config.batch_size / len(blocks),
        "seconds": round(time.perf_counter() - start, 1),
    }
    model.to("cpu").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pretrain.json").write_text(json.dumps(report, indent=2))
    return report


def build_imdb_small(folder: Path) -> None:
    """Registry builder of ``imdb-small`` (the :data:`QUICK` preset, on the CPU)."""
    pretrain_imdb_lm(folder, QUICK)


register_model("imdb-small", build_imdb_small)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shiq_lab.tasks.imdb.lm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: the preset's, cpu)")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.device is not None:
        config = replace(config, device=args.device)
    report = pretrain_imdb_lm(args.out, config, verbose=True)
    print(f"held-out loss {report['heldout_loss']:.3f} nats/token; {report['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
