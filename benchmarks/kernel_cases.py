"""The loss-kernel cases (forward + backward from the final hidden states and the output layer).

Shared by ``bench_loss_kernel`` (the main table), ``bench_scaling`` (sweeps over T and V) and the
GPU check (which adds Liger's fused linear cross-entropy where it is installed):

- ``sft_ce``: ``F.cross_entropy(hidden @ W.T, targets)``, the SFT baseline (PyTorch).
- ``shiq_naive``: ``token_logprobs(hidden @ W.T, actions)`` + ``shiq_loss`` (full fp32 logits).
- ``shiq_fused``: ``chunked_token_logprobs(hidden, W, actions)`` + ``shiq_loss`` (tiles only).

- ``liger_flce`` (CUDA, where ``liger-kernel`` is installed): Liger's fused linear cross-entropy
  (Triton), the fused loss a GPU user would compare with: three output-layer matmuls, no logits.

Every response token is a policy token (mask all ones), so all compute the same N x V logits.
:func:`precision_check` compares bf16 with fp64 values and gradients (the CPU test's tolerances).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    CLOCKS,
    fmt_bytes,
    import_error,
    interleaved_times,
    markdown_table,
    measure_memory,
    ratio_summary,
    time_summary,
)
from shiq_lab.lm.kernel import chunked_token_logprobs, default_tile
from shiq_lab.losses import shiq_loss, token_logprobs

__all__ = [
    "BETA",
    "METHODS",
    "METHOD_NAMES",
    "Problem",
    "check_fused_equals_naive",
    "kernel_table",
    "make_problem",
    "run_case",
    "sft_ce",
    "shiq_fused",
    "shiq_naive",
]

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


_LIGER: dict[str, Any] = {}


def liger_flce(p: Problem) -> torch.Tensor:
    """Liger Kernel's fused linear cross-entropy (Triton; CUDA only) on the same hidden states and output layer."""
    if "loss" not in _LIGER:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        _LIGER["loss"] = LigerFusedLinearCrossEntropyLoss()
    targets = p.actions.masked_fill(p.mask == 0, -100)
    return _LIGER["loss"](p.weight, p.hidden.flatten(0, 1), targets.flatten())


def liger_available(device: torch.device) -> bool:
    """Liger's kernel runs here: CUDA, ``liger_kernel`` imports, and one tiny forward + backward works (Triton).

    On a CPU only the stand-in of ``gpu_check --dry-run`` (``benchmarks/standins``) counts: the code path is run,
    nothing is measured."""
    if import_error("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss"):
        return False
    import liger_kernel

    if device.type != "cuda" and not getattr(liger_kernel, "IS_STANDIN", False):
        return False
    try:
        p = make_problem(1, 16, 64, 256, dtype=torch.bfloat16, device=device)
        loss = liger_flce(p)
        loss.backward()
        # the same value as PyTorch's cross-entropy on the same logits (a wrong call order would not be)
        expected = F.cross_entropy((p.hidden.flatten(0, 1) @ p.weight.T).float(), p.actions.flatten())
        if not torch.allclose(loss.float(), expected, rtol=2e-2, atol=2e-2):
            raise RuntimeError(f"Liger's loss {float(loss):.4f} differs from cross-entropy {float(expected):.4f}")
    except Exception as err:  # noqa: BLE001 -- a broken peer is skipped with its reason, not a failed benchmark
        print(f"Liger's kernel fails here: {type(err).__name__}: {err}"[:400], flush=True)
        return False
    return True


#: the floor of time(ShiQ fused) / time(fused cross-entropy), trained output layer: 4 output-layer
#: matmuls (forward, the backward's recompute, two gradient matmuls) against 3 (no recompute)
MATMUL_FLOOR = 4 / 3

