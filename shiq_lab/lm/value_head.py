"""DRO's value V_phi(x): a linear head on the prompt's final hidden state, carried by the model it reads.

The head is a submodule of the model (``model.shiq_value_head``), so DDP / FSDP / accelerate see
its parameters like any other. It is listed in the model's ``_keys_to_ignore_on_save`` (the
Hugging Face hook for weights a checkpoint leaves out), so ``save_pretrained`` writes a plain
model checkpoint and resuming loads it without missing-key warnings; the head has its own file,
:data:`VALUE_HEAD_FILE`, next to it (:func:`save_value_head` / :func:`load_value_head`). Every
module that must skip it (the reference weights hash) filters on :data:`VALUE_HEAD_NAME`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from shiq_lab.lm.modes import device_of, unwrap

__all__ = ["VALUE_HEAD_NAME", "VALUE_HEAD_FILE", "ValueHead", "attach_value_head", "value_head_of", "save_value_head",
           "load_value_head"]

VALUE_HEAD_NAME = "shiq_value_head"
VALUE_HEAD_FILE = "shiq_value_head.safetensors"


class ValueHead(nn.Module):
    """DRO's V_phi(x): a zero-initialised linear map of the prompt's final hidden state, in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def value_head_of(model: nn.Module) -> ValueHead | None:
    """The value head a model carries (through DDP-style wrappers), or None."""
    return getattr(unwrap(model), VALUE_HEAD_NAME, None)


def attach_value_head(model: nn.Module, hidden_size: int) -> ValueHead:
    """Give ``model`` a value head (once) on its own device, left out of its saved weights."""
    holder = unwrap(model)
    head = value_head_of(holder)
    if head is None:
        head = ValueHead(hidden_size).to(device_of(holder))
        setattr(holder, VALUE_HEAD_NAME, head)
    keys = {f"{VALUE_HEAD_NAME}.{k}" for k in head.state_dict()}
    ignored = getattr(holder, "_keys_to_ignore_on_save", None)
    holder._keys_to_ignore_on_save = set(ignored or ()) | keys
    return head


def save_value_head(model: nn.Module, folder: str | os.PathLike) -> str | None:
    """Write the model's value head to ``folder/VALUE_HEAD_FILE``; returns the path (None: no head)."""
    head = value_head_of(model)
    if head is None:
        return None
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, VALUE_HEAD_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, path)
    return path


def load_value_head(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load ``folder/VALUE_HEAD_FILE`` into the model's value head (a clear error when it is missing)."""
    head = value_head_of(model)
    if head is None:
        return
    path = os.path.join(folder, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {VALUE_HEAD_FILE}: it was not written by a dro run, so the value "
                                "head cannot be resumed")
    from safetensors.torch import load_file

    head.load_state_dict(load_file(path, device=str(device_of(head))))
