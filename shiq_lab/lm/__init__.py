"""Step 2: per-token statistics of any causal LM (policy and reference alike), without [B, T, V] logits.

- :mod:`~shiq_lab.lm.kernel`: ``(log pi(a|s), log Z(s))`` from hidden states and the output layer, in tiles.
- :mod:`~shiq_lab.lm.stats`: the model's decoder + the kernel on response tokens (:func:`token_stats`).
"""
