"""Step 3: the reference, entering training only through two cached numbers per response token.

:mod:`~shiq_lab.reference.cache` computes ``ref_logp`` / ``ref_logz`` once per (dataset, reference) with
:func:`shiq_lab.lm.stats.token_stats` (the same function the trainer uses for the policy) and caches them.
"""

from shiq_lab.reference.cache import (
    STATS_VERSION,
    ReferenceCache,
    StaleReferenceCacheError,
    attach_reference_stats,
    compute_reference_stats,
    dataset_fingerprint,
    default_cache_dir,
    precompute_reference,
    reference_identity,
    write_reference_stats,
)

__all__ = [
    "STATS_VERSION",
    "ReferenceCache",
    "StaleReferenceCacheError",
    "attach_reference_stats",
    "compute_reference_stats",
    "dataset_fingerprint",
    "default_cache_dir",
    "precompute_reference",
    "reference_identity",
    "write_reference_stats",
]


def __getattr__(name: str):
    # one release of the old flat `shiq_lab.reference`, which also held the per-token statistics
    if name in {"causal_lm_parts", "forward_hidden", "stats_from_hidden", "token_stats", "resolve_logits_mode"}:
        from shiq_lab.lm import stats

        return getattr(stats, name)
    raise AttributeError(f"module 'shiq_lab.reference' has no attribute {name!r}")
