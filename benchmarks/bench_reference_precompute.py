"""Benchmark the reference precompute pass against a plain forward pass on the same tokens (issue 6).

ShiQ reads the reference through two numbers per response token (``ref_logp``, ``ref_logz``),
computed once for an offline dataset by :func:`shiq_lab.reference.compute_reference_stats`. That
pass is a forward of the reference without gradients; this script measures what it costs beyond
the model's own forward, on the same rows and batches (``--rows`` sequences of ``--prompt-len``
prompt + ``--completion-len`` response tokens, ``--batch`` at a time, the model of
``bench_train_step``'s preset):

- ``forward``: ``model(input_ids, attention_mask)`` under ``torch.no_grad()`` on pre-collated
  batches: the plain forward pass (it builds the [B, T, V] logits, as a forward does).
- ``forward_logprobs``: the same, then ``shiq_lab.losses.token_logprobs`` on the full fp32
  logits: the simple way to get the same statistics.
- ``precompute``: ``compute_reference_stats(model, ds)``: collation from the dataset, the decoder,
  the chunked log-probabilities on response tokens only, per-row numpy arrays.
- ``precompute_cached``: ``precompute_reference(model, ds, cache_dir=<new folder>)``: the whole
  library path on a cache miss (dataset fingerprint, weights hash, the pass, writing the entry,
  attaching the columns). A cache hit (no forward at all) is timed separately.

The cases are interleaved round by round after a warm-up (``benchmarks.common.interleaved_times``);
memory is the peak torch allocation of one pass. Run from the repository root::

    .venv/bin/python -m benchmarks.bench_reference_precompute --threads 1     # full, a few minutes
    .venv/bin/python -m benchmarks.bench_reference_precompute --quick         # smoke run, seconds
    .venv/bin/python -m benchmarks.bench_reference_precompute --device cuda --preset smollm2-135m

It writes ``benchmarks/results/reference_precompute.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.bench_train_step import PRESETS, make_triples, model_config, word_tokenizer
from benchmarks.common import (
    CLOCKS,
    fmt_bytes,
    interleaved_times,
    markdown_table,
    measure_memory,
    publish,
    ratio_summary,
    start_run,
    time_summary,
)

CASES = ("forward", "forward_logprobs", "precompute", "precompute_cached")


def build_dataset(tokenizer, *, rows: int, prompt_len: int, completion_len: int, vocab_size: int, seed: int):
    """A tokenised ShiQ dataset (``input_ids``, ``action_mask``, ...) of ``rows`` fixed-length responses."""
    from shiq_lab.data.encode import tokenize_dataset

    triples = make_triples(-(-rows // 2), prompt_len, completion_len, vocab_size, seed)
    data = [{"prompt_ids": t["prompt_ids"], "completion_ids": t[k], "reward": float(k == "chosen_ids"), "group": g}
            for g, t in enumerate(triples) for k in ("chosen_ids", "rejected_ids")][:rows]
    return tokenize_dataset(data, tokenizer, max_length=prompt_len + completion_len)


def collated_batches(ds, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The batches the precompute pass forms, collated ahead (for the plain-forward cases)."""
    from shiq_lab.data.batch import ShiQCollator

    collate = ShiQCollator(pad_token_id=0)
    out = []
    for start in range(0, len(ds), batch_size):
        rows = ds.select(range(start, min(len(ds), start + batch_size)))
        batch = collate([dict(r) for r in rows])
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def make_cases(model, ds, batches, batch_size: int, device: torch.device, scratch: Path) -> dict[str, Any]:
    from shiq_lab.losses import token_logprobs
    from shiq_lab.reference.cache import compute_reference_stats, precompute_reference

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def forward_logprobs() -> None:
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                token_logprobs(logits[:, :-1].float(), b["input_ids"][:, 1:])

    def precompute() -> None:
        compute_reference_stats(model, ds, batch_size=batch_size, device=device)

    counter = iter(range(10**9))

    def precompute_cached() -> None:
        folder = scratch / f"miss-{next(counter)}"  # a new folder: always a cache miss
        precompute_reference(model, ds, batch_size=batch_size, cache_dir=folder, device=device)
        shutil.rmtree(folder, ignore_errors=True)

    return {"forward": forward, "forward_logprobs": forward_logprobs, "precompute": precompute,
            "precompute_cached": precompute_cached}


