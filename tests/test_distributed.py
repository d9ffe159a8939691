"""Two CPU processes (accelerate launch, DDP over gloo) give the losses of one process with the same global batch.

The loss of each micro-batch is its sum of terms divided by the item count of the whole step on
all processes (see shiq_lab.train.trainer), so the split of a global batch over processes must not change
the losses, the gradient norms or the trained weights. One 2-process run takes 30-60 s on 2 cores
(two interpreters importing torch + transformers); it is part of ``make test`` all the same, since
this equality is what multi-GPU users rely on. The single-process counterpart of the same
normalisation is tests/test_trainer.py::test_gradient_accumulation_gives_the_same_losses_as_a_big_batch.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiq_lab import cli

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")


def _args(tmp_path, out, batch, loss_type):
    return ["--config", CONFIG, "--output_dir", str(tmp_path / out), "--max_steps", "3", "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--ref_cache_dir", str(tmp_path / "cache"),
            "--disable_tqdm", "true", "--per_device_train_batch_size", str(batch), "--loss_type", loss_type,
            "--dataset_kwargs", '{"n": 32, "seed": 0}', "--eval_fraction", "0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loss_type", ["shiq"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, loss_type):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --multi_gpu without GPUs: torchrun starts the processes and accelerate picks gloo on CPU
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "shiq_lab.cli", "train",
           *_args(tmp_path, "two", 2, loss_type)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr  # no DDP warning at every step

    torch.set_num_threads(1)
    assert cli.main(["train", *_args(tmp_path, "one", 4, loss_type)]) == 0

    def logs(run):
        return [h for h in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in h]

    one, two = logs("one"), logs("two")
    assert len(one) == len(two) == 3
    assert one[0]["loss"] > 0 and one[-1]["kl"] > 0  # the run moved away from the reference
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "kl", "logratio", "residual_abs_mean", "first_residual_abs_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])
    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
