"""Benchmark BFCL rollouts one trajectory at a time against batched rollouts (trajectories per second).

The same trajectories (``--episodes`` of the shortest BFCL-V3 ``base`` entries, ``--samples`` seeds each, at
temperature 1) are played by :func:`shiq_lab.tasks.bfcl.rollout.rollouts` with ``batch_size`` 1 (the old
one-at-a-time path: :func:`~shiq_lab.tasks.bfcl.rollout.rollout` is the batch of one) and with each of
``--batches``. Each trajectory draws from its own seeded generator, so every case plays the same trajectories
(checked: the call lists of every case are compared with batch 1's; a difference is reported, as floating-point
padding effects can move a draw in float32). The cases are interleaved round by round after a warm-up
(``benchmarks.common.interleaved_times``). Run from the repository root::

    .venv/bin/python -m benchmarks.bench_bfcl_rollout --model tiny --out-dir runs/bfcl_rollout       # seconds
    .venv/bin/python -m benchmarks.bench_bfcl_rollout --model smollm2-135m --out-dir runs/bfcl_rollout
    .venv/bin/python -m benchmarks.bench_bfcl_rollout --quick                                         # smoke run
    .venv/bin/python -m benchmarks.bench_bfcl_rollout --device cuda --model smollm2-135m --batches 8 32 64

It writes ``<out-dir>/bfcl_rollout_<model>.json`` and ``.md`` (default folder: ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    CLOCKS,
    add_common_args,
    check_common_args,
    interleaved_times,
    iqr_text,
    markdown_table,
    publish,
    ratio_summary,
    start_run,
    time_summary,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, name="", threads=1)
    ap.add_argument("--model", default="tiny", help="a model of shiq_lab.infra.models (tiny, smollm2-135m)")
    ap.add_argument("--episodes", type=int, default=4, help="shortest base entries played")
    ap.add_argument("--samples", type=int, default=2, help="trajectories (seeds) per entry")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="batch sizes compared with 1")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--docs", default="signatures", help="docs profile of the system prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.episodes, args.samples, args.batches, args.max_new_tokens = "tiny", 2, 2, [4], 4
        args.rounds, args.warmup = 1, 0
    args.name = args.name or f"bfcl_rollout_{args.model}"
    return check_common_args(ap, args)


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head, res = payload["machine"], payload["settings"], payload["headline"], payload["results"]
    clock = head["clock"]
    lines = [
        "# BFCL rollouts: one trajectory at a time vs batched",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Model `{s['model']}`; {s['trajectories']} trajectories ({s['episodes']} shortest `base` entries x "
        f"{s['samples']} seeds, {s['turns']} assistant turns in all), temperature 1, max {s['max_new_tokens']} new "
        f"tokens per turn, docs `{s['docs']}`. Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}, "
        f"torch {mi['torch']}, {mi['torch_threads']} torch thread(s), load {mi.get('loadavg_1m_5m_15m')} -> "
        f"{mi.get('loadavg_end')}. {s['rounds']} interleaved rounds after {s['warmup']} warm-up; clock `{clock}`; "
        "medians [quartiles].",
        "",
    ]
    rows = []
    for r in res.values():
        rows.append({"batch": r["batch_size"], "seconds": iqr_text(r["times"][clock]),
                     "trajectories/s": f"{r['trajectories_per_s']:.3f}",
                     "speed-up over batch 1": iqr_text(r["speedup"][clock]) if r.get("speedup") else "1",
                     "same calls as batch 1": r["same_calls_as_single"]})
    lines.append(markdown_table(rows, ["batch", "seconds", "trajectories/s", "speed-up over batch 1",
                                       "same calls as batch 1"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    from shiq_lab.infra.models import load_model
    from shiq_lab.tasks.bfcl import load_episodes
    from shiq_lab.tasks.bfcl.prompts import PromptConfig, system_prompt
    from shiq_lab.tasks.bfcl.rollout import rollouts

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=str(device))
    model.requires_grad_(False)
    config = PromptConfig(docs=args.docs)
    chosen = sorted(load_episodes("base"), key=lambda e: (len(system_prompt(e, config)) + sum(map(len, e.turns)), e.id))
    episodes = [e for e in chosen[: args.episodes] for _ in range(args.samples)]
    seeds = [args.seed + 1000 * i + s for i in range(args.episodes) for s in range(args.samples)]
    played: dict[str, list[Any]] = {}

    def case(batch_size: int):
        def fn() -> None:
            played[f"batch_{batch_size}"] = rollouts(model, tokenizer, episodes, seeds, config=config,
                                                      max_new_tokens=args.max_new_tokens, temperature=1.0,
                                                      batch_size=batch_size)
        return fn

    sizes = [1] + [b for b in args.batches if b != 1]
    cases = {f"batch_{b}": case(b) for b in sizes}
    times = interleaved_times(cases, rounds=args.rounds, warmup=args.warmup, device=device)
    single = [t.calls for t in played["batch_1"]]
    results: dict[str, Any] = {}
    for b in sizes:
        name = f"batch_{b}"
        t = {c: time_summary(times[name][c]) for c in CLOCKS}
        results[name] = {"batch_size": b, "times": t, "trajectories_per_s": len(episodes) / t[clock]["median"],
                         "same_calls_as_single": [x.calls for x in played[name]] == single}
        if b != 1:
            results[name]["speedup"] = {c: ratio_summary(times["batch_1"][c], times[name][c]) for c in CLOCKS}
    payload = {
        "benchmark": "bfcl_rollout",
        "quick": args.quick,
        "machine": machine,
        "settings": {"model": args.model, "episodes": args.episodes, "samples": args.samples,
                     "trajectories": len(episodes), "turns": sum(e.n_turns for e in episodes),
                     "episode_ids": [e.id for e in chosen[: args.episodes]], "max_new_tokens": args.max_new_tokens,
                     "docs": args.docs, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads},
        "headline": {"clock": clock, **{f"speedup_batch_{b}": results[f"batch_{b}"]["speedup"][clock]["median"]
                                        for b in sizes if b != 1}},
        "results": results,
        "raw_times": times,
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