def check_stats(model, ds, batches, batch_size: int, device: torch.device) -> float:
    """Largest |difference| between the precompute's log-probs and those of the full logits (sanity)."""
    from shiq_lab.losses import token_logprobs
    from shiq_lab.reference.cache import compute_reference_stats

    logp_rows, _ = compute_reference_stats(model, ds, batch_size=batch_size, device=device)
    worst, row = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            lp, _ = token_logprobs(logits[:, :-1].float(), b["input_ids"][:, 1:])
            mask = b["action_mask"][:, 1:].bool()
            for i in range(lp.shape[0]):
                ours = torch.as_tensor(logp_rows[row][1:], device=device)
                worst = max(worst, float((ours[mask[i]] - lp[i][mask[i]]).abs().max()))
                row += 1
    return worst


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head, res = payload["machine"], payload["settings"], payload["headline"], payload["results"]
    clock = head["clock"]
    other = "wall_s" if clock == "cpu_s" else "cpu_s"
    clock_words = ("process CPU time (one torch thread, robust to other processes sharing the machine)"
                   if clock == "cpu_s" else "wall-clock time")
    m = s["model"]
    lines = [
        "# Reference precompute vs a plain forward pass",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Model: preset `{s['preset']}` (Llama-shaped, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"vocabulary {m['vocab_size']}, {m['n_params'] / 1e6:.1f} M parameters). Data: {s['rows']} sequences of "
        f"{s['prompt_len']} prompt + {s['completion_len']} response tokens ({s['tokens']} tokens), batch {s['batch']}, "
        f"float32, eval mode, no gradients.",
        "",
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}, torch {mi['torch']}, {s['threads']} "
        f"torch thread(s), load average {mi.get('loadavg_1m_5m_15m')} at the start, {mi.get('loadavg_end')} at the end. "
        f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up; times: {clock_words}, medians [quartiles]; "
        f"ratios: medians of per-round ratios [quartiles].",
        "",
        f"Headline: precompute tokens/s / plain forward tokens/s = **{head['precompute_over_forward']:.3f}** "
        f"(whole cached path on a miss: {head['precompute_cached_over_forward']:.3f}; cache hit: "
        f"{head['cache_hit_s']:.3f} s for the whole dataset, no forward).",
        "",
    ]
    table = []
    for name in CASES:
        c = res[name]
        r = res["ratios_over_forward"].get(name)
        table.append({
            "pass": name,
            "time (s)": f"{c['times'][clock]['median']:.3f} [{c['times'][clock]['q1']:.3f}, {c['times'][clock]['q3']:.3f}]",
            f"({other[:-2]} clock)": f"{c['times'][other]['median']:.3f}",
            "tokens/s": f"{c['tokens_per_s']:.0f}",
            "tokens/s vs forward": f"{r[clock]['median']:.3f} [{r[clock]['q1']:.3f}, {r[clock]['q3']:.3f}]" if r else "1",
            "torch peak": fmt_bytes(c["memory"]["peak_bytes"]),
            "largest tensor": fmt_bytes(c["memory"]["largest_alloc_bytes"]),
        })
    lines += [markdown_table(table, list(table[0])), ""]
    lines.append(f"Check: precompute log-probs vs full-logit log-probs, max |difference| = {res['check_max_abs_diff']:.2e}. "
                 f"[B, T, V] fp32 logits of one batch: {fmt_bytes(s['batch_logits_fp32_bytes'])}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (bench_train_step.PRESETS)")
    ap.add_argument("--rows", type=int, default=32, help="sequences in the dataset")
    ap.add_argument("--batch", type=int, default=8, help="precompute batch size")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--clock", choices=CLOCKS, default=None,
                    help="clock of the headline (default: cpu_s with one thread on a CPU, else wall_s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    ap.add_argument("--name", default="reference_precompute", help="stem of the result files")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.rows, args.batch, args.prompt_len, args.completion_len = "quick", 8, 4, 8, 24
        args.rounds, args.warmup = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    from transformers import LlamaForCausalLM

    seq_len = args.prompt_len + args.completion_len
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args.preset, seq_len)).to(device).eval()
    tokenizer = word_tokenizer(model.config.vocab_size)
    ds = build_dataset(tokenizer, rows=args.rows, prompt_len=args.prompt_len, completion_len=args.completion_len,
                       vocab_size=model.config.vocab_size, seed=args.seed)
    batches = collated_batches(ds, args.batch, device)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    with tempfile.TemporaryDirectory(prefix="bench-refstats-") as scratch:
        scratch = Path(scratch)
        cases = make_cases(model, ds, batches, args.batch, device, scratch)
        times = interleaved_times(cases, rounds=args.rounds, warmup=args.warmup, device=device)
        memory = {name: measure_memory(fn, device) for name, fn in cases.items()}
        # a cache hit: the entry exists, no forward runs
        from shiq_lab.reference.cache import precompute_reference

        hit_dir = scratch / "hit"
        precompute_reference(model, ds, batch_size=args.batch, cache_dir=hit_dir, device=device)
        t0 = time.perf_counter()
        precompute_reference(model, ds, batch_size=args.batch, cache_dir=hit_dir, device=device)
        hit_s = time.perf_counter() - t0
    check = check_stats(model, ds, batches, args.batch, device)

    results: dict[str, Any] = {"ratios_over_forward": {}, "check_max_abs_diff": check, "cache_hit_s": hit_s}
    for name in CASES:
        t = {c: time_summary(times[name][c]) for c in CLOCKS}
        results[name] = {"times": t, "tokens_per_s": tokens / t[clock]["median"], "memory": memory[name]}
        if name != "forward":
            # time(forward) / time(case) per round = tokens/s(case) / tokens/s(forward)
            results["ratios_over_forward"][name] = {c: ratio_summary(times["forward"][c], times[name][c]) for c in CLOCKS}
    headline = {
        "clock": clock,
        "precompute_over_forward": results["ratios_over_forward"]["precompute"][clock]["median"],
        "precompute_cached_over_forward": results["ratios_over_forward"]["precompute_cached"][clock]["median"],
        "forward_logprobs_over_forward": results["ratios_over_forward"]["forward_logprobs"][clock]["median"],
        "precompute_tokens_per_s": results["precompute"]["tokens_per_s"],
        "forward_tokens_per_s": results["forward"]["tokens_per_s"],
        "cache_hit_s": hit_s,
    }
    preset = PRESETS[args.preset]
    payload = {
        "benchmark": "reference_precompute",
        "quick": args.quick,
        "machine": machine,
        "settings": {"preset": args.preset, "model": {**preset, "n_params": sum(p.numel() for p in model.parameters())},
                     "rows": args.rows, "batch": args.batch, "prompt_len": args.prompt_len,
                     "completion_len": args.completion_len, "tokens": tokens, "rounds": args.rounds,
                     "warmup": args.warmup, "threads": args.threads, "dtype": "float32",
                     "batch_logits_fp32_bytes": args.batch * seq_len * preset["vocab_size"] * 4},
        "headline": headline,
        "results": results,
        "raw_times": times,
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