METHODS: dict[str, Callable[..., torch.Tensor]] = {"sft_ce": sft_ce, "shiq_naive": shiq_naive, "shiq_fused": shiq_fused,
                                                   "liger_flce": liger_flce}


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
             tile: dict[str, int | None] | None = None, liger: bool = False) -> dict[str, Any]:
    """Time and memory of the methods on one problem, and the ratios the goals are stated in.

    ``tile`` holds ``chunk_size`` / ``vocab_chunk_size`` for the fused kernel (None: its default);
    ``liger`` adds Liger's fused linear cross-entropy and the ratios against it.
    """
    tile = tile or {"chunk_size": None, "vocab_chunk_size": None}
    names = (*METHOD_NAMES, "liger_flce") if liger else METHOD_NAMES
    cases = {m: _step(p, m, tile) for m in names}
    times = interleaved_times(cases, rounds=rounds, warmup=warmup, device=device, reset=_reset(p))
    memory = {}
    for m in names:
        memory[m] = measure_memory(cases[m], device)
        _reset(p)()
    n_tok, vocab = p.actions.numel(), p.weight.shape[0]
    d_tok, d_voc = default_tile(n_tok, vocab, device)
    row: dict[str, Any] = {
        **p.shape,
        "frozen_head": not p.weight.requires_grad,
        "tile": [tile["chunk_size"] or d_tok, tile["vocab_chunk_size"] or d_voc],
        "full_logits_fp32_bytes": n_tok * vocab * 4,
        "dtype": str(p.hidden.dtype).removeprefix("torch."),
        "times": {m: {c: time_summary(times[m][c]) for c in CLOCKS} for m in names},
        "memory": memory,
        "ratios": {
            "time_fused_over_sft": {c: ratio_summary(times["shiq_fused"][c], times["sft_ce"][c]) for c in CLOCKS},
            "time_naive_over_sft": {c: ratio_summary(times["shiq_naive"][c], times["sft_ce"][c]) for c in CLOCKS},
            "peak_memory_fused_over_naive": memory["shiq_fused"]["peak_bytes"] / memory["shiq_naive"]["peak_bytes"],
            "working_memory_fused_over_naive": memory["shiq_fused"]["working_bytes"] / memory["shiq_naive"]["working_bytes"],
            "peak_memory_fused_over_sft": memory["shiq_fused"]["peak_bytes"] / memory["sft_ce"]["peak_bytes"],
        },
    }
    if liger:
        q = row["ratios"]
        q["time_fused_over_liger"] = {c: ratio_summary(times["shiq_fused"][c], times["liger_flce"][c]) for c in CLOCKS}
        q["peak_memory_fused_over_liger"] = memory["shiq_fused"]["peak_bytes"] / memory["liger_flce"]["peak_bytes"]
        q["time_fused_over_liger_over_floor"] = {c: {k: v / MATMUL_FLOOR if k != "n" else v
                                                     for k, v in q["time_fused_over_liger"][c].items()} for c in CLOCKS}
    if check:
        row["check"] = check_fused_equals_naive(p, tile)
    return row


def kernel_table(rows: list[dict[str, Any]], clock: str) -> str:
    """One row per problem: times and peaks of every method, the largest temporaries, fused / SFT time."""
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


def precision_check(device: torch.device, *, batch: int = 2, seq_len: int = 64, hidden: int = 64, vocab: int = 2000,
                    seed: int = 0) -> dict[str, Any]:
    """bf16 against fp64: the fused ShiQ loss's value and gradients, with the CPU test's tolerances.

    The fp64 naive path is the truth; the plain bf16 path (full logits in bf16) is what bf16 costs
    anyway. As in ``tests/test_fused_logprobs.py::test_bf16_as_accurate_as_the_bf16_reference``, the
    fused bf16 kernel passes when its max relative error is < 0.03 and <= 2 x the plain bf16 error + 1e-3.
    Also reports fp32 against fp64 (the fused fp32 kernel, expected ~1e-6).
    """
    grads: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, dtype, method in (("fp64", torch.float64, "shiq_naive"), ("bf16_plain", torch.bfloat16, "shiq_naive"),
                                ("bf16_fused", torch.bfloat16, "shiq_fused"), ("fp32_fused", torch.float32, "shiq_fused")):
        p = make_problem(batch, seq_len, hidden, vocab, dtype=dtype, device=device, seed=seed)
        if dtype == torch.float64:  # the truth in fp64 throughout (reference statistics stay fp32 otherwise)
            p.ref_logp, p.ref_logz, p.rewards = (t.double() for t in (p.ref_logp, p.ref_logz, p.rewards))
        loss = METHODS[method](p)
        loss.backward()
        grads[name] = (loss.detach().double().reshape(1), p.hidden.grad.double(), p.weight.grad.double())
    out: dict[str, Any] = {"shape": {"batch": batch, "seq_len": seq_len, "hidden": hidden, "vocab": vocab},
                           "device": str(device), "errors": {}, "passed": True}
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        truth = grads["fp64"][i]
        scale = float(truth.abs().max().clamp_min(1e-30))
        err = {k: float((grads[k][i] - truth).abs().max()) / scale for k in ("bf16_plain", "bf16_fused", "fp32_fused")}
        ok = err["bf16_fused"] < 0.03 and err["bf16_fused"] <= 2 * err["bf16_plain"] + 1e-3 and err["fp32_fused"] < 1e-4
        out["errors"][what] = {**err, "passed": ok}
        out["passed"] = out["passed"] and ok
    return out
