"""The training data of every shipped kind, reduced to one sha256 per column (issue 9's golden test).

Written so that it imports only names that exist both before the restructure (commit 6047ed7, flat
``shiq_lab.data``) and after it: ``tests/golden/training_data.json`` was generated at 6047ed7 with
``python -m helpers.golden_data --write`` and the current code must reproduce it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "training_data.json"

#: column -> dtype its values are hashed as (token rewards as float64: any change in any bit shows)
COLUMNS = {"input_ids": np.int64, "action_mask": np.int64, "token_rewards": np.float64, "group": np.int64,
           "prompt_length": np.int64, "truncated": np.uint8}


def _tokenizer() -> Any:
    try:
        from shiq_lab.infra.models import load_tokenizer
    except ImportError:  # the pre-restructure layout
        from shiq_lab.models import load_tokenizer
    return load_tokenizer("tiny")


def _hashes(ds: Any, stats: dict | None = None) -> dict:
    out: dict[str, Any] = {"rows": len(ds)}
    for col, dtype in COLUMNS.items():
        vals = ds[col]
        arr = [np.asarray(v, dtype=dtype).tolist() for v in vals] if vals and isinstance(vals[0], list) \
            else np.asarray(vals, dtype=dtype).tolist()
        h = hashlib.sha256()
        if arr and isinstance(arr[0], list):
            h.update(np.array([len(v) for v in arr], dtype=np.int64).tobytes())
            h.update(np.asarray([x for v in arr for x in v], dtype=dtype).tobytes())
        else:
            h.update(np.asarray(arr, dtype=dtype).tobytes())
        out[col] = h.hexdigest()
    if stats is not None:
        out["reward_stats"] = {k: float(v).hex() for k, v in sorted(stats.items())}
    return out


def cases(tok: Any) -> dict[str, Callable[[], dict]]:
    """name -> function computing that case's hashes."""
    from shiq_lab.data import normalize_rewards, split_by_prompt, synthetic_dataset, tokenize_dataset

    def enc(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    standard = synthetic_dataset(24, seed=1, kind="standard", responses_per_prompt=3).to_list()
    conversational = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]}],
                       "completion": [{"role": "assistant", "content": r["completion"].strip()}], "reward": r["reward"]}
                      for r in standard]
    unpaired = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["reward"] > 0} for r in standard]
    token_rewards = [{"prompt": r["prompt"], "completion": r["completion"],
                      "token_rewards": [0.25 * k - 0.5 for k in range(len(enc(r["completion"])))]} for r in standard]
    pretokenised = [{"prompt_ids": list(tok(r["prompt"])["input_ids"]), "completion_ids": enc(r["completion"]),
                     "reward": r["reward"], "finished": k % 4 != 0} for k, r in enumerate(standard)]
    data: dict[str, Any] = {
        "standard": standard,
        "token": synthetic_dataset(16, seed=2, kind="token"),
        "preference": synthetic_dataset(12, seed=3, kind="preference"),
        "multiturn": synthetic_dataset(12, seed=4, kind="multiturn"),
        "conversational": conversational,
        "unpaired": unpaired,
        "token_rewards": token_rewards,
        "pretokenised": pretokenised,
    }
    # a small max_length cuts responses (standard: prompts of 3-6 tokens); chats need room for the template
    short = {"standard": 9, "token": 9, "preference": 9, "unpaired": 9, "token_rewards": 9, "pretokenised": 8,
             "multiturn": 40, "conversational": 30}
    out: dict[str, Callable[[], dict]] = {}

    def add(name: str, rows: Any, **kw: Any) -> None:
        def run() -> dict:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = tokenize_dataset(rows, tok, **kw)
                z, stats = normalize_rewards(ds, "zscore")
            return {"raw": _hashes(ds), "zscore": _hashes(z, stats)}
        out[name] = run

    for kind, rows in data.items():
        add(f"{kind}/full", rows, max_length=128)
        add(f"{kind}/truncate", rows, max_length=short[kind])
    add("standard/drop", standard, max_length=9, truncation="drop")
    add("standard/no_eos", standard, max_length=128, add_eos=False)
    add("preference/rewards_2_-1", data["preference"], max_length=128, preference_rewards=(2.0, -1.0))

    def shipped_tiny_cpu() -> dict:  # configs/train/tiny_cpu.yaml: synthetic n=64, eval_fraction 0.25, max_length 64
        train, held = split_by_prompt(synthetic_dataset(64, seed=0), 0.25, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, stats = normalize_rewards(tokenize_dataset(train, tok, max_length=64), "zscore")
            e, _ = normalize_rewards(tokenize_dataset(held, tok, max_length=64), "zscore", stats=stats)
        return {"train": _hashes(t, stats), "eval": _hashes(e)}

    out["config/tiny_cpu"] = shipped_tiny_cpu
    return out


def compute() -> dict:
    """Every case's hashes, plus a fingerprint of the tokenizer they were computed with."""
    tok = _tokenizer()
    vocab = json.dumps(sorted(tok.get_vocab().items())).encode()
    return {"tokenizer": hashlib.sha256(vocab).hexdigest(), "cases": {k: f() for k, f in cases(tok).items()}}


if __name__ == "__main__":
    result = compute()
    if "--write" in sys.argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True)[:2000])
