"""Two CPU processes (accelerate launch over gloo: DDP, and FSDP2 full shard) give the losses of one process
with the same global batch.

The loss of each micro-batch is its sum of terms divided by the item count of the whole step on
all processes (see shiq_lab.train.trainer), so the split of a global batch over processes must not change
the losses, the gradient norms or the trained weights. One 2-process run takes 6-8 s on 2 cores
(two interpreters importing torch + transformers; up to a minute on a loaded machine); it is part of ``make test`` all the same, since
this equality is what multi-GPU users rely on. The single-process counterpart of the same
normalisation is tests/test_trainer.py::test_gradient_accumulation_gives_the_same_losses_as_a_big_batch.

FSDP on CPU: torch's FSDP2 runs on gloo, but accelerate 1.15 enables FSDP only on accelerators (on
CPU processes ``distributed_type: FSDP`` silently stays DDP over gloo with ``use_cpu``, or becomes
``NO``, every process training alone, without it). ``tests/helpers/accelerate_fsdp_cpu.py`` lets
the state become FSDP with the plugin of ``configs/accelerate/fsdp.yaml``; the test asserts that the
parameters really are sharded DTensors. DRO (a value head outside the decoder) is checked under both
engines.
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
from shiq_lab.infra.models import resolve_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
FSDP_CONFIG = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
FSDP_SHIM = str(ROOT / "tests" / "helpers" / "accelerate_fsdp_cpu.py")
# Weights are compared by their update, not elementwise: Adam divides each gradient by its own running
# scale, so an element whose gradient is ~1e-7 moves by ~lr whatever its sign, and a reduction-order
# difference between 1 and 2 processes (sums over 4 rows vs 2 + 2) moves it by up to ~1 % of lr.
# Measured (tiny model, 3 steps, lr 1e-3): DRO under FSDP 2.7e-5 over all weights, 7.4e-5 for the worst
# tensor; a bug that drops one process's half of the batch gives 0.58-0.96 per tensor (the 1-process run on half the
# batch against the full one, DRO and ShiQ): 1e-3 sits 13x above the noise and ~600x below that.
UPDATE_RTOL = 1e-3
METRICS = ("loss", "grad_norm", "kl", "logratio", "residual_abs_mean", "first_residual_abs_mean")


def _args(tmp_path, out, batch, loss_type):
    return ["--config", CONFIG, "--output_dir", str(tmp_path / out), "--max_steps", "3", "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--ref_cache_dir", str(tmp_path / "cache"),
            "--disable_tqdm", "true", "--per_device_train_batch_size", str(batch), "--loss_type", loss_type,
            "--dataset_kwargs", '{"n": 32, "seed": 0}', "--eval_fraction", "0"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path, engine: str, loss_type: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate launcher not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--main_process_port",
              str(_free_port())]
    if engine == "ddp":
        # --multi_gpu without GPUs: torchrun starts the processes and accelerate picks gloo on CPU
        launch = ["--multi_gpu", *common, "--dynamo_backend", "no", "-m", "shiq_lab.cli"]
    else:
        launch = ["--config_file", FSDP_CONFIG, *common, FSDP_SHIM]
    cmd = [accelerate, "launch", *launch, "train", *_args(tmp_path, "two", 2, loss_type)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)


def _assert_two_equal_one(tmp_path, loss_type: str) -> None:
    torch.set_num_threads(1)
    assert cli.main(["train", *_args(tmp_path, "one", 4, loss_type)]) == 0

    def logs(run):
        return [h for h in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in h]

    one, two = logs("one"), logs("two")
    assert len(one) == len(two) == 3
    assert one[0]["loss"] > 0 and one[-1]["kl"] > 0  # the run moved away from the reference
    for a, b in zip(one, two, strict=True):
        for key in METRICS:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])
    w0 = load_file(str(next(Path(resolve_model("tiny")).glob("*.safetensors"))))
    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    # FSDP's full state dict also writes the tied output layer: it must be the embedding
    if "lm_head.weight" in set(w2) - set(w1):
        assert torch.equal(w2.pop("lm_head.weight"), w2["model.embed_tokens.weight"])
    assert set(w1) == set(w2)
    for k in w1:
        assert update_error(w0[k], w1[k], w2[k]) <= UPDATE_RTOL, k
    if loss_type == "dro":  # the value head is trained and saved alike (it starts at zero)
        h1 = load_file(str(tmp_path / "one" / "shiq_value_head.safetensors"))
        h2 = load_file(str(tmp_path / "two" / "shiq_value_head.safetensors"))
        assert set(h1) == set(h2)
        for k in h1:
            assert update_error(torch.zeros_like(h1[k]), h1[k], h2[k]) <= UPDATE_RTOL, k


def update_error(start: torch.Tensor, one: torch.Tensor, two: torch.Tensor) -> float:
    """||two - one|| / ||one - start||: how far the 2-process run's update is from the 1-process run's,
    relative to the update itself (0 for an untouched tensor)."""
    step = (one - start).double().norm()
    return 0.0 if step == 0 else float((two - one).double().norm() / step)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loss_type", ["shiq"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, loss_type):
    proc = _launch(tmp_path, "ddp", loss_type)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr  # no DDP warning at every step
    _assert_two_equal_one(tmp_path, loss_type)


@pytest.mark.timeout(240)
def test_fsdp_full_shard_two_processes_match_one_process(tmp_path):
    """FSDP2 full shard of the Llama blocks (configs/accelerate/fsdp.yaml): reference statistics, losses,
    gradient norms and the gathered weights equal one process's."""
    proc = _launch(tmp_path, "fsdp", "shiq")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both processes hold shards (DTensor on dim 0) of the parameters, not copies
    assert proc.stdout.count("accelerate_fsdp_cpu: FSDP DTensor (Shard(dim=0),)") == 2, proc.stdout[-2000:]
    _assert_two_equal_one(tmp_path, "shiq")


@pytest.mark.timeout(240)
def test_fsdp_dro_value_head_two_processes_match_one_process(tmp_path):
    """The DRO value head under FSDP full shard: it sits in the root unit, runs on the detached prompt state
    after the root's forward, and is gathered on every rank for the save; losses, gradient norms, the
    decoder's and the head's updates equal one process's (an earlier elementwise 1e-5 check read Adam's
    amplified reduction-order noise, 1 % of lr on a few near-zero-gradient elements, as a bug)."""
    proc = _launch(tmp_path, "fsdp", "dro")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_two_equal_one(tmp_path, "dro")


@pytest.mark.timeout(240)
def test_ddp_dro_value_head_two_processes_match_one_process(tmp_path):
    """The DRO value head under DDP: it runs outside the wrapped model's forward, so with transformers' default
    ``ddp_find_unused_parameters=True`` DDP marks its parameters ready twice and fails ('Expected to mark a
    variable ready only once'); ShiQConfig's default (False) is what makes this pass."""
    proc = _launch(tmp_path, "ddp", "dro")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_two_equal_one(tmp_path, "dro")


@pytest.mark.parametrize("name, engine", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                          ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, engine):
    """accelerate's own loader reads every shipped config (DeepSpeed is not installed here: parsed, not launched)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == engine and cfg.num_processes == 2 and cfg.mixed_precision == "bf16"
    if name == "fsdp":
        import transformers.models.llama.modeling_llama as llama

        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # the wrapped class is Llama's decoder block, which transformers lists as never to be split
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert "LlamaDecoderLayer" in llama.LlamaPreTrainedModel._no_split_modules
        assert hasattr(llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
        assert cfg.deepspeed_config["gradient_clipping"] == 1.0
