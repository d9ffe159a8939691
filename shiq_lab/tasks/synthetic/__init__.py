"""Benchmarks of shiq_lab: suites that write machine-readable results (JSON) and markdown tables.

``python -m shiq_lab.tasks.synthetic synthetic [--quick]`` runs the synthetic benchmark on token trees with
exact optima (:mod:`shiq_lab.tasks.synthetic.suite`); ``python -m shiq_lab.tasks.synthetic synthetic-data`` writes
its datasets to ``data/synthetic/``. One module per idea:

- ``tasks``: the synthetic tasks and behaviour datasets.
- ``forest``: many independent runs trained as one forest of token trees.
- ``neural_policy``: a tiny causal transformer over the path tokens.
- ``sequence_baselines``: pairing and the DPO / DRO / CoPG losses on a logit table.
- ``harness``: one training loop for every method (same data, optimiser and budget).
- ``metrics``: KL to pi*, regularised return, frontier axes, data efficiency.
- ``synthetic``: the suite; ``report``: its markdown tables.
"""

from shiq_lab.tasks.synthetic.suite import SuiteConfig, run_suite, write_results

__all__ = ["SuiteConfig", "run_suite", "write_results"]
