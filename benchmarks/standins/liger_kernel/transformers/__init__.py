"""``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss``, the plain PyTorch way (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of ``_input @ lin_weight.T`` (+ ``bias``) against ``target``, as Liger's fused loss computes it."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if _input.dim() != 2 or target.dim() != 1:
            raise ValueError(f"_input must be [BT, H] and target [BT] (as Liger's), got {tuple(_input.shape)}, "
                             f"{tuple(target.shape)}")
        logits = F.linear(_input, lin_weight, bias).float()  # Liger upcasts each logits chunk to fp32
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)
