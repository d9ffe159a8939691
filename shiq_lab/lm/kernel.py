"""Per-token log-probabilities straight from hidden states and the output layer, without [B, T, V] logits.

Every token-level loss in :mod:`shiq_lab.losses` consumes only two numbers per token: the log-prob
of the taken action ``logp`` and the log-partition ``logz`` (``token_logprobs``). Their gradient
with respect to the logits is cross-entropy-shaped (docs/method.md, tensor form)::

    d/dl_t [gp_t * logp_t + gz_t * logz_t] = gp_t * onehot(a_t) + (gz_t - gp_t) * softmax(l_t)

so :func:`chunked_token_logprobs` computes ``(logp, logz)`` tile by tile over tokens and vocabulary
(online logsumexp) and, in the backward pass, recomputes each tile's logits to form that gradient and
multiply it into the hidden states and the weight. The largest temporary is one tile, never a
``[B, T, V]`` tensor. Composed with ``shiq_loss`` (or the DPO / DRO / CoPG losses, through
``logp``), autograd gives exactly the closed form ``2*beta*[S_t*onehot - (S_t - delta_t)*softmax]``.

Two strategies, picked automatically:

- ``recompute`` (the output layer is trained): the forward pass keeps only ``logz``; the backward
  pass recomputes the logits. Four matmuls of size N*V*H in all, against three for plain
  cross-entropy, and no [N, V] tensor.
- ``precompute`` (frozen output layer, e.g. LoRA elsewhere): the forward pass also accumulates
  ``E_softmax[W]`` per token ([N, H], flash-attention-style rescaling), so the backward pass is
  ``gp*W[a] + (gz - gp)*E_softmax[W]`` with no matmul: two matmuls, as many as cross-entropy.

Plain PyTorch ops only, so it runs unchanged on CPU and CUDA. No logit soft-capping or scaling.
``compiled=True`` runs the same per-tile steps (:func:`_lse_step`, :func:`_probs`) through
``torch.compile``: the loops, tiles and accumulators stay as they are, and inductor fuses each
tile's elementwise passes (max, exp, sum, casts) into the kernels that read the matmul's output.
The plain path is the reference. The compiled one saves those passes, not matmul time: on a CPU
in fp32 the matmuls take nearly all the time and both run at the same speed; in bf16 the plain
path's casts and exp over fp32 tiles are a visible share, and the compiled one skips the fp32 tile
(``bench_loss_kernel --compiled`` measures both; a GPU, memory-bound on those passes, is where it
is meant to pay).
"""

from __future__ import annotations

import torch

from shiq_lab.losses import _compute_dtype, checks_values

__all__ = ["chunked_token_logprobs", "default_tile", "TILE_ELEMENTS"]

# Elements of one fp32 logits tile. On CPU, 4 MB tiles (1024-4096 vocabulary columns at
# 512-1024 tokens) ran as fast as bigger ones in benchmarks/bench_loss_kernel.py while keeping
# memory down; GPUs want bigger tiles (128 MB here, untuned).
TILE_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}
_MIN_VOCAB_CHUNK = 256
_MAX_TOKEN_CHUNK = 4096


def default_tile(n_tokens: int, vocab: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """``(chunk_size, vocab_chunk_size)`` used when they are not given: tokens first, then vocab.

    A tile holds up to ``TILE_ELEMENTS[device]`` logits: all tokens (up to 4096) and as many
    vocabulary entries as fit, rounded to a multiple of 256.
    """
    budget = TILE_ELEMENTS.get(torch.device(device).type, TILE_ELEMENTS["cuda"])
    n = max(1, min(n_tokens, _MAX_TOKEN_CHUNK))
    v = max(_MIN_VOCAB_CHUNK, (budget // n) // _MIN_VOCAB_CHUNK * _MIN_VOCAB_CHUNK)
    return n, min(v, vocab)


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(total, s + step)) for s in range(0, total, step)]


class _Tiler:
    """The tile ranges, and one reused logits buffer for the plain path (the compiled path has none)."""

    def __init__(self, hidden, weight, chunk_size, vocab_chunk_size, cdt, compiled):
        self.rows = _ranges(hidden.shape[0], chunk_size)
        self.cols = _ranges(weight.shape[0], vocab_chunk_size)
        self.buf = None if compiled else torch.empty(
            min(chunk_size, hidden.shape[0]) * min(vocab_chunk_size, weight.shape[0]), dtype=cdt, device=hidden.device)

    def out(self, n0: int, n1: int, v0: int, v1: int) -> torch.Tensor | None:
        """The [n1-n0, v1-v0] view of the buffer that tile (n0, v0) is written into (None when compiled)."""
        return None if self.buf is None else self.buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)


