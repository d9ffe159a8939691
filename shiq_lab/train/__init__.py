"""Step 5: training. :class:`ShiQConfig` / :class:`ShiQTrainer` (a ``transformers.Trainer``), and a tiny fit loop."""
