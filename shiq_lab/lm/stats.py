"""Per-token statistics (log pi of the action, log-partition of the state) of any causal LM.

The policy and the reference go through the same function, so at theta = ref both sides are bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch

from shiq_lab.lm.kernel import chunked_token_logprobs
from shiq_lab.losses import token_logprobs

# ---------------------------------------------------------------------------------------------
# per-token statistics of a model
# ---------------------------------------------------------------------------------------------


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """``(causal_lm, decoder, output_layer)`` of a possibly wrapped (DDP, PEFT) causal LM."""
    core = model
    while hasattr(core, "module") and isinstance(core.module, torch.nn.Module):  # DDP / accelerate wrappers
        core = core.module
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

    ``"auto"`` picks ``"chunked"`` unless the output layer cannot be read as a plain [V, H] matrix
    next to the forward pass: logit soft-capping or scaling in the config, an adapter on the output
    layer, or a sharded weight (FSDP / DeepSpeed ZeRO-3), where ``"full"`` is the safe path.
    """
    if mode not in ("auto", "chunked", "full"):
        raise ValueError(f"logits_mode={mode!r}: choose 'auto', 'chunked' or 'full'")
    if mode != "auto":
        return mode
    core, _, head = causal_lm_parts(model)
    cfg = getattr(core, "config", None)
    special = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
               if getattr(cfg, k, None) not in (None, 1, 1.0)]
    weight = getattr(head, "weight", None)
    sharded = weight is None or weight.dim() != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") or \
        type(weight).__name__ == "DTensor"
    if special or hasattr(head, "base_layer") or sharded:
        return "full"
    return "chunked"


def forward_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, full_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, logits)``: [B, L, H] final hidden states (after the last norm), via the model's own forward.

    The call goes through ``model`` itself (so DDP / accelerate / FSDP hooks run) and a forward
    hook on the decoder captures its output. Unless ``full_logits``, ``logits_to_keep=1`` keeps the
    output layer to one position and ``logits`` is None.
    """
    _, decoder, _ = causal_lm_parts(model)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook)
    try:
        if full_logits:
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
        handle.remove()
    if not captured:
        raise RuntimeError("the decoder's forward hook did not fire: is get_decoder() part of the forward pass?")
    return captured[-1], (out.logits if full_logits else None)


def stats_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, logz)`` [B, L] from final hidden states, on policy tokens only (0 elsewhere).

    Position t holds the statistics of generating ``input_ids[t]`` from the state after t-1
    tokens; position 0 is always 0 (no state before the first token).
    """
    _, _, head = causal_lm_parts(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    mask = action_mask[:, 1:].bool()
    h = hidden[:, :-1]
    if h.dtype != weight.dtype:  # autocast gives low-precision hidden states next to fp32 weights
        h = h.to(weight.dtype)
    with torch.autocast(device_type=h.device.type, enabled=False):
        logp, logz = chunked_token_logprobs(h, weight, input_ids[:, 1:], bias=bias, mask=mask, chunk_size=chunk_size)
    pad = torch.zeros(logp.shape[0], 1, dtype=logp.dtype, device=logp.device)
    return torch.cat([pad, logp], 1), torch.cat([pad, logz], 1)


def _stats_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = action_mask[:, 1:].bool()
    sel_logp, sel_logz = token_logprobs(logits[:, :-1][mask][None], input_ids[:, 1:][mask][None])
    full_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
    logp = torch.zeros(input_ids.shape, dtype=sel_logp.dtype, device=input_ids.device).masked_scatter(full_mask, sel_logp[0])
    logz = torch.zeros(input_ids.shape, dtype=sel_logz.dtype, device=input_ids.device).masked_scatter(full_mask, sel_logz[0])
    return logp, logz


def token_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    return_hidden: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(logp, logz)`` [B, L] fp32 of a causal LM, aligned to ``input_ids``, 0 off ``action_mask``.

    ``logits_mode`` (see :func:`resolve_logits_mode`): ``"chunked"`` never builds [B, T, V] logits;
    ``"full"`` uses the model's logits (selected rows only are converted to fp32). With
    ``return_hidden=True`` also returns the final hidden states [B, L, H].
    """
    mode = resolve_logits_mode(model, logits_mode)
    hidden, logits = forward_hidden(model, input_ids, attention_mask, full_logits=mode == "full")
    if mode == "full":
        logp, logz = _stats_from_logits(logits, input_ids, action_mask)
    else:
        logp, logz = stats_from_hidden(model, hidden, input_ids, action_mask, chunk_size=chunk_size)
    return (logp, logz, hidden) if return_hidden else (logp, logz)