# The per-tile steps: from one tile's hidden rows and weight rows to what the loops accumulate. The plain path runs them as written, writing each tile into one reused buffer
# (``out``); the compiled path (``compiled=True``) runs the same functions through ``torch.compile``
# with ``out=None``, so the tile is a temporary that inductor fuses into the reductions that read it
# (one kernel for amax + exp + sum instead of four passes over the tile, and no fp32 copy of a bf16 tile).


def _tile(h: torch.Tensor, w: torch.Tensor, shift: torch.Tensor | None, cdt: torch.dtype,
          out: torch.Tensor | None) -> torch.Tensor:
    """Logits ``h @ w.T + shift`` in the compute dtype (``shift`` broadcastable: bias, -logz), into ``out``."""
    if out is None:  # compiled: a temporary (low-precision matmul then fp32, as ``hidden @ weight.T`` does)
        tile = (h @ w.t()).to(cdt)
        return tile if shift is None else tile + shift
    if h.dtype != cdt:
        return torch.add(h @ w.t(), shift, out=out) if shift is not None else out.copy_(h @ w.t())
    if shift is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(shift.expand_as(out), h, w.t(), out=out)


def _lse_step(h: torch.Tensor, w: torch.Tensor, shift: torch.Tensor | None, m: torch.Tensor, s: torch.Tensor,
              acc: torch.Tensor | None, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary tile of the online logsumexp: running max ``m`` and sum ``s`` of exp(l - m), updated.

    ``acc`` (precompute strategy, [n, H], in place): the running sum_v exp(l_v - m) W_v, rescaled like ``s``.
    """
    tile = _tile(h, w, shift, m.dtype, out)
    m_new = torch.maximum(m, tile.amax(1))
    scale = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
    tile = tile.sub_(m_new[:, None]).exp_()
    s = s * scale + tile.sum(1)
    if acc is not None:
        acc.mul_(scale[:, None])
        if w.dtype == acc.dtype:
            acc.addmm_(tile, w)
        else:
            acc.add_(tile.to(w.dtype) @ w)
    return m_new, s


def _probs(h: torch.Tensor, w: torch.Tensor, shift: torch.Tensor, cdt: torch.dtype, dtype: torch.dtype,
           out: torch.Tensor | None) -> torch.Tensor:
    """One tile of the backward pass's softmax P = exp(l - logz) (``shift`` = bias - logz), in ``dtype``."""
    tile = _tile(h, w, shift, cdt, out).exp_()
    return tile if dtype == cdt else tile.to(dtype)


_COMPILED: dict[str, object] = {}
_INDUCTOR_OK: set[str] = set()


def _require_inductor(device: torch.device) -> None:
    """Raise one clear error where ``torch.compile``'s inductor backend cannot build kernels for ``device``."""
    if device.type in _INDUCTOR_OK:
        return
    fix = "or use the plain PyTorch kernel (compiled=False; logits_mode='chunked')"
    try:
        import torch._inductor  # noqa: F401
    except Exception as err:
        raise RuntimeError(f"compiled loss kernel: torch.compile's inductor backend does not import ({err}); {fix}") from err
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError(f"compiled loss kernel on {device}: inductor needs triton for CUDA kernels and it is not "
                               f"installed or does not work here: install triton, {fix}")
    elif device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:
            raise RuntimeError(f"compiled loss kernel on CPU: inductor needs a C++ compiler (g++ or clang++) and found "
                               f"none ({err}): install one, {fix}") from err
    else:
        raise RuntimeError(f"compiled loss kernel: no inductor backend for device {device.type!r}; {fix}")
    _INDUCTOR_OK.add(device.type)


def _steps(compiled: bool, device: torch.device):
    """``(lse_step, probs)``: the functions above, or their compiled versions (made on first use, then cached).

    ``dynamic=True``: one graph serves every tile shape (the number of action tokens changes from batch to
    batch, and with it the default tile), so a training run compiles each step once per dtype / flag set,
    not once per batch; ``fullgraph=True`` makes a graph break an error instead of a silent slow path.
    """
    if not compiled:
        return _lse_step, _probs
    _require_inductor(device)
    if not _COMPILED:
        from torch.fx.experimental import _config as fx_config

        for f in (_lse_step, _probs):
            # no duck sizing: a slice's storage offset that happens to equal a tile size would otherwise
            # become a guard (n0 == chunk_size), and the next row block would recompile
            _COMPILED[f.__name__] = fx_config.patch(use_duck_shape=False)(torch.compile(f, dynamic=True, fullgraph=True))
    return _COMPILED["_lse_step"], _COMPILED["_probs"]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, actions, chunk_size, vocab_chunk_size, precompute, compiled):
        cdt = _compute_dtype(hidden)
        n = hidden.shape[0]
        lse_step, _ = _steps(compiled, hidden.device)
        tiler = _Tiler(hidden, weight, chunk_size, vocab_chunk_size, cdt, compiled)
        logz = torch.empty(n, dtype=cdt, device=hidden.device)
        # the taken action's logit as a row-wise dot product: N*H work, no search through tiles
        chosen = (hidden.to(cdt) * weight[actions].to(cdt)).sum(-1)
        if bias is not None:
            chosen = chosen + bias[actions].to(cdt)
        expected_w = torch.zeros(n, hidden.shape[1], dtype=cdt, device=hidden.device) if precompute else None
        for n0, n1 in tiler.rows:
            # online logsumexp: running max m and running sum s of exp(l - m)
            m = torch.full((n1 - n0,), -torch.inf, dtype=cdt, device=hidden.device)
            s = torch.zeros(n1 - n0, dtype=cdt, device=hidden.device)
            acc = expected_w[n0:n1] if precompute else None
            for v0, v1 in tiler.cols:
                shift = None if bias is None else bias[None, v0:v1].to(cdt)
                m, s = lse_step(hidden[n0:n1], weight[v0:v1], shift, m, s, acc, tiler.out(n0, n1, v0, v1))
            logz[n0:n1] = m + torch.log(s)
            if precompute:
                acc.div_(s[:, None])
        ctx.chunks = (chunk_size, vocab_chunk_size)
        ctx.precompute, ctx.compiled = precompute, compiled
        ctx.save_for_backward(hidden, weight, bias, actions, logz, expected_w)
        return chosen - logz, logz

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_logz):
        hidden, weight, bias, actions, logz, expected_w = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = logz.dtype
        gp = grad_logp.to(cdt)
        coef = grad_logz.to(cdt) - gp  # weight of softmax(l_t) in d/dl_t
        g_hidden = g_weight = g_bias = None

        if ctx.precompute:
            if need_w or need_b:
                raise RuntimeError("chunked_token_logprobs: precompute strategy used while the weight needs a gradient")
            if need_h:
                g = coef[:, None] * expected_w + gp[:, None] * weight[actions].to(cdt)
                g_hidden = g.to(hidden.dtype)
            return g_hidden, None, None, None, None, None, None, None

        chunk_size, vocab_chunk_size = ctx.chunks
        _, probs = _steps(ctx.compiled, hidden.device)
        tiler = _Tiler(hidden, weight, chunk_size, vocab_chunk_size, cdt, ctx.compiled)
        n, h_dim = hidden.shape
        # d/dl_t = coef_t * softmax(l_t) + gp_t * onehot(a_t). The one-hot part is a gather /
        # index_add of N rows; the softmax part needs the tiles, and its per-row factor coef_t is
        # moved out of them: into the hidden rows for the weight gradient (P^T @ (coef*h)) and
        # onto the result rows for the hidden gradient (coef * (P @ W)). A tile then only needs
        # P = exp(l - logz), one pass after the matmul.
        h_scaled = (coef[:, None] * hidden.to(cdt)).to(hidden.dtype) if need_w else None
        if need_h:
            soft_w = torch.zeros(n, h_dim, dtype=cdt, device=hidden.device)  # sum_v P_tv W_v
        if need_w:
            g_weight = torch.empty_like(weight)
        if need_b:
            g_bias = torch.empty(weight.shape[0], dtype=cdt, device=hidden.device)
        one_row_block = len(tiler.rows) == 1
        # P in the weight's dtype for the matmuls; kept in the compute dtype where the bias gradient reads it
        p_dtype = cdt if need_b else weight.dtype
        # vocabulary outer, tokens inner: each weight chunk's gradient is complete after the inner
        # loop, so only a [vocab_chunk, H] accumulator is needed, never a [V, H] one in fp32
        for v0, v1 in tiler.cols:
            w = weight[v0:v1]
            gw_acc = None
            if need_w and not one_row_block:
                gw_acc = g_weight[v0:v1] if weight.dtype == cdt else torch.zeros(v1 - v0, h_dim, dtype=cdt, device=hidden.device)
            for i, (n0, n1) in enumerate(tiler.rows):
                shift = -logz[n0:n1, None] if bias is None else bias[None, v0:v1].to(cdt) - logz[n0:n1, None]
                tile = probs(hidden[n0:n1], w, shift, cdt, p_dtype, tiler.out(n0, n1, v0, v1))  # softmax P
                g = tile if w.dtype == tile.dtype else tile.to(w.dtype)
                if need_h:
                    if w.dtype == cdt:
                        soft_w[n0:n1].addmm_(g, w)
                    else:
                        soft_w[n0:n1] += g @ w
                if need_w:
                    hs = h_scaled[n0:n1]
                    if one_row_block:
                        torch.mm(g.t(), hs, out=g_weight[v0:v1])
                    elif w.dtype == cdt:
                        gw_acc.addmm_(g.t(), hs, beta=0.0 if i == 0 else 1.0)
                    else:
                        gw_acc += g.t() @ hs
                if need_b:
                    part = tile.t().mv(coef[n0:n1])
                    g_bias[v0:v1] = part if i == 0 else g_bias[v0:v1] + part
            if need_w and not one_row_block and weight.dtype != cdt:
                g_weight[v0:v1] = gw_acc
        if need_h:
            g_hidden = (coef[:, None] * soft_w + gp[:, None] * weight[actions].to(cdt)).to(hidden.dtype)
        if need_w:
            g_weight.index_add_(0, actions, (gp[:, None] * hidden.to(cdt)).to(weight.dtype))
        if need_b:
            g_bias = g_bias.index_add_(0, actions, gp).to(bias.dtype)
        return g_hidden, g_weight, g_bias, None, None, None, None, None


