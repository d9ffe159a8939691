"""A CPU stand-in for ``liger-kernel`` (Triton, CUDA only), on the path of ``gpu_check --dry-run`` alone.

It has the API the benchmarks call, checked against liger-kernel 0.8.5: ``LigerFusedLinearCrossEntropyLoss``
(``ignore_index=-100``, ``reduction="mean"``) whose ``forward(lin_weight, _input, target, bias=None)`` returns the
mean cross-entropy of ``_input @ lin_weight.T + bias``. It computes it the plain way (full logits): a dry run checks
the code path, never the speed.
"""

IS_STANDIN = True
__version__ = "0.8.5+standin"
