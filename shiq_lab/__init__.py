"""shiq_lab: ShiQ (Shifted-Q) -- Q-learning for LLM fine-tuning with the model's logits as Q-values.

The pipeline, one module per step (read them in this order):

- exact ground truth: ``token_tree`` (q*, v*, pi* of small token MDPs), ``tabular`` (fits against it)
- data: ``data`` (formats, tokenisation, validation, batching), ``encoding`` (prompt + responses ->
  ids and policy mask for inspection), ``rewards`` (token-level reward functions)
- reference stats: ``reference`` (per-token ref log-prob and log-partition, cached on disk),
  ``fused_logprobs`` (those two numbers from hidden states without a [B, T, V] tensor)
- losses: ``losses`` (ShiQ, its ablations, DPO / DRO / CoPG)
- trainer: ``trainer`` (ShiQConfig, ShiQTrainer), ``simple_fit`` (a tiny loop for notebooks), ``cli``
- evaluation: ``sampling``, ``evaluation`` (reward-KL frontier), ``bench`` (synthetic benchmark)
- views: ``token_values`` (per-token Q, V, A, residual, KL, top-k), ``figures`` (plotly),
  ``explorer`` (ipywidgets)
- the IMDB task: ``imdb``, ``reward_model``, ``imdb_model``, ``imdb_task``
- plumbing: ``models`` (registry), ``assets`` (offline PyPI assets), ``cpu``, ``notebook_support``,
  ``notebook_runner``, ``demo`` (the main job)
"""

__version__ = "0.1.0"
