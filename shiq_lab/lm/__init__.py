"""Step 2: per-token statistics of any causal LM (policy and reference alike), without [B, T, V] logits.

- :mod:`~shiq_lab.lm.kernel`: ``(log pi(a|s), log Z(s))`` from hidden states and the output layer, in tiles.
- :mod:`~shiq_lab.lm.stats`: the model's decoder + the kernel on response tokens (:func:`token_stats`), the
  one per-token statistics function of the trainer, the reference cache, the views and the evaluation.
- :mod:`~shiq_lab.lm.modes`: ``unwrap``, ``device_of``, ``eval_mode``, ``as_reference`` (the one rule for "the
  reference of this model"), ``on_device``; each hands the caller's model back as it found it.
- :mod:`~shiq_lab.lm.value_head`: DRO's value head, carried by the model, saved in its own file.
"""
