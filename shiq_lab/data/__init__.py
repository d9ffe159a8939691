"""Step 1 of the pipeline: offline rows -> token rows (ids, policy mask, token rewards), batches.

- :mod:`~shiq_lab.data.formats`: accepted formats, conversion, validation errors, loading by name or path.
- :mod:`~shiq_lab.data.encode`: tokenisation with the training semantics (what is a policy action).
- :mod:`~shiq_lab.data.rewards`: token-level reward functions, reward z-scoring.
- :mod:`~shiq_lab.data.batch`: grouping, train / held-out split, pairing, the collator.
- :mod:`~shiq_lab.data.toy`: a tiny built-in dataset with a known reward.
"""

from shiq_lab.data.batch import ShiQCollator, group_by_prompt, make_pairs, split_by_prompt
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.formats import (
    FORMATS,
    TOKENIZED_COLUMNS,
    TRUNCATION_POLICIES,
    DataValidationError,
    detect_format,
    load_dataset_spec,
    to_shiq_format,
)
from shiq_lab.data.rewards import normalize_rewards
from shiq_lab.data.toy import synthetic_dataset, synthetic_reward

__all__ = [
    "FORMATS",
    "TOKENIZED_COLUMNS",
    "TRUNCATION_POLICIES",
    "DataValidationError",
    "ShiQCollator",
    "detect_format",
    "group_by_prompt",
    "load_dataset_spec",
    "make_pairs",
    "normalize_rewards",
    "split_by_prompt",
    "synthetic_dataset",
    "synthetic_reward",
    "to_shiq_format",
    "tokenize_dataset",
]
