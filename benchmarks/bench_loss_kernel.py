"""Benchmark the ShiQ loss kernel against plain supervised fine-tuning's cross-entropy (issue 6).

Forward + backward from the final hidden states and the output layer, on the same inputs
(hidden [B, T, H], weight [V, H], SmolLM2's V = 49152 and H = 576, T = 512):

- ``sft_ce``: ``F.cross_entropy(hidden @ W.T, targets)``, the SFT baseline (PyTorch).
- ``shiq_naive``: ``token_logprobs(hidden @ W.T, actions)`` + ``shiq_loss`` (full fp32 logits).
- ``shiq_fused``: ``chunked_token_logprobs(hidden, W, actions)`` + ``shiq_loss`` (tiles only).

Goals: time(shiq_fused) <= 1.1 x time(sft_ce); extra peak memory(shiq_fused) <= 0.25 x that of
shiq_naive. Every response token is a policy token (mask all ones), so the three compute the same
N x V logits. A scaling sweep over T and V shows linear growth and the largest tensor allocated.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_loss_kernel --threads 2        # full, a few minutes
    .venv/bin/python -m benchmarks.bench_loss_kernel --quick            # tiny smoke run, seconds

It writes ``benchmarks/results/loss_kernel.json`` (every number and the machine) and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

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
from shiq_lab.lm.kernel import chunked_token_logprobs, default_tile
from shiq_lab.losses import shiq_loss, token_logprobs

TIME_GOAL = 1.1  # time(shiq_fused) / time(sft_ce)
MEMORY_GOAL = 0.25  # extra peak memory(shiq_fused) / extra peak memory(shiq_naive)
BETA = 0.1
METHOD_NAMES = ("sft_ce", "shiq_naive", "shiq_fused")


@dataclass
class Problem:
    """One batch of inputs shared by every method."""

    hidden: torch.Tensor  # [B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad unless the output layer is frozen
    actions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T], all ones: every position is a response token
    ref_logp: torch.Tensor
    ref_logz: torch.Tensor
    rewards: torch.Tensor

    @property
    def shape(self) -> dict[str, int]:
        (b, t, h), v = self.hidden.shape, self.weight.shape[0]
        return {"batch": b, "seq_len": t, "hidden": h, "vocab": v}


def make_problem(batch: int, seq_len: int, hidden: int, vocab: int, *, frozen_head: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0) -> Problem:
    """Random inputs with realistic scales: logits of standard deviation ~2, a sequence score on the last token."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq_len, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / math.sqrt(hidden))
    actions = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ref_logz = math.log(vocab) + 0.5 * torch.randn(batch, seq_len, generator=g)
    ref_logp = -math.log(vocab) + torch.randn(batch, seq_len, generator=g)
    rewards = torch.zeros(batch, seq_len)
    rewards[:, -1] = torch.randn(batch, generator=g)
    to = dict(device=device)
    return Problem(
        hidden=h.to(dtype=dtype, **to).requires_grad_(True),
        weight=w.to(dtype=dtype, **to).requires_grad_(not frozen_head),
        actions=actions.to(**to),
        mask=torch.ones(batch, seq_len, dtype=torch.long, **to),
        ref_logp=ref_logp.to(**to), ref_logz=ref_logz.to(**to), rewards=rewards.to(**to),
    )


def _shiq(p: Problem, logp: torch.Tensor, logz: torch.Tensor) -> torch.Tensor:
    return shiq_loss(logp, logz, p.ref_logp, p.ref_logz, p.rewards, p.mask, beta=BETA).loss


