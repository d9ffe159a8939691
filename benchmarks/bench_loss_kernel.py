"""Benchmark the ShiQ loss kernel against plain supervised fine-tuning's cross-entropy (issue 6).

Forward + backward from the final hidden states and the output layer, on the same inputs
(hidden [B, T, H], weight [V, H], SmolLM2's V = 49152 and H = 576, T = 512):

- ``sft_ce``: ``F.cross_entropy(hidden @ W.T, targets)``, the SFT baseline (PyTorch).
- ``shiq_naive``: ``token_logprobs(hidden @ W.T, actions)`` + ``shiq_loss`` (full fp32 logits).
- ``shiq_fused``: ``chunked_token_logprobs(hidden, W, actions)`` + ``shiq_loss`` (tiles only).
- ``shiq_compiled`` (``--compiled``): the same kernel with its per-tile steps through ``torch.compile``.

Goals: time(shiq_fused) <= 1.1 x time(sft_ce); extra peak memory(shiq_fused) <= 0.25 x that of
shiq_naive. Every response token is a policy token (mask all ones), so the three compute the same
N x V logits. A scaling sweep over T and V shows linear growth and the largest tensor allocated.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_loss_kernel --threads 2        # full, a few minutes
    .venv/bin/python -m benchmarks.bench_loss_kernel --quick            # tiny smoke run, seconds
    .venv/bin/python -m benchmarks.bench_loss_kernel --compiled ...     # add the torch.compile'd kernel

It writes ``benchmarks/results/loss_kernel.json`` (every number and the machine) and ``.md``.
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
    add_common_args,
    check_common_args,
    fmt_bytes,
    iqr_text,
    markdown_table,
    publish,
    repeat_summary,
    start_run,
)
from benchmarks.kernel_cases import (
    BETA,
    MATMUL_FLOOR,
    METHOD_NAMES,
    compiled_available,
    kernel_table,
    liger_available,
    make_problem,
    run_case,
)

TIME_GOAL = 1.1  # time(shiq_fused) / time(sft_ce)
MEMORY_GOAL = 0.25  # extra peak memory(shiq_fused) / extra peak memory(shiq_naive)
LIGER_TIME_GOAL = 1.4  # time(shiq_fused) / time(liger_flce), trained output layer (GPU; floor 4/3)
LIGER_MEMORY_GOAL = 1.0  # peak memory(shiq_fused) / peak memory(liger_flce)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _main_rows(rows: list[dict[str, Any]], clock: str) -> str:
    other = "wall_s" if clock == "cpu_s" else "cpu_s"
    table = []
    for r in rows:
        t, m, q = r["times"], r["memory"], r["ratios"]
        table.append({
            "B x T": f"{r['batch']} x {r['seq_len']}", "V": r["vocab"],
            "output layer": "frozen" if r["frozen_head"] else "trained",
            "SFT CE (s)": f"{t['sft_ce'][clock]['median']:.3f}", "naive ShiQ (s)": f"{t['shiq_naive'][clock]['median']:.3f}",
            "fused ShiQ (s)": f"{t['shiq_fused'][clock]['median']:.3f}",
            "fused / SFT time": iqr_text(q["time_fused_over_sft"][clock]),
            f"fused / SFT ({other[:-2]} clock)": iqr_text(q["time_fused_over_sft"][other]),
            "naive / SFT time": f"{q['time_naive_over_sft'][clock]['median']:.3f}",
            "peak mem SFT / naive / fused": " / ".join(fmt_bytes(m[k]["peak_bytes"]) for k in METHOD_NAMES),
            "fused / naive peak mem": f"{q['peak_memory_fused_over_naive']:.3f}",
            "fused / naive working mem": f"{q['working_memory_fused_over_naive']:.3f}",
        })
        if "time_compiled_over_sft" in q:
            table[-1].update({"compiled ShiQ (s)": f"{t['shiq_compiled'][clock]['median']:.3f}",
                              "compiled / SFT time": iqr_text(q["time_compiled_over_sft"][clock]),
                              "compiled / fused time": iqr_text(q["time_compiled_over_fused"][clock]),
                              "compiled / naive peak mem": f"{q['peak_memory_compiled_over_naive']:.3f}"})
        if "time_fused_over_liger" in q:
            table[-1].update({"Liger FLCE (s)": f"{t['liger_flce'][clock]['median']:.4f}",
                              "fused / Liger time": iqr_text(q["time_fused_over_liger"][clock]),
                              "fused / Liger peak mem": f"{q['peak_memory_fused_over_liger']:.3f}"})
        if "time_compiled_over_liger" in q:
            table[-1].update({"compiled / Liger time": iqr_text(q["time_compiled_over_liger"][clock]),
                              "compiled / Liger peak mem": f"{q['peak_memory_compiled_over_liger']:.3f}"})
    return markdown_table(table, list(table[0]))


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head = payload["machine"], payload["settings"], payload["headline"]
    clock = head["clock"]
    clock_words = ("process CPU time (one torch thread: the wall time of an idle machine, robust to other "
                   "processes sharing the cores)" if clock == "cpu_s" else "wall-clock time")
    lines = [
        "# Loss kernel: ShiQ vs SFT cross-entropy (forward + backward)",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}, torch {mi['torch']}, "
        f"{mi['torch_threads']} torch thread(s), load average {mi.get('loadavg_1m_5m_15m')} at the start. "
        f"Load average at the end: {mi.get('loadavg_end')}. "
        f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up; times are {clock_words}, medians; ratios "
        f"are medians of per-round ratios [quartiles]. Memory: peak bytes allocated by torch during one step above the inputs "
        f"(includes the gradients the step leaves, {fmt_bytes(payload['main'][0]['memory']['shiq_fused']['retained_bytes'])} "
        f"in the first row); working = peak minus what the step leaves behind.",
        "",
        f"Headline (first row's case, median over {head['time_fused_over_sft_repeats']['n']} runs of "
        f"{s['rounds']} rounds, quartiles [{head['time_fused_over_sft_repeats']['q1']:.3f}, "
        f"{head['time_fused_over_sft_repeats']['q3']:.3f}]): fused / SFT time = "
        f"**{head['time_fused_over_sft']:.3f}** (goal <= {TIME_GOAL}: "
        f"{'met' if head['meets_time_goal'] else 'NOT met'}); fused / naive extra peak memory = "
        f"**{head['peak_memory_fused_over_naive']:.3f}** (goal <= {MEMORY_GOAL}: "
        f"{'met' if head['meets_memory_goal'] else 'NOT met'}).",
        "",
        *([f"Against Liger's fused linear cross-entropy (first row): fused ShiQ / Liger time = "
           f"**{head['time_fused_over_liger']:.3f}** (goal <= {LIGER_TIME_GOAL}: "
           f"{'met' if head['meets_liger_time_goal'] else 'NOT met'}; floor {MATMUL_FLOOR:.3f} = 4/3 output-layer "
           f"matmuls, measured / floor = {head['time_fused_over_liger'] / MATMUL_FLOOR:.3f}); peak memory = "
           f"**{head['peak_memory_fused_over_liger']:.3f}** (goal <= {LIGER_MEMORY_GOAL}: "
           f"{'met' if head['meets_liger_memory_goal'] else 'NOT met'}).", ""] if "time_fused_over_liger" in head else []),
        *([f"Compiled kernel (`compiled=True`: the same per-tile steps through torch.compile), first row's case, "
           f"median over {head['time_compiled_over_sft_repeats']['n']} runs: compiled / SFT time = "
           f"**{head['time_compiled_over_sft']:.3f}** (quartiles [{head['time_compiled_over_sft_repeats']['q1']:.3f}, "
           f"{head['time_compiled_over_sft_repeats']['q3']:.3f}]), compiled / plain fused time = "
           f"**{head['time_compiled_over_fused']:.3f}**"
           + (f"; compiled / Liger time = **{head['time_compiled_over_liger']:.3f}** (goal <= {LIGER_TIME_GOAL}: "
              f"{'met' if head['meets_liger_time_goal_compiled'] else 'NOT met'}; measured / floor = "
              f"{head['time_compiled_over_liger'] / MATMUL_FLOOR:.3f}), peak memory = "
              f"**{head['peak_memory_compiled_over_liger']:.3f}** (goal <= {LIGER_MEMORY_GOAL}: "
              f"{'met' if head['meets_liger_memory_goal_compiled'] else 'NOT met'})"
              if "time_compiled_over_liger" in head else "") + ".", ""]
          if "time_compiled_over_sft" in head else []),
        _main_rows(payload["main"], clock),
        "",
        "Fused vs naive ShiQ on the same inputs (largest relative difference): "
        + "; ".join(f"{k}={v:.1e}" for k, v in payload["main"][0].get("check", {}).items()),
    ]
    for key, title in (("seq_len", "Scaling with sequence length"), ("vocab", "Scaling with vocabulary")):
        if payload["scaling"].get(key):
            lines += ["", f"## {title} (B = 1, trained output layer)", "", kernel_table(payload["scaling"][key], clock)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, name="loss_kernel", threads=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="batch sizes of the main table")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576, help="H (SmolLM2-135M: 576)")
    ap.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5,
                    help="runs of the headline case (each --rounds interleaved rounds): the spread across runs")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="hidden states and output layer")
    ap.add_argument("--liger", action="store_true",
                    help="add Liger's fused linear cross-entropy (CUDA with liger-kernel; skipped with a note otherwise)")
    ap.add_argument("--compiled", action="store_true",
                    help="add the kernel with its per-tile steps through torch.compile (inductor: triton on CUDA, "
                         "a C++ compiler on CPU)")
    ap.add_argument("--no-frozen", action="store_true", help="skip the frozen-output-layer row")
    ap.add_argument("--no-scaling", action="store_true", help="skip the T and V sweeps")
    ap.add_argument("--scaling-seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--scaling-vocabs", type=int, nargs="+", default=[8192, 16384, 32768, 49152])
    ap.add_argument("--scaling-rounds", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=None, help="fused kernel's tokens per tile (default: auto)")
    ap.add_argument("--vocab-chunk-size", type=int, default=None, help="fused kernel's vocabulary per tile (default: auto)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.hidden, args.vocab = [2], 48, 32, 1000
        args.rounds, args.warmup, args.scaling_rounds, args.repeats = 2, 1, 1, 2
        args.scaling_seq_lens, args.scaling_vocabs = [16, 32, 64], [500, 1000, 2000]
        args.vocab_chunk_size = args.vocab_chunk_size or 256  # tiles smaller than the logits, as at full size
    return check_common_args(ap, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    liger = args.liger and liger_available(device)
    if args.liger and not liger:
        print(f"--liger: Liger's kernel needs CUDA and liger-kernel (device {device}): skipped", flush=True)
    compiled_requested = args.compiled
    if args.compiled and not compiled_available(device):
        print("--compiled: the compiled kernel cannot run here (reason above): skipped", flush=True)
        args.compiled = False
    dims = {"hidden": args.hidden, "device": device, "dtype": DTYPES[args.dtype]}
    tile = {"chunk_size": args.chunk_size, "vocab_chunk_size": args.vocab_chunk_size}

    main_rows = []
    configs = [(b, False) for b in args.batch] + ([] if args.no_frozen else [(args.batch[0], True)])
    for b, frozen in configs:
        p = make_problem(b, args.seq_len, vocab=args.vocab, frozen_head=frozen, **dims)
        main_rows.append(run_case(p, rounds=args.rounds, warmup=args.warmup, device=device, tile=tile,
                                  liger=liger and not frozen, compiled=args.compiled))
        print(f"B={b} frozen={frozen}: fused/SFT time {main_rows[-1]['ratios']['time_fused_over_sft'][clock]['median']:.3f}, "
              f"fused/naive peak memory {main_rows[-1]['ratios']['peak_memory_fused_over_naive']:.3f}", flush=True)

    scaling: dict[str, list[dict[str, Any]]] = {"seq_len": [], "vocab": []}
    if not args.no_scaling:
        for key, values in (("seq_len", args.scaling_seq_lens), ("vocab", args.scaling_vocabs)):
            for x in values:
                t, v = (x, args.vocab) if key == "seq_len" else (args.seq_len, x)
                p = make_problem(1, t, vocab=v, **dims)
                scaling[key].append(run_case(p, rounds=args.scaling_rounds, warmup=1, device=device, check=False,
                                             tile=tile, liger=liger, compiled=args.compiled))
                print(f"scaling T={t} V={v} done", flush=True)

    first = main_rows[0]
    # the headline case again, ``--repeats - 1`` more times: its ratios' spread across runs, not only within one
    keys = [k for k in ("time_fused_over_sft", "time_fused_over_liger", "time_compiled_over_sft",
                        "time_compiled_over_fused", "time_compiled_over_liger") if k in first["ratios"]]
    runs = {k: [first["ratios"][k][clock]["median"]] for k in keys}
    for r in range(1, args.repeats):
        p = make_problem(args.batch[0], args.seq_len, vocab=args.vocab, seed=r, **dims)
        again = run_case(p, rounds=args.rounds, warmup=args.warmup, device=device, check=False, tile=tile, liger=liger,
                         compiled=args.compiled)
        for k in keys:
            runs[k].append(again["ratios"][k][clock]["median"])
        print(f"repeat {r + 1}/{args.repeats}: fused/SFT time {runs['time_fused_over_sft'][-1]:.3f}", flush=True)
    repeats = {k: repeat_summary(v) for k, v in runs.items()}
    headline = {
        "config": {k: first[k] for k in ("batch", "seq_len", "hidden", "vocab", "frozen_head")},
        "clock": clock,
        # the goal is judged on the median over the repeats (the first run's alone with --repeats 1)
        "time_fused_over_sft": repeats["time_fused_over_sft"]["median"],
        "time_fused_over_sft_repeats": repeats["time_fused_over_sft"],
        "peak_memory_fused_over_naive": first["ratios"]["peak_memory_fused_over_naive"],
        "working_memory_fused_over_naive": first["ratios"]["working_memory_fused_over_naive"],
    }
    headline["meets_time_goal"] = headline["time_fused_over_sft"] <= TIME_GOAL
    headline["meets_memory_goal"] = headline["peak_memory_fused_over_naive"] <= MEMORY_GOAL
    if "time_fused_over_liger" in first["ratios"]:
        headline["time_fused_over_liger"] = repeats["time_fused_over_liger"]["median"]
        headline["time_fused_over_liger_iqr"] = first["ratios"]["time_fused_over_liger"][clock]
        headline["time_fused_over_liger_repeats"] = repeats["time_fused_over_liger"]
        headline["peak_memory_fused_over_liger"] = first["ratios"]["peak_memory_fused_over_liger"]
        headline["matmul_floor"] = MATMUL_FLOOR
        headline["meets_liger_time_goal"] = headline["time_fused_over_liger"] <= LIGER_TIME_GOAL
        headline["meets_liger_memory_goal"] = headline["peak_memory_fused_over_liger"] <= LIGER_MEMORY_GOAL
    if "time_compiled_over_sft" in first["ratios"]:
        for k in ("time_compiled_over_sft", "time_compiled_over_fused"):
            headline[k] = repeats[k]["median"]
            headline[f"{k}_repeats"] = repeats[k]
        headline["peak_memory_compiled_over_naive"] = first["ratios"]["peak_memory_compiled_over_naive"]
    if "time_compiled_over_liger" in first["ratios"]:
        headline["time_compiled_over_liger"] = repeats["time_compiled_over_liger"]["median"]
        headline["time_compiled_over_liger_iqr"] = first["ratios"]["time_compiled_over_liger"][clock]
        headline["time_compiled_over_liger_repeats"] = repeats["time_compiled_over_liger"]
        headline["peak_memory_compiled_over_liger"] = first["ratios"]["peak_memory_compiled_over_liger"]
        headline["meets_liger_time_goal_compiled"] = headline["time_compiled_over_liger"] <= LIGER_TIME_GOAL
        headline["meets_liger_memory_goal_compiled"] = headline["peak_memory_compiled_over_liger"] <= LIGER_MEMORY_GOAL
    payload = {
        "benchmark": "loss_kernel",
        "quick": args.quick,
        "goals": {"time_fused_over_sft_max": TIME_GOAL, "peak_memory_fused_over_naive_max": MEMORY_GOAL,
                  "time_fused_over_liger_max": LIGER_TIME_GOAL, "peak_memory_fused_over_liger_max": LIGER_MEMORY_GOAL},
        "machine": machine,
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "scaling_rounds": args.scaling_rounds,
                     "dtype": args.dtype, "liger": liger, "compiled": args.compiled, "compiled_requested": compiled_requested, "repeats": args.repeats, "beta": BETA, "threads": torch.get_num_threads(), "tile_args": tile},
        "headline": headline,
        "main": main_rows,
        "scaling": scaling,
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
