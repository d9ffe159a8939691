"""Grouping, splitting, pairing and collation of tokenised rows.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from shiq_lab.data.encode import _require_tokenized
from shiq_lab.data.formats import DataValidationError, _as_dataset, _prompt_key


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
    losses keep their pairs and no prompt is on both sides.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r}: must be in (0, 1)")
    ds = _as_dataset(ds)
    cols = set(ds.column_names)
    if "group" in cols:
        keys = [str(g) for g in ds["group"]]
    elif "prompt" in cols:
        keys = [_prompt_key(p) for p in ds["prompt"]]
    elif "prompt_ids" in cols:
        keys = [json.dumps(list(p)) for p in ds["prompt_ids"]]
    else:  # multiturn: the conversation up to the first assistant turn
        keys = [_prompt_key([m for m in msgs[: next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), 0)]])
                for msgs in ds["messages"]]
    unique = list(dict.fromkeys(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_out = max(1, int(round(fraction * len(unique))))
    if n_out >= len(unique):
        raise ValueError(f"fraction={fraction} of {len(unique)} prompts leaves no training prompt")
    held = {unique[i] for i in order[:n_out]}
    train_idx = [i for i, k in enumerate(keys) if k not in held]
    held_idx = [i for i, k in enumerate(keys) if k in held]
    return ds.select(train_idx), ds.select(held_idx)


def make_pairs(group: torch.Tensor, returns: torch.Tensor, mode: str) -> torch.Tensor:
    """[P, 2] row-index pairs of responses sharing a group.

    ``mode="all"``: every unordered pair (CoPG). ``mode="preference"``: ordered (better, worse) by
    return, ties skipped (DPO's chosen/rejected).
    """
    if mode not in ("all", "preference"):
        raise ValueError(f"pair mode={mode!r}: choose 'all' or 'preference'")
    same = group[:, None] == group[None, :]
    if mode == "all":
        sel = same & torch.ones_like(same).triu(1)
        return torch.nonzero(sel)
    better = returns[:, None] > returns[None, :]
    return torch.nonzero(same & better)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


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
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        B = len(rows)
        batch = {
            "input_ids": torch.full((B, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(B, length, dtype=torch.long),
            "action_mask": torch.zeros(B, length, dtype=torch.float32),
            "token_rewards": torch.zeros(B, length, dtype=torch.float32),
        }
        per_token_float = [k for k in ("ref_logp", "ref_logz") if k in rows[0]]
        for k in per_token_float:
            batch[k] = torch.zeros(B, length, dtype=torch.float32)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            batch["input_ids"][b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            batch["attention_mask"][b, :n] = 1
            batch["action_mask"][b, :n] = torch.as_tensor(r["action_mask"], dtype=torch.float32)
            batch["token_rewards"][b, :n] = torch.as_tensor(r["token_rewards"], dtype=torch.float32)
            for k in per_token_float:
                batch[k][b, :n] = torch.as_tensor(r[k], dtype=torch.float32)
        batch["group"] = torch.as_tensor([int(r.get("group", b)) for b, r in enumerate(rows)], dtype=torch.long)
        if "prompt_length" in rows[0]:
            batch["prompt_length"] = torch.as_tensor([int(r["prompt_length"]) for r in rows], dtype=torch.long)
        else:
            batch["prompt_length"] = batch["action_mask"].argmax(1)
        if self.pair_mode is not None:
            returns = (batch["token_rewards"] * batch["action_mask"]).sum(1)
            batch["pairs"] = make_pairs(batch["group"], returns, self.pair_mode)
        return batch


