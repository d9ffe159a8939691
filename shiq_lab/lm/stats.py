"""Per-token statistics (log pi of the action, log-partition of the state) of any causal LM.

One function, :func:`token_stats`, gives them to every caller: the trainer (policy), the reference
precompute, the token views, the evaluation of generations and the simple fit. So at theta = ref
both sides are bit-identical wherever a policy is compared with its reference on the same batch.

One capture mechanism, :func:`capture`: the model's own forward (so DDP / accelerate / FSDP hooks
run) with a forward hook on the decoder that keeps the final hidden states, and ``logits_to_keep=1``
so the output layer sees one position per row. The statistics then come from
:func:`shiq_lab.lm.kernel.chunked_token_logprobs` on the response positions only; callers that also
need every vocabulary entry of some states (top-k, per-state KL) read them chunk by chunk with
:class:`StateLogits` from the same capture.

Which positions: :func:`action_positions` lists them. Computed where the mask lives on the host (a
collator), it costs no device synchronisation, and the gathers that follow have shapes the host
already knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shiq_lab.lm.kernel import chunked_token_logprobs
from shiq_lab.lm.modes import unwrap
from shiq_lab.losses import checks_values, token_logprobs

__all__ = [
    "LOGITS_MODES",
    "causal_lm_parts",
    "resolve_logits_mode",
    "action_positions",
    "Capture",
    "capture",
    "forward_hidden",
    "stats_from_hidden",
    "token_stats",
    "StateLogits",
]


#: how the per-token statistics are computed (see :func:`resolve_logits_mode`); ``"chunked-compiled"`` is
#: ``"chunked"`` with the kernel's per-tile steps through ``torch.compile`` (explicit only: ``"auto"`` never picks it)
LOGITS_MODES = ("auto", "chunked", "chunked-compiled", "full")


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """``(causal_lm, decoder, output_layer)`` of a possibly wrapped (DDP, PEFT) causal LM."""
    core = unwrap(model)
    if hasattr(core, "get_base_model"):  # peft.PeftModel: the causal LM with adapter layers inside
        core = core.get_base_model()
    if not hasattr(core, "get_decoder") or not hasattr(core, "get_output_embeddings"):
        raise TypeError(f"{type(core).__name__} is not a Hugging Face causal LM (no get_decoder / get_output_embeddings)")
    head = core.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(core).__name__} has no output layer (get_output_embeddings() is None)")
    return core, core.get_decoder(), head


def resolve_logits_mode(model: torch.nn.Module, mode: str = "auto") -> str:
    """``"chunked"`` (hidden states x output layer, tile by tile) or ``"full"`` (the model's own logits).

    ``"chunked-compiled"`` is ``"chunked"`` with ``compiled=True`` in
    :func:`~shiq_lab.lm.kernel.chunked_token_logprobs` (the same kernel, its per-tile steps fused by
    ``torch.compile``; needs triton on CUDA or a C++ compiler on CPU). An explicit mode is returned
    as it is. ``"auto"`` picks ``"chunked"`` unless the output layer cannot be read as a plain [V, H] matrix
    next to the forward pass: a model that is not a Hugging Face causal LM (its logits may be
    post-processed), logit soft-capping or scaling in the config, an adapter on the output layer,
    or a sharded weight (FSDP / DeepSpeed ZeRO-3), where ``"full"`` is the safe path.
    """
    if mode not in LOGITS_MODES:
        raise ValueError(f"logits_mode={mode!r}: choose one of {', '.join(map(repr, LOGITS_MODES))}")
    if mode != "auto":
        return mode
    try:
        core, _, head = causal_lm_parts(model)
    except TypeError:
        return "full"
    cfg = getattr(core, "config", None)
    special = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
               if getattr(cfg, k, None) not in (None, 1, 1.0)]
    weight = getattr(head, "weight", None)
    sharded = weight is None or weight.dim() != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") or \
        type(weight).__name__ == "DTensor"
    if special or hasattr(head, "base_layer") or sharded:
        return "full"
    return "chunked"


def action_positions(action_mask: torch.Tensor) -> torch.Tensor:
    """[N] flat positions ``b * L + t`` (t >= 1) of the action tokens of a [B, L] mask, row-major.

    Call it on a host (CPU) mask, e.g. in a collator: on an accelerator ``nonzero`` waits for the
    device. Position 0 is never an action (no state before the first token).
    """
    nz = torch.nonzero(action_mask[:, 1:])
    return nz[:, 0] * action_mask.shape[1] + nz[:, 1] + 1


@dataclass
class Capture:
    """What one forward pass kept: final hidden states [B, L, H] (None for a model whose decoder cannot
    be hooked) and, in ``"full"`` mode only, the model's logits [B, L, V]."""

    mode: str
    hidden: torch.Tensor | None
    logits: torch.Tensor | None


def capture(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: str) -> Capture:
    """Run ``model`` once and keep its final hidden states (and its logits in ``"full"`` mode).

    In ``"chunked"`` mode ``logits_to_keep=1`` keeps the output layer to one position per row
    (architectures without that argument run their output layer in full, and the logits are dropped).
    """
    try:
        _, decoder, _ = causal_lm_parts(model)
    except TypeError:
        if mode != "full":
            raise
        decoder = None
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook) if decoder is not None else None
    try:
        if mode == "full":
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            try:
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            except TypeError as err:  # architectures without logits_to_keep
                if "logits_to_keep" not in str(err):
                    raise
                captured.clear()
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    if decoder is not None and not captured:
        raise RuntimeError("the decoder's forward hook did not fire: is get_decoder() part of the forward pass?")
    return Capture(mode, captured[-1] if captured else None, out.logits if mode == "full" else None)


