"""shiq_lab: ShiQ (Shifted-Q) -- Q-learning for LLM fine-tuning with the model's logits as Q-values.

The pipeline, one sub-package per step (``docs/method.md`` states the method):

- ``exact``: ground truth. Token MDPs solved exactly (q*, v*, pi*) and tabular fits against them.
- ``data``: offline rows -> token rows (ids, policy mask, token rewards), validation, batches.
- ``lm``: per-token log pi and log-partition of any causal LM, without [B, T, V] logits.
- ``reference``: the reference's two numbers per token, computed once and cached on disk.
- ``losses``: ShiQ, its ablations, DPO / DRO / CoPG (pure functions, one ``LossOutput``).
- ``train``: ``ShiQConfig`` and ``ShiQTrainer`` (a ``transformers.Trainer``), a tiny fit loop.
- ``evaluation``: sampling, reward and KL of fresh generations, the reward-KL frontier.
- ``views``: per-token Q, V, A tables, plotly figures, the ipywidgets explorer.
- ``tasks``: ``imdb``, ``synthetic`` (token-tree suite with exact optima), ``bfcl`` (multi-turn tool use).
- ``infra``: model registry, offline assets, runtime, notebooks, the main job; ``cli``: ``shiq-lab``.

The stable API (these names keep working from 0.2 on)::

    from shiq_lab import token_logprobs, shiq_loss, LossOutput, ShiQConfig, ShiQTrainer, tokenize_dataset
    from shiq_lab import compute_reference_stats, token_values, evaluate_policy
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shiq_lab import _legacy

__version__ = "0.2.0"

_legacy.install()

#: stable name -> module that defines it (imported on first use: ``import shiq_lab`` stays light)
_API = {
    "token_logprobs": "shiq_lab.losses",
    "shiq_loss": "shiq_lab.losses",
    "LossOutput": "shiq_lab.losses",
    "ShiQConfig": "shiq_lab.train.trainer",
    "ShiQTrainer": "shiq_lab.train.trainer",
    "tokenize_dataset": "shiq_lab.data.encode",
    "compute_reference_stats": "shiq_lab.reference.cache",
    "token_values": "shiq_lab.views.token_values",
    "evaluate_policy": "shiq_lab.evaluation.generations",
}

__all__ = [
    "LossOutput",
    "ShiQConfig",
    "ShiQTrainer",
    "__version__",
    "compute_reference_stats",
    "evaluate_policy",
    "shiq_loss",
    "token_logprobs",
    "token_values",
    "tokenize_dataset",
]

if TYPE_CHECKING:
    from shiq_lab.data.encode import tokenize_dataset
    from shiq_lab.evaluation.generations import evaluate_policy
    from shiq_lab.losses import LossOutput, shiq_loss, token_logprobs
    from shiq_lab.reference.cache import compute_reference_stats
    from shiq_lab.train.trainer import ShiQConfig, ShiQTrainer
    from shiq_lab.views.token_values import token_values


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shiq_lab' has no attribute {name!r}")
