"""Step 6: a policy against its reference on held-out prompts (reward and KL of fresh samples), frontiers.

- :mod:`~shiq_lab.evaluation.sampling`: batched sampling with a KV cache, scoring, offline datasets.
- :mod:`~shiq_lab.evaluation.generations`: reward and KL(pi || pi_ref) on the same fresh samples.
- :mod:`~shiq_lab.evaluation.frontier`: checkpoints of a run -> the reward-KL frontier.
"""

from shiq_lab.evaluation.frontier import (
    CheckpointSpec,
    evaluate_checkpoints,
    find_checkpoints,
    frontier_summary,
    pareto_mask,
    plot_frontier,
    save_frontier,
)
from shiq_lab.evaluation.generations import FRONTIER_COLUMNS, PolicyEval, SequenceStats, evaluate_policy, sequence_stats

__all__ = [
    "FRONTIER_COLUMNS",
    "CheckpointSpec",
    "PolicyEval",
    "SequenceStats",
    "evaluate_checkpoints",
    "evaluate_policy",
    "find_checkpoints",
    "frontier_summary",
    "pareto_mask",
    "plot_frontier",
    "save_frontier",
    "sequence_stats",
]
