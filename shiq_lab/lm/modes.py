"""A model's wrappers, device, train / eval mode and reference, each read or switched in one place.

Every function here hands the caller's model back as it found it: :func:`eval_mode`,
:func:`as_reference` and :func:`on_device` restore the mode, the adapters and the device on exit,
also when the block raises.

"The reference of this model" has one rule (:func:`as_reference`): a reference module when one
is given; otherwise a PEFT model with its adapters disabled (:func:`is_peft` is the one detection
rule); otherwise, only where the caller says that a plain model is its own reference
(``plain_is_reference=True``: the reference cache, which is handed the reference itself), the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["unwrap", "device_of", "is_peft", "eval_mode", "as_reference", "on_device"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / accelerate / ``torch.compile``-style ``.module`` wrappers (PEFT is kept)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def device_of(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model whose adapters can be switched off (its base is its reference)."""
    core = unwrap(model)
    return callable(getattr(core, "disable_adapter", None)) and hasattr(core, "peft_config")


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Models in eval mode (no dropout) for the duration; each gets its own mode back afterwards."""
    kept = [m for m in models if m is not None]
    # every submodule's flag: a caller may have frozen some parts in eval mode inside a training model
    modes = [[(sub, sub.training) for sub in m.modules()] for m in kept]
    try:
        for m in kept:
            m.eval()
        yield
    finally:
        for saved in modes:
            for sub, mode in saved:
                sub.training = mode


@contextlib.contextmanager
def as_reference(
    model: torch.nn.Module, reference: torch.nn.Module | None = None, *, plain_is_reference: bool = False
) -> Iterator[torch.nn.Module]:
    """The reference of ``model``, in eval mode: ``reference``, or ``model`` with its adapters disabled.

    Args:
        model: the policy (or, with ``plain_is_reference``, the reference itself).
        reference: a separate reference model; used as it is (moved nowhere).
        plain_is_reference: a model that is not PEFT is then its own reference; without it such a
            model with ``reference=None`` is an error (the policy would be compared with itself).
    """
    if reference is not None:
        with eval_mode(reference):
            yield reference
        return
    if is_peft(model):
        with eval_mode(model), unwrap(model).disable_adapter():
            yield model
        return
    if plain_is_reference:
        with eval_mode(model):
            yield model
        return
    raise ValueError("reference=None means 'the policy with its adapters disabled', which needs a peft model; pass "
                     "the reference model (e.g. the checkpoint before fine-tuning) instead")


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``device`` (None: where it is) and move it back afterwards."""
    home = device_of(model)
    target = torch.device(device) if device is not None else home
    if target.type == home.type and (target.index is None or target.index == home.index):
        yield home
        return
    if getattr(model, "hf_device_map", None):
        raise ValueError(f"the model is spread over devices (hf_device_map); it cannot be moved to {target}: "
                         "pass device=None")
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)
