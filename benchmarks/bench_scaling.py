"""Scaling of the ShiQ loss and of a ShiQ training step with sequence length and vocabulary (issue 6).

Two sweeps, each over the sequence length T (vocabulary fixed) and over the vocabulary V (T fixed):

- **Loss kernel** (forward + backward from the final hidden states and the output layer, B = 1,
  the cases of ``benchmarks.kernel_cases``): PyTorch cross-entropy (``sft_ce``), ShiQ on full fp32 logits
  (``shiq_naive``) and the fused chunked kernel (``shiq_fused``). Time, peak torch memory and the
  largest temporary tensor.
- **Training step** (``benchmarks.lockstep``'s processes, the ``small`` model with its
  vocabulary set to V): ``ShiQTrainer`` vs plain SFT (``transformers.Trainer``), ``--step-batch``
  sequences of T tokens (a quarter prompt). Time, the peak torch memory and the largest tensor
  allocated during one optimizer step, and the process's peak RSS above the loaded model.

Every table gives the [B, T, V] fp32 logits' size next to the largest tensor, and the JSON a
log-log slope per series (1 = linear growth). Run from the repository root::

    .venv/bin/python -m benchmarks.bench_scaling --threads 1       # full, several minutes on CPU
    .venv/bin/python -m benchmarks.bench_scaling --quick           # smoke run (tests)

It writes ``benchmarks/results/scaling.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    CLOCKS,
    PRESETS,
    add_common_args,
    check_common_args,
    fmt_bytes,
    markdown_table,
    publish,
    save_model,
    start_run,
    time_summary,
)
from benchmarks.kernel_cases import METHOD_NAMES, kernel_table, make_problem, run_case
from benchmarks.lockstep import run_lockstep

STEP_CONFIGS = ("sft", "shiq")


def loglog_slope(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(size): 1 for linear growth, 2 for quadratic."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if s > 0 and v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


# ---------------------------------------------------------------------------------------------
# loss kernel
# ---------------------------------------------------------------------------------------------


def kernel_sweep(points: list[tuple[int, int]], *, hidden: int, rounds: int, warmup: int,
                 device: torch.device, clock: str, vocab_chunk_size: int | None = None) -> list[dict[str, Any]]:
    """``kernel_cases.run_case`` at each (T, V), B = 1, trained output layer (default tile unless given)."""
    rows = []
    tile = {"chunk_size": None, "vocab_chunk_size": vocab_chunk_size}
    for t, v in points:
        p = make_problem(1, t, hidden, v, device=device)
        row = run_case(p, rounds=rounds, warmup=warmup, device=device, check=False, tile=tile)
        full = row["full_logits_fp32_bytes"]
        row["no_full_logits"] = {m: row["memory"][m]["largest_temp_bytes"] < full for m in METHOD_NAMES}
        rows.append(row)
        print(f"kernel T={t} V={v}: " + ", ".join(f"{m} {row['times'][m][clock]['median']:.3f}s" for m in METHOD_NAMES),
              flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------------------


def step_point(seq_len: int, vocab: int, *, batch: int, preset: str, rounds: int, warmup: int, device: str,
               threads: int, seed: int) -> dict[str, Any]:
    """SFT and ShiQ steps at one (T, V), in lockstep processes; time and memory of each."""
    prompt = max(1, seq_len // 4)
    arch = {**PRESETS[preset], "vocab_size": vocab}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-model-") as model_dir:
        n_params = save_model(arch, model_dir, max_positions=seq_len, seed=seed)
        base = dict(model_dir=model_dir, batch=batch, prompt_len=prompt, completion_len=seq_len - prompt,
                    steps=warmup + rounds, device=device, bf16=False, threads=threads, seed=seed,
                    measure_memory=True, profile=False)
        times, reports = run_lockstep({c: {**base, "config": c} for c in STEP_CONFIGS}, rounds=rounds, warmup=warmup,
                                      log=False)
    full = batch * seq_len * vocab * 4
    out: dict[str, Any] = {"seq_len": seq_len, "vocab": vocab, "batch": batch, "n_params": n_params,
                           "full_logits_fp32_bytes": full, "configs": {}}
    for c in STEP_CONFIGS:
        mem = reports[c]["step_memory"]
        out["configs"][c] = {
            "times": {k: time_summary(times[c][k]) for k in CLOCKS},
            "tokens_per_step": reports[c]["tokens_per_step"],
            "step_memory": mem,
            "train_peak_rss_over_model_bytes": reports[c]["train_peak_rss_over_model_bytes"],
            "no_full_logits": mem["largest_alloc_bytes"] < full,
        }
    return out


def step_sweep(points: list[tuple[int, int]], clock: str, **kwargs: Any) -> list[dict[str, Any]]:
    rows = []
    for t, v in points:
        rows.append(step_point(t, v, **kwargs))
        c = rows[-1]["configs"]
        print(f"step T={t} V={v}: " + ", ".join(f"{k} {c[k]['times'][clock]['median']:.3f}s" for k in STEP_CONFIGS),
              flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def slopes(payload: dict[str, Any], clock: str) -> dict[str, Any]:
    """Log-log slopes of time and memory against T and V for every series."""
    out: dict[str, Any] = {"kernel": {}, "step": {}}
    for key in ("seq_len", "vocab"):
        rows = payload["kernel"][key]
        sizes = [r[key] for r in rows]
        out["kernel"][key] = {m: {"time": loglog_slope(sizes, [r["times"][m][clock]["median"] for r in rows]),
                                  "peak_memory": loglog_slope(sizes, [r["memory"][m]["peak_bytes"] for r in rows]),
                                  "working_memory": loglog_slope(sizes, [r["memory"][m]["working_bytes"] for r in rows])}
                              for m in METHOD_NAMES}
        rows = payload["step"][key]
        sizes = [r[key] for r in rows]
        out["step"][key] = {c: {"time": loglog_slope(sizes, [r["configs"][c]["times"][clock]["median"] for r in rows]),
                                "peak_memory": loglog_slope(sizes, [r["configs"][c]["step_memory"]["peak_bytes"]
                                                                    for r in rows])}
                            for c in STEP_CONFIGS}
    return out


def _step_table(rows: list[dict[str, Any]], clock: str) -> str:
    table = []
    for r in rows:
        c = r["configs"]
        tok = c["shiq"]["tokens_per_step"]
        table.append({
            "T": r["seq_len"], "V": r["vocab"], "[B,T,V] fp32": fmt_bytes(r["full_logits_fp32_bytes"]),
            **{f"{k} step (s)": f"{c[k]['times'][clock]['median']:.3f}" for k in STEP_CONFIGS},
            **{f"{k} ms/token": f"{1e3 * c[k]['times'][clock]['median'] / tok:.3f}" for k in STEP_CONFIGS},
            "SFT / ShiQ time": f"{c['sft']['times'][clock]['median'] / c['shiq']['times'][clock]['median']:.3f}",
            **{f"{k} torch peak": fmt_bytes(c[k]["step_memory"]["peak_bytes"]) for k in STEP_CONFIGS},
            **{f"{k} largest tensor": fmt_bytes(c[k]["step_memory"]["largest_alloc_bytes"]) for k in STEP_CONFIGS},
            **{f"{k} peak RSS above model": fmt_bytes(c[k]["train_peak_rss_over_model_bytes"]) for k in STEP_CONFIGS},
        })
    return markdown_table(table, list(table[0]))


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, sl = payload["machine"], payload["settings"], payload["slopes"]
    clock = payload["clock"]
    clock_words = "process CPU time (one torch thread)" if clock == "cpu_s" else "wall-clock time"
    lines = [
        "# Scaling with sequence length and vocabulary: ShiQ loss and training step",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}, torch {mi['torch']}, {s['threads']} "
        f"torch thread(s), load average {mi.get('loadavg_1m_5m_15m')} at the start, {mi.get('loadavg_end')} at the end. "
        f"Times: {clock_words}, medians over {s['kernel_rounds']} (kernel) / {s['step_rounds']} (step) interleaved rounds "
        f"after a warm-up. Memory: bytes torch allocates during one call (torch.profiler replay on CPU); the largest "
        f"temporary / tensor shows whether a [B, T, V] fp32 tensor exists.",
        "",
        "Log-log slopes (1 = linear growth):",
        "",
    ]
    slope_rows = []
    for part, names in (("kernel", METHOD_NAMES), ("step", STEP_CONFIGS)):
        for key in ("seq_len", "vocab"):
            for n in names:
                v = sl[part][key][n]
                if v["time"] is None:
                    continue
                slope_rows.append({"sweep": f"{part} over {'T' if key == 'seq_len' else 'V'}", "case": n,
                                   "time": f"{v['time']:.2f}" if v["time"] is not None else "n/a",
                                   "peak memory": f"{v['peak_memory']:.2f}" if v["peak_memory"] is not None else "n/a"})
    lines += [markdown_table(slope_rows, ["sweep", "case", "time", "peak memory"]), ""]
    lines += [f"## Loss kernel over T (B = 1, H = {s['hidden']}, V = {s['kernel_vocab']})", "",
              kernel_table(payload["kernel"]["seq_len"], clock), "",
              f"## Loss kernel over V (B = 1, H = {s['hidden']}, T = {s['kernel_seq_len']})", "",
              kernel_table(payload["kernel"]["vocab"], clock), ""]
    if not payload["step"]["seq_len"]:
        return "\n".join(lines)
    lines += [f"## Training step over T (preset `{s['preset']}`, B = {s['step_batch']}, V = {s['step_vocab']}, "
              f"a quarter of each sequence is prompt)", "",
              _step_table(payload["step"]["seq_len"], clock), "",
              f"## Training step over V (preset `{s['preset']}`, B = {s['step_batch']}, T = {s['step_seq_len']})", "",
              _step_table(payload["step"]["vocab"], clock), "",
              "Attention makes a whole step grow faster than linearly in T at long sequences (both trainers alike); "
              "the loss itself is linear in T and in V."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, name="scaling", threads=1)
    ap.add_argument("--hidden", type=int, default=256, help="kernel: H (the small preset's)")
    ap.add_argument("--kernel-seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--kernel-vocab", type=int, default=16384, help="kernel: V of the T sweep")
    ap.add_argument("--kernel-vocabs", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--kernel-seq-len", type=int, default=512, help="kernel: T of the V sweep")
    ap.add_argument("--kernel-rounds", type=int, default=2)
    ap.add_argument("--vocab-chunk-size", type=int, default=None, help="kernel: vocabulary per tile (default: auto)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="step: model (vocabulary swept)")
    # B * T > H everywhere, so that the [V, H] embedding gradient is never as large as the [B, T, V] logits
    ap.add_argument("--step-batch", type=int, default=4, help="step: sequences per step (even)")
    ap.add_argument("--step-seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--step-vocab", type=int, default=16384, help="step: V of the T sweep")
    ap.add_argument("--step-vocabs", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--step-seq-len", type=int, default=128, help="step: T of the V sweep")
    ap.add_argument("--step-rounds", type=int, default=2)
    ap.add_argument("--no-step", action="store_true", help="only the loss-kernel sweeps")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.kernel_seq_lens, args.kernel_vocab = 32, [16, 32, 64], 1000
        args.kernel_vocabs, args.kernel_seq_len, args.kernel_rounds = [500, 1000, 2000], 32, 1
        args.vocab_chunk_size = args.vocab_chunk_size or 256  # tiles smaller than the logits, as at full size
        args.preset, args.step_batch, args.step_seq_lens, args.step_vocab = "quick", 2, [16, 32], 1024
        args.step_vocabs, args.step_seq_len, args.step_rounds = [512, 2048], 16, 1
    if args.step_batch < 2 or args.step_batch % 2:
        ap.error(f"--step-batch {args.step_batch}: must be even")
    return check_common_args(ap, args)


def _points(values: list[int], fixed: int, key: str) -> list[tuple[int, int]]:
    return [(v, fixed) if key == "seq_len" else (fixed, v) for v in sorted(values)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)

    kernel = {
        "seq_len": kernel_sweep(_points(args.kernel_seq_lens, args.kernel_vocab, "seq_len"), hidden=args.hidden,
                                rounds=args.kernel_rounds, warmup=1, device=device, clock=clock,
                                vocab_chunk_size=args.vocab_chunk_size),
        "vocab": kernel_sweep(_points(args.kernel_vocabs, args.kernel_seq_len, "vocab"), hidden=args.hidden,
                              rounds=args.kernel_rounds, warmup=1, device=device, clock=clock,
                              vocab_chunk_size=args.vocab_chunk_size),
    }
    step: dict[str, list[dict[str, Any]]] = {"seq_len": [], "vocab": []}
    if not args.no_step:
        kw = dict(batch=args.step_batch, preset=args.preset, rounds=args.step_rounds, warmup=1, device=args.device,
                  threads=args.threads, seed=args.seed)
        step["seq_len"] = step_sweep(_points(args.step_seq_lens, args.step_vocab, "seq_len"), clock, **kw)
        step["vocab"] = step_sweep(_points(args.step_vocabs, args.step_seq_len, "vocab"), clock, **kw)

    payload: dict[str, Any] = {
        "benchmark": "scaling",
        "quick": args.quick,
        "machine": machine,
        "clock": clock,
        "settings": {"threads": args.threads, "hidden": args.hidden, "vocab_chunk_size": args.vocab_chunk_size,
                     "kernel_vocab": args.kernel_vocab,
                     "kernel_seq_len": args.kernel_seq_len, "kernel_rounds": args.kernel_rounds, "preset": args.preset,
                     "step_batch": args.step_batch, "step_vocab": args.step_vocab, "step_seq_len": args.step_seq_len,
                     "step_rounds": args.step_rounds, "dtype": "float32"},
        "kernel": kernel,
        "step": step,
    }
    payload["slopes"] = slopes(payload, clock)
    checks = {
        "fused_kernel_never_full_logits": all(r["no_full_logits"]["shiq_fused"] for k in kernel for r in kernel[k]),
        "naive_kernel_holds_full_logits": not any(r["no_full_logits"]["shiq_naive"] for k in kernel for r in kernel[k]),
        "shiq_step_never_full_logits": all(r["configs"]["shiq"]["no_full_logits"] for k in step for r in step[k]),
        "sft_step_holds_full_logits": not any(r["configs"]["sft"]["no_full_logits"] for k in step for r in step[k]),
    }
    payload["headline"] = {"clock": clock, **checks}
    sl = payload["slopes"]
    payload["headline"].update({
        "fused_kernel_time_slope_T": sl["kernel"]["seq_len"]["shiq_fused"]["time"],
        "fused_kernel_time_slope_V": sl["kernel"]["vocab"]["shiq_fused"]["time"],
        "shiq_step_time_slope_T": sl["step"]["seq_len"]["shiq"]["time"],
        "shiq_step_time_slope_V": sl["step"]["vocab"]["shiq"]["time"],
    })
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
