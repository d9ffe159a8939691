"""Run ``python -m shiq_lab.cli`` under accelerate's FSDP on CPU processes (gloo), for the equivalence tests.

accelerate 1.15 turns ``distributed_type: FSDP`` into FSDP only on an accelerator (``MULTI_GPU``,
``MULTI_XPU``, ...); on CPU processes it silently stays ``MULTI_CPU``, i.e. DDP over gloo (with
``use_cpu``), or ``NO`` (without it: every process trains alone). torch's FSDP2 itself runs on CPU
with gloo, so this shim lets the state become FSDP there, with the plugin the config file asked for;
everything after that (wrapping, sharding, gathering for the save) is accelerate's and transformers'
own code. Used by ``tests/test_distributed.py`` as the script of ``accelerate launch``.
"""

import os
import runpy
import sys

import accelerate.state as state
import transformers
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__
_training_step = transformers.Trainer.training_step
_reported: list[str] = []


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # reads the FSDP_* env


def _training_step_and_report(self, model, *args, **kwargs):
    """transformers' own training step; on the first, one line saying how the trained model's first parameter is
    held (the test reads it: a sharded DTensor under FSDP, a plain Parameter under DDP)."""
    if not _reported:
        p = next(model.parameters())
        _reported.append(f"accelerate_fsdp_cpu: {self.accelerator.distributed_type.value} {type(p).__name__} "
                         f"{getattr(p, 'placements', None)}")
        print(_reported[0], flush=True)
    return _training_step(self, model, *args, **kwargs)


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _init_fsdp_on_cpu
    transformers.Trainer.training_step = _training_step_and_report
    sys.argv = ["shiq_lab.cli", *sys.argv[1:]]
    runpy.run_module("shiq_lab.cli", run_name="__main__")