def _positive_int(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: must be a positive int (or None for the default tile)")


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    actions: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, actions)`` without ever holding the [B, T, V] logits.

    Args:
        hidden: [B, T, H] (or [N, H]) final hidden states, ``hidden[:, t]`` being the state before
            action t (already shifted, as for :func:`shiq_lab.losses.token_logprobs`).
        weight: [V, H] output layer (``lm_head.weight``), same dtype and device as ``hidden``.
        actions: [B, T] (or [N]) long token ids.
        bias: optional [V] output bias.
        mask: optional [B, T] (or [N]) 0/1 or bool. Positions with 0 give 0 and get no gradient,
            and their actions and states are never read, so padding may hold any id (e.g. -100).
            Shapes stay fixed (no host sync), so masked positions still cost their share of the
            matmuls: to skip them, pass only the kept rows as [N, H] (what
            :func:`shiq_lab.lm.stats.token_stats` does, with positions the host knows). Without a
            mask every action must be a valid id.
        chunk_size, vocab_chunk_size: tile shape (tokens x vocabulary); the default
            (:func:`default_tile`) keeps a tile near 4 MB on CPU. Results do not depend on them
            beyond floating-point summation order.
        compiled: run the same per-tile steps through ``torch.compile`` (inductor), which fuses the
            logsumexp / softmax passes over each tile into one kernel; values equal the plain path's
            up to floating-point rounding. Compiled on first use and cached: one graph per step for
            every tile shape (``dynamic=True``), so changing batch sizes do not recompile. Needs
            inductor's toolchain (triton on CUDA, a C++ compiler on CPU), else one clear error.
            One difference from the plain path: with a frozen output layer in bf16 the forward step
            that also accumulates ``E_softmax[W]`` is a graph of its own, so its ``logz`` can differ
            in the last bit from a no-grad call's (the plain path gives the same bits).

    Returns:
        ``(logp, logz)``, shaped like ``actions``, fp32 (fp64 for fp64 inputs): log pi(a_t|s_t)
        and logsumexp_a l(s_t, a). Differentiable with respect to ``hidden``, ``weight`` and
        ``bias`` (first order).

    With bf16 / fp16 inputs the tile matmuls run in that dtype, as ``hidden @ weight.T`` would;
    the softmax, the logsumexp and the taken action's logit are computed in fp32.

    Value checks (mask 0/1, ids in range) read the tensors and so synchronise with the device;
    inside :func:`shiq_lab.losses.trusted_inputs` they are skipped (the trainer validates its data
    once per dataset).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be the [V, H] output layer, got shape {tuple(weight.shape)}")
    vocab, h_dim = weight.shape
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != h_dim:
        raise ValueError(f"hidden must be [B, T, H] or [N, H] with H={h_dim} (weight's second dim), got shape {tuple(hidden.shape)}")
    if actions.shape != hidden.shape[:-1]:
        raise ValueError(f"actions shape {tuple(actions.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}")
    if actions.dtype != torch.long:
        raise TypeError(f"actions must be torch.long token ids, got {actions.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one float dtype: cast one of them")
    if hidden.device != weight.device or actions.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and actions ({actions.device}) must be on one device")
    if bias is not None and (bias.shape != (vocab,) or bias.device != weight.device):
        raise ValueError(f"bias must be [V]=({vocab},) on {weight.device}, got shape {tuple(bias.shape)} on {bias.device}")
    _positive_int("chunk_size", chunk_size)
    _positive_int("vocab_chunk_size", vocab_chunk_size)

    out_shape = actions.shape
    flat_h = hidden.reshape(-1, h_dim)
    flat_a = actions.reshape(-1)
    keep = None
    if mask is not None:
        if mask.shape != out_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal actions shape {tuple(out_shape)}")
        if checks_values() and mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must hold only 0 and 1 (1 on positions to compute)")
        # fixed shapes, no host sync: masked rows become (zero state, token 0) and their outputs 0, so
        # whatever padding holds (garbage ids, NaN states) reaches neither a result nor a gradient
        keep = mask.reshape(-1).to(device=hidden.device, dtype=torch.bool)
        flat_a = torch.where(keep, flat_a, torch.zeros((), dtype=flat_a.dtype, device=flat_a.device))
        flat_h = torch.where(keep[:, None], flat_h, torch.zeros((), dtype=flat_h.dtype, device=flat_h.device))
    if checks_values() and flat_a.numel():
        bad = (flat_a < 0) | (flat_a >= vocab)
        if bool(bad.any()):
            raise ValueError(
                f"actions hold {int(flat_a[bad][0])}, not a token id in [0, {vocab}): pass mask= (0 on padding) so "
                "those positions are skipped"
            )

    cdt = _compute_dtype(hidden)
    n = flat_h.shape[0]
    if n == 0:
        zeros = torch.zeros(out_shape, dtype=cdt, device=hidden.device)
        # keep the graph connected so .backward() gives zero gradients instead of failing
        tie = hidden.sum() * 0 + weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0)
        return zeros + tie.to(cdt), zeros + tie.to(cdt)
    d_tok, d_voc = default_tile(n, vocab, hidden.device)
    chunk_size = min(chunk_size or d_tok, n)
    vocab_chunk_size = min(vocab_chunk_size or d_voc, vocab)
    precompute = (
        torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )
    logp, logz = _ChunkedTokenLogprobs.apply(
        flat_h.contiguous(), weight.contiguous(), bias, flat_a.contiguous(), chunk_size, vocab_chunk_size, precompute,
        bool(compiled),
    )
    if keep is not None:
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        logp, logz = torch.where(keep, logp, zero), torch.where(keep, logz, zero)
    return logp.reshape(out_shape), logz.reshape(out_shape)
