"""Grouping, splitting, pairing, padding and collation of tokenised rows.

Padding lives here once: :func:`pad` (TRL's signature) pads a list of 1-D sequences, and every batch
of the project is built with it -- the trainer's :class:`ShiQCollator`, :func:`batch_responses` (the
views and the simple fit), the evaluation of generations (right padding) and sampling (left padding).
:func:`pad_token_id` is the one answer to "which id pads": the pad token, else EOS, else an error.

Alignment (one convention): per-token arrays (``action_mask``, ``token_rewards``, ``ref_logp``) are
aligned to ``input_ids`` -- entry ``t`` describes token ``t``, the action taken in the state made of
tokens ``0..t-1``. Losses work on the ``[B, L-1]`` layout ``x[:, 1:]``, whose column ``t`` is the
action ``t+1`` predicted from ``logits[:, t]``; :class:`PaddedBatch` stores that layout, sliced from
input-aligned rows.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset

from shiq_lab.data.formats import DataValidationError, _as_dataset, _prompt_key, _require_tokenized
from shiq_lab.losses import response_pairs

if TYPE_CHECKING:
    from shiq_lab.data.encode import EncodedResponse


def group_by_prompt(ds: Dataset, *, min_size: int = 2) -> Dataset:
    """One row per ``group`` (each column becomes the list of its members' values), for pairwise losses.

    Groups smaller than ``min_size`` cannot form a pair and are dropped with a warning. A batch of
    such rows keeps every response of a prompt in the same batch and on the same process.
    """
    _require_tokenized(ds, "group_by_prompt")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(ds["group"]):
        members.setdefault(int(g), []).append(i)
    keep = [idx for idx in members.values() if len(idx) >= min_size]
    if len(keep) < len(members):
        warnings.warn(f"group_by_prompt: dropped {len(members) - len(keep)} of {len(members)} prompts with fewer than "
                      f"{min_size} responses (a pairwise loss needs two responses to one prompt)", stacklevel=2)
    if not keep:
        raise DataValidationError(
            "no prompt has two responses: pairwise losses (dpo, copg) need rows sharing a prompt or a 'group'; "
            "use loss_type='shiq' or 'dro' for one response per prompt")
    table = ds.to_dict()
    return Dataset.from_dict({col: [[table[col][i] for i in idx] for idx in keep] for col in ds.column_names})


def split_by_prompt(ds: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, held_out)``: about ``fraction`` of the prompts (all their rows) held out.

    Splitting by prompt (or ``group`` column) keeps a prompt's responses together, so pairwise
    losses keep their pairs and no prompt is on both sides. Both splits get a ``source_row`` column
    (the row's index in ``ds``, unless ``ds`` already has one), so validation errors name the row of
    the user's file, not of the split.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r}: must be in (0, 1)")
    ds = _as_dataset(ds)
    if "source_row" not in ds.column_names:  # errors in either split name the row of the user's data
        ds = ds.add_column("source_row", list(range(len(ds))))
    cols = set(ds.column_names)
    if "group" in cols:
        keys = [str(g) for g in ds["group"]]
    elif "prompt" in cols:
        keys = [_prompt_key(p) for p in ds["prompt"]]
    elif "prompt_ids" in cols:
        keys = [json.dumps(list(p)) for p in ds["prompt_ids"]]
    else:  # multiturn: the conversation up to the first assistant turn
        keys = [_prompt_key(list(msgs[: next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), 0)]))
                for msgs in ds["messages"]]
    unique = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_out = max(1, round(fraction * len(unique)))
    if n_out >= len(unique):
        raise ValueError(f"fraction={fraction} of {len(unique)} prompts leaves no training prompt")
    held = {unique[i] for i in order[:n_out]}
    train_idx = [i for i, k in enumerate(keys) if k not in held]
    held_idx = [i for i, k in enumerate(keys) if k in held]
    return ds.select(train_idx), ds.select(held_idx)


def make_pairs(group: torch.Tensor, returns: torch.Tensor, mode: str) -> torch.Tensor:
    """[P, 2] row-index pairs of responses sharing a group: :func:`shiq_lab.losses.response_pairs` with ``rule=mode``.

    ``mode="all"``: every unordered pair (CoPG). ``mode="preference"``: ordered (better, worse) by
    return, ties skipped (DPO's chosen/rejected).
    """
    if mode not in ("all", "preference"):
        raise ValueError(f"pair mode={mode!r}: choose 'all' or 'preference'")
    return response_pairs(group, rule=mode, returns=returns)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# padding and batching
# ---------------------------------------------------------------------------------------------


def pad(
    tensors: Sequence[torch.Tensor | Sequence[Any]],
    padding_value: float = 0,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Stack 1-D sequences of different lengths into one ``[B, L]`` tensor (as ``trl.trainer.utils.pad``).

    ``padding_side="right"`` keeps each row at the start (training, scoring); ``"left"`` aligns rows
    to the end (generation). ``L`` is the longest row, rounded up to ``pad_to_multiple_of``. Lists are
    converted with ``dtype`` (default: ``torch.long`` for lists, the first tensor's dtype otherwise).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: choose 'right' or 'left'")
    if not len(tensors):
        raise ValueError("nothing to pad: the list of sequences is empty")
    rows = [t if isinstance(t, torch.Tensor) else torch.as_tensor(list(t), dtype=dtype or torch.long) for t in tensors]
    if dtype is not None:
        rows = [r.to(dtype) for r in rows]
    length = max(len(r) for r in rows)
    if pad_to_multiple_of:
        length = (length + pad_to_multiple_of - 1) // pad_to_multiple_of * pad_to_multiple_of
    out = torch.full((len(rows), length), padding_value, dtype=rows[0].dtype, device=rows[0].device)
    for b, r in enumerate(rows):
        if len(r):
            if padding_side == "right":
                out[b, :len(r)] = r
            else:
                out[b, length - len(r):] = r
    return out


def pad_with_mask(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token-id rows, both [B, L], padded on ``padding_side`` with :func:`pad`."""
    ids = pad(rows, int(pad_id), padding_side)
    mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], 0, padding_side)
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token (padding is masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataValidationError(
        "the tokenizer has neither a pad nor an EOS token, so a batch cannot be padded: set tokenizer.pad_token "
        "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})); shiq_lab.infra.models.load_tokenizer does it")


@dataclass
class PaddedBatch:
    """Right-padded encoded responses in the losses' layout: column t of every [B, T-1] tensor is action t+1.

    ``input_ids``/``attention_mask`` are [B, T]; ``actions``, ``mask`` (policy tokens), ``rows``
    (response tokens, policy or environment) and ``rewards`` (the encoding's token rewards) are
    [B, T-1], sliced ``[:, 1:]`` from arrays aligned to ``input_ids`` (``actions = input_ids[:, 1:]``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    rewards: torch.Tensor

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def batch_responses(
    encoded: Sequence[EncodedResponse], pad_id: int, device: torch.device | str | None = None
) -> PaddedBatch:
    """Right-pad encoded responses into a :class:`PaddedBatch` (padding is never a row or policy token)."""
    if not encoded:
        raise ValueError("nothing to pad: the list of encoded responses is empty")
    ids, attn = pad_with_mask([e.input_ids for e in encoded], pad_id)
    # aligned to input_ids first (the one convention), then the losses' [:, 1:] layout
    policy = pad([[0] * e.start + [int(p) for p in e.policy] for e in encoded])
    rows = pad([[0] * e.start + [1] * e.n_rows for e in encoded]).bool()
    rewards = pad([[0.0] * e.start + list(e.rewards) for e in encoded], dtype=torch.float32)
    batch = PaddedBatch(ids, attn, ids[:, 1:].clone(), policy[:, 1:].clone(), rows[:, 1:].clone(), rewards[:, 1:].clone())
    return batch if device is None else batch.to(device)


class ShiQCollator:
    """Pad tokenised rows (or grouped rows, which are flattened) into a batch of tensors.

    Output keys: ``input_ids`` [B, L] (right padding with ``pad_token_id``), ``attention_mask``,
    ``action_mask`` (float 0/1), ``token_rewards`` (fp32), ``ref_logp`` / ``ref_logz`` when the rows
    have them, ``group`` [B], ``prompt_length`` [B] and, when ``pair_mode`` is set, ``pairs`` [P, 2]
    (see :func:`make_pairs`).
    """

    def __init__(self, pad_token_id: int | None, *, pair_mode: str | None = None, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise DataValidationError(
                "pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.pad_token_id = int(pad_token_id)
        self.pair_mode = pair_mode
        self.pad_to_multiple_of = pad_to_multiple_of

    def _flatten(self, features: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for f in features:
            ids = f["input_ids"]
            if len(ids) and isinstance(ids[0], (list, tuple, np.ndarray, torch.Tensor)):
                rows += [{k: f[k][j] for k in f} for j in range(len(ids))]
            else:
                rows.append(dict(f))
        return rows

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._flatten(features)
        m = self.pad_to_multiple_of
        batch = {
            "input_ids": pad([r["input_ids"] for r in rows], self.pad_token_id, pad_to_multiple_of=m, dtype=torch.long),
            "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0, pad_to_multiple_of=m),
            "action_mask": pad([r["action_mask"] for r in rows], 0, pad_to_multiple_of=m, dtype=torch.float32),
        }
        for k in ("token_rewards", "ref_logp", "ref_logz"):
            if k == "token_rewards" or k in rows[0]:
                batch[k] = pad([r[k] for r in rows], 0, pad_to_multiple_of=m, dtype=torch.float32)
        batch["group"] = torch.as_tensor([int(r.get("group", b)) for b, r in enumerate(rows)], dtype=torch.long)
        if "prompt_length" in rows[0]:
            batch["prompt_length"] = torch.as_tensor([int(r["prompt_length"]) for r in rows], dtype=torch.long)
        else:
            batch["prompt_length"] = batch["action_mask"].argmax(1)
        if self.pair_mode is not None:
            returns = (batch["token_rewards"] * batch["action_mask"]).sum(1)
            batch["pairs"] = make_pairs(batch["group"], returns, self.pair_mode)
        return batch


