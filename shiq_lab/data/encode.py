"""Tokenisation: rows -> input_ids, action_mask, token_rewards (the training semantics).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from shiq_lab.data.formats import (
    TOKENIZED_COLUMNS,
    TRUNCATION_POLICIES,
    DataValidationError,
    _prompt_key,
    detect_format,
    to_shiq_format,
)

# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------


def _check_tokenizer(tokenizer: Any, *, add_eos: bool) -> None:
    if tokenizer.pad_token_id is None:
        raise DataValidationError(
            "the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token "
            "(shiq_lab.infra.models.load_tokenizer does it for you); padding is masked out of every loss")
    if add_eos and tokenizer.eos_token_id is None:
        raise DataValidationError(
            "the tokenizer has no EOS token but add_eos=True: set tokenizer.eos_token, or pass add_eos=False "
            "(responses are then treated as ending after their last token)")


def _reward_value(value: Any, row: int, field: str) -> float:
    if value is None:
        raise DataValidationError(f"row {row}: {field} is missing (None): give every row a finite reward or drop it")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataValidationError(f"row {row}: {field}={value!r} is not a number") from None
    if not math.isfinite(v):
        raise DataValidationError(f"row {row}: {field} is {v} (NaN/inf): rewards must be finite; fix or drop the row")
    return v


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    clean = [{k: v for k, v in m.items() if k != "reward"} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_segments(tokenizer: Any, messages: list[dict], row: int) -> list[tuple[str, bool, float]]:
    """Split a conversation rendered by the chat template into (text, is_policy, reward) segments.

    Each assistant turn is located by rendering the conversation up to it with and without the
    generation prompt: the text added by the turn is policy text up to and including the EOS token
    (the end-of-turn marker of ChatML templates), environment text after it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataValidationError(
            f"row {row}: conversational data needs a tokenizer with a chat template; set tokenizer.chat_template "
            "(shiq_lab.infra.models.CHAT_TEMPLATE is ChatML)")
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataValidationError(f"row {row}: message {j} must be a dict with 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataValidationError(f"row {row}: the conversation has no assistant turn, so nothing to learn: drop the row")
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool, float]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not str(m["content"]):
            raise DataValidationError(f"row {row}: assistant message {i} is empty: an empty response has nothing to learn; drop it")
        reward = _reward_value(m.get("reward", 0.0) if m.get("reward") is not None else 0.0, row, f"messages[{i}].reward")
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else _render(tokenizer, [], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataValidationError(
                f"row {row}: the chat template does not render conversations as prefixes of each other at message {i}; "
                "token-level masking needs a prefix-consistent template (ChatML is)")
        body = full[len(head):]
        cut = body.find(eos) + len(eos) if eos and eos in body else len(body)
        segments.append((head[len(done):], False, 0.0))
        segments.append((body[:cut], True, reward))
        segments.append((body[cut:], False, 0.0))
        done = full
    return [s for s in segments if s[0]]


def _standard_tokens(
    row: dict, i: int, tokenizer: Any, *, add_eos: bool, pretokenized: bool
) -> tuple[list[int], list[int], list[float]]:
    if pretokenized:
        prompt_ids, completion_ids = list(row["prompt_ids"]), list(row["completion_ids"])
        eos_added = False
        if not completion_ids:
            raise DataValidationError(f"row {i}: completion_ids is empty: an empty response has nothing to learn; drop the row")
    else:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataValidationError(
                f"row {i}: prompt and completion must both be strings (or both lists of messages), "
                f"got {type(prompt).__name__} and {type(completion).__name__}")
        if completion == "":
            raise DataValidationError(f"row {i}: completion is empty: an empty response has nothing to learn; drop the row")
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        completion_ids = _encode(tokenizer, completion)
        eos_added = add_eos
        if add_eos:
            completion_ids.append(tokenizer.eos_token_id)
    n = len(completion_ids)
    rewards = [0.0] * n
    tok_r = row.get("token_rewards")
    if tok_r is not None:
        tok_r = [_reward_value(v, i, f"token_rewards[{k}]") for k, v in enumerate(tok_r)]
        if len(tok_r) == n - eos_added and eos_added:
            tok_r = tok_r + [0.0]
        if len(tok_r) != n:
            want = f"{n - 1} (or {n} including the appended EOS)" if eos_added else f"{n}"
            raise DataValidationError(
                f"row {i}: token_rewards has {len(tok_r)} values but the completion has {want} tokens: give one reward "
                "per completion token (tokenizer(completion, add_special_tokens=False)), or use a sequence 'reward'")
        rewards = tok_r
    if row.get("reward") is not None or tok_r is None:
        rewards[-1] += _reward_value(row.get("reward"), i, "reward")
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * n, [0.0] * len(prompt_ids) + rewards


def _chat_tokens(row: dict, i: int, tokenizer: Any, fmt: str) -> tuple[list[int], list[int], list[float]]:
    if fmt == "conversational":
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(completion, list) or not completion:
            raise DataValidationError(f"row {i}: completion must be a non-empty list of assistant messages")
        messages = [dict(m) for m in prompt] + [dict(m) for m in completion]
        last = max(k for k, m in enumerate(messages) if m.get("role") == "assistant") if any(
            m.get("role") == "assistant" for m in messages) else None
        if last is not None:
            messages[last]["reward"] = _reward_value(row.get("reward"), i, "reward")
    else:
        messages = [dict(m) for m in row["messages"]]
    ids: list[int] = []
    mask: list[int] = []
    rewards: list[float] = []
    for text, policy, reward in _chat_segments(tokenizer, messages, i):
        seg = _encode(tokenizer, text)
        ids += seg
        mask += [int(policy)] * len(seg)
        r = [0.0] * len(seg)
        if policy and seg:
            r[-1] = reward
        rewards += r
    return ids, mask, rewards


def _fit_length(
    ids: list[int], mask: list[int], rewards: list[float], i: int, *, max_length: int, truncation: str
) -> tuple[list[int], list[int], list[float], bool] | None:
    """Apply the truncation policy; ``None`` means drop the row."""
    prompt_len = mask.index(1)
    if prompt_len == 0:
        raise DataValidationError(
            f"row {i}: the response starts at the first token, so its first action has no state; give a non-empty "
            "prompt (or a tokenizer that adds a BOS token)")
    if prompt_len >= max_length:
        if truncation == "drop":
            return None
        raise DataValidationError(
            f"row {i}: the prompt has {prompt_len} tokens, which leaves no room for a response within "
            f"max_length={max_length}: raise max_length, shorten the prompt, or pass truncation='drop' to drop such rows")
    if len(ids) <= max_length:
        return ids, mask, rewards, False
    if truncation == "error":
        raise DataValidationError(
            f"row {i}: {len(ids)} tokens exceed max_length={max_length}: raise max_length, or pass "
            "truncation='truncate' (cut the response, keep its return) or truncation='drop'")
    if truncation == "drop":
        return None
    ids, kept_mask, kept_r = ids[:max_length], mask[:max_length], rewards[:max_length]
    cut_return = float(sum(r for r, m in zip(rewards[max_length:], mask[max_length:]) if m))
    last = max_length - 1 - kept_mask[::-1].index(1)
    kept_r = list(kept_r)
    kept_r[last] += cut_return
    return ids, kept_mask, kept_r, True


def tokenize_dataset(
    ds: Dataset | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int = 512,
    truncation: str = "truncate",
    add_eos: bool = True,
    preference_rewards: tuple[float, float] = (1.0, 0.0),
    label_rewards: tuple[float, float] = (1.0, 0.0),
) -> Dataset:
    """Tokenise a dataset of any accepted format into per-token training rows.

    Returns a new ``Dataset`` with columns ``input_ids``, ``action_mask`` (1 on policy tokens),
    ``token_rewards`` (reward of generating each token), ``group`` (int, rows of one prompt share
    it), ``prompt_length`` (tokens before the first policy token) and ``truncated``. Every row is
    validated before anything is returned; a bad row raises :class:`DataValidationError` naming the
    row, the field and the fix. See the module docstring for the truncation policy.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation={truncation!r}: choose one of {TRUNCATION_POLICIES}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r}: must be an int >= 2 (a prompt token and a response token)")
    ds = to_shiq_format(ds, preference_rewards=preference_rewards, label_rewards=label_rewards)
    fmt = detect_format(ds)
    _check_tokenizer(tokenizer, add_eos=add_eos and fmt == "standard")
    pretokenized = fmt == "standard" and {"prompt_ids", "completion_ids"} <= set(ds.column_names)
    has_group = "group" in ds.column_names
    out: dict[str, list] = {k: [] for k in TOKENIZED_COLUMNS}
    group_ids: dict[str, int] = {}
    dropped = truncated = 0
    for i, row in enumerate(ds):
        if fmt == "standard":
            ids, mask, rewards = _standard_tokens(row, i, tokenizer, add_eos=add_eos, pretokenized=pretokenized)
        else:
            ids, mask, rewards = _chat_tokens(row, i, tokenizer, fmt)
        fitted = _fit_length(ids, mask, rewards, i, max_length=max_length, truncation=truncation)
        if fitted is None:
            dropped += 1
            continue
        ids, mask, rewards, cut = fitted
        truncated += cut
        if has_group and row["group"] is not None:
            key = "g:" + str(row["group"])
        elif pretokenized:
            key = "p:" + json.dumps(list(row["prompt_ids"]))
        elif fmt == "multiturn":
            first = next(k for k, m in enumerate(row["messages"]) if m["role"] == "assistant")
            key = "p:" + _prompt_key(row["messages"][:first])
        else:
            key = "p:" + _prompt_key(row["prompt"])
        out["input_ids"].append(ids)
        out["action_mask"].append(mask)
        out["token_rewards"].append(rewards)
        out["group"].append(group_ids.setdefault(key, len(group_ids)))
        out["prompt_length"].append(mask.index(1))
        out["truncated"].append(cut)
    if dropped:
        warnings.warn(f"tokenize_dataset: dropped {dropped} of {len(ds)} rows longer than max_length={max_length} "
                      f"(truncation='{truncation}')", stacklevel=2)
    if "finished" in ds.column_names:
        unfinished = sum(f is False for f in ds["finished"])
        if unfinished:
            warnings.warn(f"tokenize_dataset: {unfinished} of {len(ds)} responses did not finish (finished=False, no "
                          "EOS); the losses treat them as terminal after their last token", stacklevel=2)
    if truncated:
        warnings.warn(f"tokenize_dataset: {truncated} of {len(ds)} rows were cut to max_length={max_length}; their "
                      "rewards past the cut sit on the last kept token and they are treated as terminal", stacklevel=2)
    if not out["input_ids"]:
        raise DataValidationError(f"no row is left after truncation='{truncation}' with max_length={max_length}: raise max_length")
    return Dataset.from_dict(out)


def _require_tokenized(ds: Dataset, fn: str) -> None:
    missing = [c for c in ("input_ids", "action_mask", "token_rewards", "group") if c not in ds.column_names]
    if missing:
        raise DataValidationError(f"{fn} needs a tokenised dataset (columns {missing} are missing): run tokenize_dataset first")