def sft_ce(p: Problem) -> torch.Tensor:
    """The SFT baseline: PyTorch cross-entropy on the full logits."""
    logits = p.hidden @ p.weight.T
    targets = p.actions.masked_fill(p.mask == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def shiq_naive(p: Problem) -> torch.Tensor:
    """Reference ShiQ: full [B, T, V] logits, then ``token_logprobs`` and ``shiq_loss``."""
    logp, logz = token_logprobs(p.hidden @ p.weight.T, p.actions)
    return _shiq(p, logp, logz)


def shiq_fused(p: Problem, chunk_size: int | None = None, vocab_chunk_size: int | None = None) -> torch.Tensor:
    """Memory-light ShiQ: ``chunked_token_logprobs`` (tiles, recomputed in backward) and ``shiq_loss``."""
    logp, logz = chunked_token_logprobs(p.hidden, p.weight, p.actions, mask=p.mask,
                                        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    return _shiq(p, logp, logz)


METHODS: dict[str, Callable[..., torch.Tensor]] = {"sft_ce": sft_ce, "shiq_naive": shiq_naive, "shiq_fused": shiq_fused}


def _step(p: Problem, method: str, tile: dict[str, int | None]) -> Callable[[], None]:
    kwargs = tile if method == "shiq_fused" else {}

    def run() -> None:
        METHODS[method](p, **kwargs).backward()
    return run


def _reset(p: Problem) -> Callable[[], None]:
    def run() -> None:
        p.hidden.grad = None
        p.weight.grad = None
    return run


def check_fused_equals_naive(p: Problem, tile: dict[str, int | None]) -> dict[str, float]:
    """Largest relative differences between the fused and the naive ShiQ loss and gradients, on these inputs."""
    out = {}
    grads = {}
    for name in ("shiq_naive", "shiq_fused"):
        loss = METHODS[name](p, **(tile if name == "shiq_fused" else {}))
        loss.backward()
        grads[name] = (loss.detach(), p.hidden.grad, p.weight.grad)
        _reset(p)()
    (l0, h0, w0), (l1, h1, w1) = grads["shiq_naive"], grads["shiq_fused"]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out["loss_rel_diff"] = rel(l1, l0)
    out["grad_hidden_rel_diff"] = rel(h1, h0)
    if w0 is not None:
        out["grad_weight_rel_diff"] = rel(w1, w0)
    return out


def run_case(p: Problem, *, rounds: int, warmup: int, device: torch.device, check: bool = True,
             tile: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Time and memory of the three methods on one problem, and the ratios the goals are stated in.

    ``tile`` holds ``chunk_size`` / ``vocab_chunk_size`` for the fused kernel (None: its default).
    """
    tile = tile or {"chunk_size": None, "vocab_chunk_size": None}
    cases = {m: _step(p, m, tile) for m in METHOD_NAMES}
    times = interleaved_times(cases, rounds=rounds, warmup=warmup, device=device, reset=_reset(p))
    memory = {}
    for m in METHOD_NAMES:
        memory[m] = measure_memory(cases[m], device)
        _reset(p)()
    n_tok, vocab = p.actions.numel(), p.weight.shape[0]
    d_tok, d_voc = default_tile(n_tok, vocab, device)
    row: dict[str, Any] = {
        **p.shape,
        "frozen_head": not p.weight.requires_grad,
        "tile": [tile["chunk_size"] or d_tok, tile["vocab_chunk_size"] or d_voc],
        "full_logits_fp32_bytes": n_tok * vocab * 4,
        "times": {m: {c: time_summary(times[m][c]) for c in CLOCKS} for m in METHOD_NAMES},
        "memory": memory,
        "ratios": {
            "time_fused_over_sft": {c: ratio_summary(times["shiq_fused"][c], times["sft_ce"][c]) for c in CLOCKS},
            "time_naive_over_sft": {c: ratio_summary(times["shiq_naive"][c], times["sft_ce"][c]) for c in CLOCKS},
            "peak_memory_fused_over_naive": memory["shiq_fused"]["peak_bytes"] / memory["shiq_naive"]["peak_bytes"],
            "working_memory_fused_over_naive": memory["shiq_fused"]["working_bytes"] / memory["shiq_naive"]["working_bytes"],
            "peak_memory_fused_over_sft": memory["shiq_fused"]["peak_bytes"] / memory["sft_ce"]["peak_bytes"],
        },
    }
    if check:
        row["check"] = check_fused_equals_naive(p, tile)
    return row


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


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
            "fused / SFT time": _ratio(q["time_fused_over_sft"][clock]),
            f"fused / SFT ({other[:-2]} clock)": _ratio(q["time_fused_over_sft"][other]),
            "naive / SFT time": f"{q['time_naive_over_sft'][clock]['median']:.3f}",
            "peak mem SFT / naive / fused": " / ".join(fmt_bytes(m[k]["peak_bytes"]) for k in METHOD_NAMES),
            "fused / naive peak mem": f"{q['peak_memory_fused_over_naive']:.3f}",
            "fused / naive working mem": f"{q['working_memory_fused_over_naive']:.3f}",
        })
    return markdown_table(table, list(table[0]))


def _scaling_rows(rows: list[dict[str, Any]], clock: str) -> str:
    table = []
    for r in rows:
        t, m = r["times"], r["memory"]
        table.append({
            "T": r["seq_len"], "V": r["vocab"], "[T,V] fp32": fmt_bytes(r["full_logits_fp32_bytes"]),
            **{f"{k} (s)": f"{t[k][clock]['median']:.3f}" for k in METHOD_NAMES},
            **{f"{k} peak": fmt_bytes(m[k]["peak_bytes"]) for k in METHOD_NAMES},
            "naive largest temporary": fmt_bytes(m["shiq_naive"]["largest_temp_bytes"]),
            "fused largest temporary": fmt_bytes(m["shiq_fused"]["largest_temp_bytes"]),
            "fused / SFT time": f"{r['ratios']['time_fused_over_sft'][clock]['median']:.3f}",
        })
    return markdown_table(table, list(table[0]))


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head = payload["machine"], payload["settings"], payload["headline"]
    clock = head["clock"]
    clock_words = ("process CPU time (one torch thread: the wall time of an idle machine, robust to other "
                   "processes sharing the cores)" if clock == "cpu_s" else "wall-clock time")
    lines = [
        "# Loss kernel: ShiQ vs SFT cross-entropy (forward + backward)",
        "",
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}, torch {mi['torch']}, "
        f"{mi['torch_threads']} torch thread(s), load average {mi.get('loadavg_1m_5m_15m')} at the start. "
        f"Load average at the end: {mi.get('loadavg_end')}. "
        f"{s['rounds']} interleaved rounds after {s['warmup']} warm-up; times are {clock_words}, medians; ratios "
        f"are medians of per-round ratios [quartiles]. Memory: peak bytes allocated by torch during one step above the inputs "
        f"(includes the gradients the step leaves, {fmt_bytes(payload['main'][0]['memory']['shiq_fused']['retained_bytes'])} "
        f"in the first row); working = peak minus what the step leaves behind.",
        "",
        f"Headline (first row): fused / SFT time = **{head['time_fused_over_sft']:.3f}** (goal <= {TIME_GOAL}: "
        f"{'met' if head['meets_time_goal'] else 'NOT met'}); fused / naive extra peak memory = "
        f"**{head['peak_memory_fused_over_naive']:.3f}** (goal <= {MEMORY_GOAL}: "
        f"{'met' if head['meets_memory_goal'] else 'NOT met'}).",
        "",
        _main_rows(payload["main"], clock),
        "",
        "Fused vs naive ShiQ on the same inputs (largest relative difference): "
        + "; ".join(f"{k}={v:.1e}" for k, v in payload["main"][0].get("check", {}).items()),
    ]
    for key, title in (("seq_len", "Scaling with sequence length"), ("vocab", "Scaling with vocabulary")):
        if payload["scaling"].get(key):
            lines += ["", f"## {title} (B = 1, trained output layer)", "", _scaling_rows(payload["scaling"][key], clock)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="batch sizes of the main table")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576, help="H (SmolLM2-135M: 576)")
    ap.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-frozen", action="store_true", help="skip the frozen-output-layer row")
    ap.add_argument("--no-scaling", action="store_true", help="skip the T and V sweeps")
    ap.add_argument("--scaling-seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--scaling-vocabs", type=int, nargs="+", default=[8192, 16384, 32768, 49152])
    ap.add_argument("--scaling-rounds", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=None, help="fused kernel's tokens per tile (default: auto)")
    ap.add_argument("--vocab-chunk-size", type=int, default=None, help="fused kernel's vocabulary per tile (default: auto)")
    ap.add_argument("--clock", choices=CLOCKS, default=None,
                    help="clock of the headline ratios (default: cpu_s with one CPU thread, else wall_s)")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    ap.add_argument("--name", default="loss_kernel", help="stem of the result files")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.hidden, args.vocab = [2], 48, 32, 1000
        args.rounds, args.warmup, args.scaling_rounds = 2, 1, 1
        args.scaling_seq_lens, args.scaling_vocabs = [16, 32, 64], [500, 1000, 2000]
        args.vocab_chunk_size = args.vocab_chunk_size or 256  # tiles smaller than the logits, as at full size
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    dims = dict(hidden=args.hidden, device=device)
    tile = {"chunk_size": args.chunk_size, "vocab_chunk_size": args.vocab_chunk_size}

    main_rows = []
    configs = [(b, False) for b in args.batch] + ([] if args.no_frozen else [(args.batch[0], True)])
    for b, frozen in configs:
        p = make_problem(b, args.seq_len, vocab=args.vocab, frozen_head=frozen, **dims)
        main_rows.append(run_case(p, rounds=args.rounds, warmup=args.warmup, device=device, tile=tile))
        print(f"B={b} frozen={frozen}: fused/SFT time {main_rows[-1]['ratios']['time_fused_over_sft'][clock]['median']:.3f}, "
              f"fused/naive peak memory {main_rows[-1]['ratios']['peak_memory_fused_over_naive']:.3f}", flush=True)

    scaling: dict[str, list[dict[str, Any]]] = {"seq_len": [], "vocab": []}
    if not args.no_scaling:
        for key, values in (("seq_len", args.scaling_seq_lens), ("vocab", args.scaling_vocabs)):
            for x in values:
                t, v = (x, args.vocab) if key == "seq_len" else (args.seq_len, x)
                p = make_problem(1, t, vocab=v, **dims)
                scaling[key].append(run_case(p, rounds=args.scaling_rounds, warmup=1, device=device, check=False, tile=tile))
                print(f"scaling T={t} V={v} done", flush=True)

    first = main_rows[0]
    headline = {
        "config": {k: first[k] for k in ("batch", "seq_len", "hidden", "vocab", "frozen_head")},
        "clock": clock,
        "time_fused_over_sft": first["ratios"]["time_fused_over_sft"][clock]["median"],
        "peak_memory_fused_over_naive": first["ratios"]["peak_memory_fused_over_naive"],
        "working_memory_fused_over_naive": first["ratios"]["working_memory_fused_over_naive"],
    }
    headline["meets_time_goal"] = headline["time_fused_over_sft"] <= TIME_GOAL
    headline["meets_memory_goal"] = headline["peak_memory_fused_over_naive"] <= MEMORY_GOAL
    payload = {
        "benchmark": "loss_kernel",
        "quick": args.quick,
        "goals": {"time_fused_over_sft_max": TIME_GOAL, "peak_memory_fused_over_naive_max": MEMORY_GOAL},
        "machine": machine,
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "scaling_rounds": args.scaling_rounds,
                     "dtype": "float32", "beta": BETA, "threads": torch.get_num_threads(), "tile_args": tile},
        "headline": headline,
        "main": main_rows,
        "scaling": scaling,
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