def forward_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, full_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, logits)`` of :func:`capture` (``logits`` None unless ``full_logits``)."""
    cap = capture(model, input_ids, attention_mask, mode="full" if full_logits else "chunked")
    if cap.hidden is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM: no decoder to take hidden states from")
    return cap.hidden, cap.logits


def _positions(action_mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    return action_positions(action_mask) if positions is None else positions.to(action_mask.device)


def _scatter(values: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[B, L] zeros with ``values`` at flat ``positions`` (differentiable)."""
    flat = torch.zeros(shape.numel(), dtype=values.dtype, device=values.device)
    return flat.index_copy(0, positions, values).view(shape)


def stats_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    positions: torch.Tensor | None = None,
    cast_lm_head_to_fp32: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, logz)`` [B, L] from final hidden states, on action tokens only (0 elsewhere).

    Position t holds the statistics of generating ``input_ids[t]`` from the state after t-1
    tokens; position 0 is always 0 (no state before the first token). ``positions``: the
    :func:`action_positions` of ``action_mask``, when the caller has them (no device sync).
    Under autocast the output layer's matmuls run in the autocast dtype (as the model's own
    ``lm_head`` would), unless ``cast_lm_head_to_fp32``; logsumexp and gradients accumulate in fp32.
    ``compiled``: the kernel's compiled path (``logits_mode="chunked-compiled"``).
    """
    _, _, head = causal_lm_parts(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    pos = _positions(action_mask, positions)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos - 1)  # the state before each action
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and not cast_lm_head_to_fp32:
        # mixed precision: the output layer's matmuls run in the autocast dtype, as the model's own lm_head
        # (and SFT's, TRL's, Liger's) would under autocast; the kernel still accumulates logsumexp and the
        # gradients in fp32. Casting the fp32 master weights is autocast's own per-forward copy.
        cdt = torch.get_autocast_dtype(device_type)
        weight = weight.to(cdt)
        bias = bias.to(cdt) if bias is not None else None
        h = h.to(cdt)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    actions = input_ids.reshape(-1).index_select(0, pos)
    with torch.autocast(device_type=device_type, enabled=False):
        logp, logz = chunked_token_logprobs(h, weight, actions, bias=bias, chunk_size=chunk_size, compiled=compiled)
    return _scatter(logp, pos, input_ids.shape), _scatter(logz, pos, input_ids.shape)


def _stats_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sel = logits.reshape(-1, logits.shape[-1]).index_select(0, pos - 1)
    actions = input_ids.reshape(-1).index_select(0, pos)
    if checks_values() and actions.numel() and bool(((actions < 0) | (actions >= sel.shape[-1])).any()):
        raise ValueError(f"an action token is not an id in [0, {sel.shape[-1]}): tokenise with the model's tokenizer")
    logp, logz = token_logprobs(sel[None], actions[None])
    return _scatter(logp[0], pos, input_ids.shape), _scatter(logz[0], pos, input_ids.shape)


def token_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    return_hidden: bool = False,
    positions: torch.Tensor | None = None,
    return_capture: bool = False,
    cast_lm_head_to_fp32: bool = False,
) -> tuple[Any, ...]:
    """``(logp, logz)`` [B, L] fp32 of a causal LM, aligned to ``input_ids``, 0 off ``action_mask``.

    ``logits_mode`` (see :func:`resolve_logits_mode`): ``"chunked"`` never builds [B, T, V] logits
    (``"chunked-compiled"``: the same, its tiles fused by ``torch.compile``); ``"full"`` uses the model's
    logits (selected rows only are converted to fp32). ``positions``:
    :func:`action_positions` of ``action_mask`` computed on the host (else computed here: one
    device sync on an accelerator). With ``return_hidden=True`` also returns the final hidden states
    [B, L, H]; with ``return_capture=True`` the whole :class:`Capture` instead (for :class:`StateLogits`).
    ``cast_lm_head_to_fp32``: see :func:`stats_from_hidden` (chunked mode; in ``"full"`` mode the model's own
    ``lm_head`` runs as autocast says).
    """
    mode = resolve_logits_mode(model, logits_mode)
    cap = capture(model, input_ids, attention_mask, mode=mode)
    pos = _positions(action_mask, positions)
    if mode == "full":
        logp, logz = _stats_from_logits(cap.logits, input_ids, pos)
    else:
        logp, logz = stats_from_hidden(model, cap.hidden, input_ids, action_mask, chunk_size=chunk_size, positions=pos,
                                       cast_lm_head_to_fp32=cast_lm_head_to_fp32, compiled=mode == "chunked-compiled")
    if return_capture:
        return logp, logz, cap
    return (logp, logz, cap.hidden) if return_hidden else (logp, logz)


class StateLogits:
    """fp32 [n, V] logits of selected states of one :class:`Capture`, chunk by chunk (never [B, T, V]).

    ``states``: flat indices ``b * L + t`` of the states (the state at t precedes token t+1). From
    hidden states the output layer runs on one chunk at a time; in ``"full"`` mode the selected
    rows of the model's logits are kept.
    """

    def __init__(self, model: torch.nn.Module, cap: Capture, states: torch.Tensor) -> None:
        self.mode = cap.mode
        if cap.mode == "full":
            self.hidden, self.head = None, None
            self.full: torch.Tensor | None = cap.logits.reshape(-1, cap.logits.shape[-1]).index_select(0, states)
        else:
            self.head = causal_lm_parts(model)[2]
            self.hidden = cap.hidden.reshape(-1, cap.hidden.shape[-1]).index_select(0, states)
            self.full = None

    def __len__(self) -> int:
        return len(self.full if self.full is not None else self.hidden)

    @torch.no_grad()
    def __call__(self, i0: int, i1: int, device: torch.device | None = None) -> torch.Tensor:
        """fp32 [i1 - i0, V] logits of states i0..i1-1."""
        if self.full is not None:
            out = self.full[i0:i1]
        else:
            w, b = self.head.weight, getattr(self.head, "bias", None)
            h = self.hidden[i0:i1]
            out = torch.nn.functional.linear(h.to(w.dtype), w, b)
        return out.to(device=device if device is not None else out.device, dtype=torch.float32)
