"""Benchmark one training step: ShiQTrainer vs plain SFT vs TRL's DPOTrainer, on equal tokens (issue 6).

With precomputed reference statistics a ShiQ step is one forward and backward of the policy, the
work of supervised fine-tuning (SFT) on the same tokens. This script measures how close it gets:

- ``sft``: a plain ``transformers.Trainer`` on the same model and batch, the causal-LM loss
  (labels = the tokens, prompt masked with -100; the model computes its full logits).
- ``shiq``: :class:`shiq_lab.train.trainer.ShiQTrainer` (``loss_type="shiq"``), reference statistics
  computed once at construction (not in the timed steps).
- ``dpo``: TRL's ``DPOTrainer`` with its defaults (sigmoid loss, a reference model run at every step).
- ``dpo_precompute``: the same with ``precompute_ref_log_probs=True`` (reference pass at construction).

Equal work: the data are prompt / chosen / rejected triples of random token ids of fixed lengths.
SFT and ShiQ get one row per response (``--batch`` rows a step), DPO ``--batch / 2`` pairs a step,
i.e. the same ``--batch`` sequences of ``prompt + completion`` tokens. Same optimizer (AdamW,
constant learning rate, gradient clipping at 1), same sequence length, fp32 (``--bf16`` on a GPU),
no gradient checkpointing (TRL's ``DPOConfig`` turns it on by default; here it is off for every
trainer so that all do the same work), ``logging_steps=1`` for every trainer.

How it is measured: each configuration runs in its own process (``multiprocessing`` spawn), all
set up side by side; then the steps run in lockstep: a callback stops every trainer after each
optimizer step, and the parent lets one process at a time run its next step, round by round
(sft, shiq, dpo, ..., then the next round, starting one further along), so load drift from other
processes on a shared machine hits every configuration alike. A step's time runs from the go to
the end of the optimizer step: it covers logging of the previous step, fetching and collating the
batch, forward, backward, clipping and the optimizer. The first ``--warmup`` steps are dropped.
Memory: the process's resident-set high-water mark (``VmHWM``, reset just before training) above
its RSS with only the model loaded -- it includes optimizer state, gradients, activations and, for
DPO, the reference model copy --; and the peak bytes torch allocates during one more step
(``benchmarks.common.measure_memory``), with the largest single allocation, to show which [B, T, V]
tensors exist. ``--profile`` adds a ``torch.profiler`` table of one step per configuration.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_train_step --threads 1        # full run, a few minutes on CPU
    .venv/bin/python -m benchmarks.bench_train_step --quick            # smoke run (tests), seconds
    .venv/bin/python -m benchmarks.bench_train_step --device cuda --preset smollm2-135m --bf16 \
        --batch 16 --prompt-len 128 --completion-len 384                # GPU: tokens/s and MFU

MFU = 6 * parameters * tokens/s / peak FLOP/s (``--peak-tflops``, or a table of bf16 dense peaks
for known GPUs). It writes ``benchmarks/results/train_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from benchmarks.common import (
    CLOCKS,
    PRESETS,
    add_common_args,
    check_common_args,
    fmt_bytes,
    import_error,
    iqr_text,
    lm_head_flop_share,
    markdown_table,
    peak_tflops,
    publish,
    ratio_summary,
    save_model,
    start_run,
    time_summary,
    versions,
)
from benchmarks.lockstep import BETA, CONFIGS, run_lockstep

#: ShiQ tokens/s over each peer's: the goals of issue 6 (ShiQ >= 0.95 x SFT, >= 1.25 x DPO)
GOALS = {"shiq_over_sft": 0.95, "shiq_over_dpo": 1.25}

# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def summarise(times: dict[str, dict[str, list[float]]], reports: dict[str, dict[str, Any]], clock: str,
              peak: float | None) -> dict[str, Any]:
    """Per configuration: step time, tokens/s, memory and MFU; and ShiQ's speed over each peer."""
    out: dict[str, Any] = {"configs": {}, "shiq_speedup": {}}
    for name, rep in reports.items():
        t = {c: time_summary(times[name][c]) for c in CLOCKS}
        tps = rep["tokens_per_step"] / t[clock]["median"]
        model_tflops = 6 * rep["n_params"] * tps / 1e12
        out["configs"][name] = {
            "times": t, "tokens_per_step": rep["tokens_per_step"], "tokens_per_s": tps,
            "tokens_per_s_iqr": [rep["tokens_per_step"] / t[clock]["q3"], rep["tokens_per_step"] / t[clock]["q1"]],
            "model_tflops_per_s": model_tflops, "mfu": model_tflops / peak if peak else None,
            "train_peak_rss_over_model_bytes": rep["train_peak_rss_over_model_bytes"],
            "step_memory": rep.get("step_memory"), "cuda_max_allocated_bytes": rep["cuda_max_allocated_bytes"],
            "final_loss": rep["losses"][-1] if rep["losses"] else None, "setup_s": rep["setup_s"],
        }
    if "shiq" in times:
        for name in times:
            if name != "shiq":
                # time(peer) / time(shiq) per round = tokens/s(shiq) / tokens/s(peer)
                out["shiq_speedup"][name] = {c: ratio_summary(times[name][c], times["shiq"][c]) for c in CLOCKS}
    return out


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head, res = payload["machine"], payload["settings"], payload["headline"], payload["results"]
    clock = head["clock"]
    other = "wall_s" if clock == "cpu_s" else "cpu_s"
    clock_words = ("process CPU time (one torch thread: the step's time on an idle core, robust to other processes "
                   "sharing the machine)" if clock == "cpu_s" else "wall-clock time")
    m = s["model"]
    lines = [
        "# Training step: ShiQTrainer vs SFT (transformers.Trainer) vs TRL DPOTrainer",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Model: Llama-shaped, preset `{s['preset']}` ({m['n_params'] / 1e6:.1f} M parameters, hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, "
        f"MLP {m['intermediate_size']}, vocabulary {m['vocab_size']}, tied embeddings; the output layer is "
        f"{100 * m['lm_head_flop_share']:.0f}% of a forward pass's FLOPs). Batch: {s['batch']} sequences of "
        f"{s['prompt_len']} prompt + {s['completion_len']} response tokens per step for every trainer (DPO: "
        f"{s['batch'] // 2} pairs); AdamW, constant lr, clipping 1.0, {s['dtype']}, no gradient checkpointing, "
        f"TRL {payload['versions'].get('trl')}, transformers {payload['versions'].get('transformers')}.",
        "",
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}"
        + (f" ({mi['gpu']})" if mi.get("gpu") else "")
        + f", torch {mi['torch']}, {s['threads']} torch thread(s) per process, load average "
        f"{mi.get('loadavg_1m_5m_15m')} at the start, {mi.get('loadavg_end')} at the end. Each configuration in its own "
        f"process, steps interleaved round by round; {s['rounds']} rounds after {s['warmup']} warm-up. Times: "
        f"{clock_words}, median [quartiles]; ratios: medians of per-round ratios [quartiles].",
        "",
    ]
    sp = res["shiq_speedup"]
    goal_lines = []
    for peer, key in (("sft", "shiq_over_sft"), ("dpo", "shiq_over_dpo")):
        if peer in sp:
            v = head[key]
            goal_lines.append(f"ShiQ / {peer.upper()} tokens/s = **{v:.3f}** (goal >= {GOALS[key]}: "
                              f"{'met' if v >= GOALS[key] else 'NOT met'})")
    if "dpo_precompute" in sp:
        goal_lines.append(f"ShiQ / DPO with precomputed reference = **{head['shiq_over_dpo_precompute']:.3f}**")
    lines += ["Headline: " + "; ".join(goal_lines) + ".", ""]
    table = []
    for name, c in res["configs"].items():
        mem = c.get("step_memory") or {}
        row = {
            "trainer": name,
            "step time (s)": iqr_text(c['times'][clock]),
            f"step ({other[:-2]} clock)": f"{c['times'][other]['median']:.3f}",
            "tokens/s": f"{c['tokens_per_s']:.0f}",
            "ShiQ speed-up over it": iqr_text(sp[name][clock]) if name in sp else "1",
            f"({other[:-2]} clock)": f"{sp[name][other]['median']:.3f}" if name in sp else "1",
            "peak RSS above model": fmt_bytes(c["train_peak_rss_over_model_bytes"]),
            "torch peak in a step": fmt_bytes(mem.get("peak_bytes", -1)),
            "largest tensor in a step": fmt_bytes(mem.get("largest_alloc_bytes", -1)),
        }
        if c.get("cuda_max_allocated_bytes", -1) >= 0:
            row["CUDA max allocated"] = fmt_bytes(c["cuda_max_allocated_bytes"])
        row["model TFLOP/s (6N)"] = f"{c['model_tflops_per_s']:.3f}"
        row["MFU"] = f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "n/a"
        table.append(row)
    lines += [markdown_table(table, list(table[0])), ""]
    lines += [
        f"Tokens per step: {next(iter(res['configs'].values()))['tokens_per_step']} for every trainer "
        f"(checked in each process). [B, T, V] fp32 logits of one step: {fmt_bytes(s['full_logits_fp32_bytes'])}. "
        f"Peak RSS above model: resident-set high-water mark during training minus the RSS with the model loaded "
        f"(optimizer state, gradients, activations, DPO's reference copy). Torch peak / largest tensor: allocations "
        f"during one more optimizer step (torch.profiler replay on CPU). MFU: 6 x parameters x tokens/s over the peak "
        f"({payload['peak_source']}).",
    ]
    prof = payload.get("profiles") or {}
    if prof:
        for name, p in prof.items():
            lines += ["", f"## Profile of one step of {name} ({p['clock']}, top operators)", "",
                      f"Total {p['total_ms']:.0f} ms.", ""]
            lines.append(markdown_table(
                [{"op": o["op"], "ms": f"{o['ms']:.1f}", "share": f"{100 * o['share']:.1f}%", "calls": o["calls"]}
                 for o in p["top_ops"][:10]], ["op", "ms", "share", "calls"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, name="train_step", threads=1)
    ap.add_argument("--bf16", action="store_true", help="mixed precision (GPUs)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: TF32 tensor cores for the fp32 matmuls left under --bf16 autocast (every trainer; "
                         "ShiQ's output layer runs in fp32 under autocast, see shiq_lab.lm.stats.stats_from_hidden)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (see PRESETS)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (DPO: batch/2 pairs)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--no-memory", action="store_true", help="skip the torch allocation measurement")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table of one step per trainer")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: GPU table, bf16)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.prompt_len, args.completion_len = "quick", 4, 8, 24
        args.rounds, args.warmup = 2, 1
    if args.batch < 2 or args.batch % 2:
        ap.error(f"--batch {args.batch}: must be even (DPO takes batch/2 pairs of chosen/rejected responses)")
    if "shiq" not in args.configs:
        ap.error("--configs must include shiq (the ratios are ShiQ's speed over each peer)")
    return check_common_args(ap, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    seq_len = args.prompt_len + args.completion_len
    configs = list(args.configs)
    skipped: dict[str, str] = {}
    trl_error = import_error("trl", "DPOConfig", "DPOTrainer") if any(c.startswith("dpo") for c in configs) else None
    if trl_error:
        print(f"trl does not import here ({trl_error}; pip install '.[peers]'): skipping the DPO configurations",
              flush=True)
        skipped = {c: trl_error for c in configs if c.startswith("dpo")}
        configs = [c for c in configs if not c.startswith("dpo")]
    with tempfile.TemporaryDirectory(prefix="bench-train-model-") as model_dir:
        n_params = save_model(args.preset, model_dir, max_positions=seq_len, seed=args.seed)
        base = dict(model_dir=model_dir, batch=args.batch, prompt_len=args.prompt_len,
                    completion_len=args.completion_len, steps=args.warmup + args.rounds, device=args.device,
                    bf16=args.bf16, tf32=args.tf32, threads=args.threads, seed=args.seed, measure_memory=not args.no_memory,
                    profile=args.profile)
        specs = {c: {**base, "config": c} for c in configs}
        failed: dict[str, str] = {}
        times, reports = run_lockstep(specs, rounds=args.rounds, warmup=args.warmup, failed=failed)
    for name, err in failed.items():
        print(f"{name} failed its set-up and is left out:\n{err}", flush=True)
        skipped[name] = err
        configs.remove(name)
    if "shiq" not in reports:
        raise RuntimeError(f"the ShiQ configuration failed its set-up: {failed.get('shiq')}")
    tokens = {c: r["tokens_per_step"] for c, r in reports.items()}
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the trainers did not process equal tokens per step: {tokens}")
    peak, peak_source = peak_tflops(device, args.bf16, args.peak_tflops)
    results = summarise(times, reports, clock, peak)
    sp = results["shiq_speedup"]
    headline: dict[str, Any] = {"clock": clock}
    for peer in ("sft", "dpo", "dpo_precompute"):
        if peer in sp:
            headline[f"shiq_over_{peer}"] = sp[peer][clock]["median"]
    for key, goal in GOALS.items():
        if key in headline:
            headline[f"meets_{key}_goal"] = bool(headline[key] >= goal)
    headline["tokens_per_s"] = {c: v["tokens_per_s"] for c, v in results["configs"].items()}
    headline["train_peak_rss_over_model_bytes"] = {c: v["train_peak_rss_over_model_bytes"]
                                                   for c, v in results["configs"].items()}
    model = {**PRESETS[args.preset], "n_params": n_params, "lm_head_flop_share": lm_head_flop_share(args.preset, seq_len)}
    model.setdefault("tie_word_embeddings", True)
    payload = {
        "benchmark": "train_step",
        "quick": args.quick,
        "goals": {f"{k}_min": v for k, v in GOALS.items()},
        "machine": machine,
        "versions": versions(),
        "settings": {"preset": args.preset, "model": model, "batch": args.batch, "prompt_len": args.prompt_len,
                     "completion_len": args.completion_len, "rounds": args.rounds, "warmup": args.warmup,
                     "threads": args.threads, "dtype": "bf16 autocast" if args.bf16 else "float32", "tf32": args.tf32, "beta": BETA,
                     "configs": configs, "skipped_configs": skipped,
                     "full_logits_fp32_bytes": args.batch * seq_len * PRESETS[args.preset]["vocab_size"] * 4},
        "peak_tflops": peak, "peak_source": peak_source,
        "headline": headline,
        "results": results,
        "raw_times": times,
        "profiles": {c: r["profile"] for c, r in reports.items() if "profile" in r},
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
