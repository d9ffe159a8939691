"""The GPU check's CPU dry run (benchmarks/gpu_check.py --dry-run): the script cannot rot without a GPU.

The fast test runs the cheap stages at toy size and forces one of them past its budget: the others must
still be measured and the receipt (JSON + markdown) must say which stage timed out. The slow one runs
every stage. Neither writes into benchmarks/results/ (asserted byte for byte).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.common import offline_env
from tests.test_benchmarks_quick import results_digest

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(tmp_path: Path, *extra: str, timeout: int = 300) -> dict:
    before = results_digest()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out-dir", str(tmp_path),
                           "--carry", str(tmp_path / "no-carry"), *extra],
                          cwd=ROOT, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)
    assert results_digest() == before
    receipt = json.loads((tmp_path / "gpu_check.json").read_text())
    assert receipt["dry_run"] is True and receipt["finished"] is True
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check receipt")
    receipt["returncode"], receipt["stdout"] = proc.returncode, proc.stdout
    return receipt


def test_dry_run_one_stage_out_of_time_loses_only_itself(tmp_path):
    receipt = _dry_run(tmp_path, "--stages", "carry", "environment", "precision", "loss_kernel",
                       "--stage-budget", "precision=0.05")  # far below a subprocess start: always out of time
    stages = receipt["stages"]
    assert list(stages) == ["carry", "environment", "precision", "loss_kernel"]
    assert stages["precision"]["status"] == "timeout" and "budget" in stages["precision"]["reason"]
    assert receipt["returncode"] == 1  # a stage did not finish: the command says so
    assert stages["environment"]["status"] == "ok"
    assert set(gpu_check.MODULES) <= set(stages["environment"]["result"]["versions"])
    assert stages["carry"]["status"] == "ok" and stages["carry"]["result"]["notes"][0].startswith("nothing carried")
    kernel = stages["loss_kernel"]
    assert kernel["status"] == "ok" and kernel["result"]["quick"] is True
    # the dry run puts a CPU stand-in of Liger's fused linear cross-entropy on the path: its code path runs,
    # and the Liger goals are evaluated from bench_loss_kernel's own output (not a measurement: a dry run)
    assert kernel["result"]["settings"]["dtype"] == "bfloat16" and kernel["result"]["settings"]["liger"] is True
    assert "liger_flce" in kernel["result"]["main"][0]["times"]
    goals = {g["goal"]: g for g in receipt["goals"]}
    assert list(goals) == [g[0] for g in gpu_check.GOALS]
    assert goals["fused_over_liger_time"]["value"] == kernel["result"]["headline"]["time_fused_over_liger_iqr"]["median"]
    assert goals["fused_over_liger_memory"]["status"] in ("met", "NOT met")
    # no trainer stage: its goals are reported, none is claimed
    assert {goals[k]["status"] for k in ("shiq_over_sft", "shiq_over_dpo", "shiq_mfu")} == {"not measured"}


def test_goals_are_evaluated_from_the_stage_results():
    ratio = {"median": 1.2, "q1": 1.1, "q3": 1.3, "n": 8}
    stages = {
        "train_step": {"result": {"headline": {"clock": "wall_s"}, "results": {
            "shiq_speedup": {"sft": {"wall_s": ratio}, "dpo": {"wall_s": {**ratio, "median": 1.25}}},
            "configs": {"shiq": {"mfu": 0.4, "tokens_per_s": 100.0, "tokens_per_s_iqr": [90.0, 110.0],
                                 "tokens_per_step": 16384}}}}},
        "loss_kernel": {"result": {"headline": {"time_fused_over_liger": 1.5, "matmul_floor": 4 / 3,
                                                "time_fused_over_liger_iqr": {**ratio, "median": 1.5},
                                                "peak_memory_fused_over_liger": 0.9}}},
    }
    goals = {g["goal"]: g for g in gpu_check.evaluate_goals(stages)}
    assert goals["shiq_over_sft"]["status"] == "met" and goals["shiq_over_sft"]["spread"] == [1.1, 1.3]
    assert goals["shiq_over_dpo"]["status"] == "NOT met"  # 1.25 < 1.3
    assert goals["shiq_mfu"]["status"] == "met" and goals["shiq_mfu"]["spread"] == pytest.approx([0.36, 0.44])
    assert goals["fused_over_liger_time"]["status"] == "NOT met"
    assert "measured / floor = 1.125" in goals["fused_over_liger_time"]["note"]
    assert goals["fused_over_liger_memory"]["status"] == "met"


def test_no_gpu_and_no_dry_run_is_a_clear_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--stage-budget", "nostage=3"])


@pytest.mark.slow
def test_dry_run_every_stage(tmp_path):
    receipt = _dry_run(tmp_path, timeout=600)
    stages = receipt["stages"]
    assert list(stages) == list(gpu_check.STAGE_NAMES)
    for name in ("environment", "precision", "loss_kernel", "train_step", "kernel_profile", "reference_precompute"):
        assert stages[name]["status"] == "ok", (name, stages[name].get("reason"))
    assert stages["precision"]["result"]["passed"] is True
    assert set(stages["train_step"]["result"]["results"]["configs"]) == {"sft", "shiq"}
    assert stages["notebook04"]["status"] in ("ok", "skipped")


def test_the_gpu_commands_parse(tmp_path):
    """The full (GPU) command of every benchmark stage is accepted by its script's parser (no typo waits for a GPU)."""
    import importlib

    ctx = gpu_check.Context(dry_run=False, device="cuda", work=tmp_path, carry=tmp_path, site=tmp_path, skip={})
    parsed = 0
    for stage in gpu_check.STAGES:
        if stage.command is None or stage.name == "notebook04":
            continue
        if stage.name == "cuda_tests":  # every test it names exists (a renamed test would silently run nothing)
            for node in gpu_check.CUDA_TESTS:
                path, name = node.split("::")
                assert name in (ROOT / path).read_text(), node
            continue
        argv = stage.command(ctx)
        assert argv[1] == "-m", argv
        module = importlib.import_module(argv[2])
        if argv[2] == "benchmarks.gpu_check":
            assert argv[3] == "--stage-worker" and argv[4] in gpu_check.WORKERS
        else:
            args = module.parse_args(argv[3:])
            assert args.device == "cuda" and args.out_dir == tmp_path.resolve() and not args.quick
            parsed += 1
    assert parsed == 3
    args = importlib.import_module("benchmarks.bench_train_step").parse_args(
        gpu_check.STAGES[gpu_check.STAGE_NAMES.index("train_step")].command(ctx)[3:])
    assert args.batch * (args.prompt_len + args.completion_len) >= 16384  # the MFU goal's tokens per step


def test_a_gpu_receipt_renders_in_the_readme_and_its_markdown(tmp_path):
    """The paths that read a GPU receipt (the README block, the receipt's markdown) run only once a GPU run is
    committed: here on a receipt shaped as a GPU run writes it (environment from CUDA and NVML)."""
    from benchmarks.readme_sections import gpu_receipt

    env = {"device": "cuda", "gpu": "NVIDIA H200", "cuda": "13.0", "capability": [9, 0],
           "driver": {"source": "nvml", "driver": "580.159.03", "name": "NVIDIA H200"},
           "versions": dict.fromkeys(gpu_check.MODULES, "1.0")}
    kernel = {"headline": {"time_fused_over_liger": 1.5, "matmul_floor": 4 / 3, "peak_memory_fused_over_liger": 0.9,
                           "time_fused_over_liger_iqr": {"median": 1.5, "q1": 1.4, "q3": 1.6, "n": 15}}}
    stages = {"carry": {"status": "ok", "seconds": 9.0, "budget_s": 60.0, "result": {
                  "parts_this_call": ["3/3"], "calls": 3, "missing_parts": [], "items": {"trl": "complete"},
                  "notes": [], "unsatisfied_requirements": {}}},
              "environment": {"status": "ok", "seconds": 1.0, "budget_s": 20.0, "result": env},
              "loss_kernel": {"status": "ok", "seconds": 40.0, "budget_s": 90.0, "result": kernel}}
    receipt = {"receipt": "gpu_check", "dry_run": False, "budget_s": 480.0, "elapsed_s": 50.0, "finished": True,
               "started_utc": "2026-12-01T13:00:00Z", "stages": stages}
    gpu_check.write_receipt(receipt, tmp_path / "benchmarks" / "results")
    text = gpu_receipt(tmp_path)
    assert text.startswith("Receipt of 2026-12-01T13:00:00Z: NVIDIA H200, driver 580.159.03, CUDA 13.0")
    assert "| loss kernel time / Liger fused linear CE (trained output layer) | <= 1.4 | 1.500 [1.400, 1.600] | NOT met |" \
        in text
    md = (tmp_path / "benchmarks" / "results" / "gpu_check.md").read_text()
    assert "Device: NVIDIA H200, driver 580.159.03, CUDA 13.0" in md
    assert "Carry (benchmarks/gpu_carry.py): parts this call ['3/3']; 3 call(s) unpacked; missing parts none" in md


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.5),
                                        ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5)])
def test_mfu_peak_of_the_gpus_by_name(monkeypatch, name, peak):
    """The MFU peak a CUDA run reads off the device name (datasheet dense bf16: half the 'with sparsity' figure)."""
    import torch

    from benchmarks import common

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.peak_tflops(torch.device("cuda"), True, None)[0] == peak


def test_driver_from_nvml_else_nvidia_smi_else_the_reason(monkeypatch):
    """environment()'s driver probe, the GPU-only path, with a stand-in NVML (older nvidia-ml-py returns bytes)."""
    import types

    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlSystemGetDriverVersion=lambda: b"580.159.03",
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=150754820096))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_check._driver() == {"source": "nvml", "driver": "580.159.03", "name": "NVIDIA H200",
                                   "memory_bytes": 150754820096}
    assert calls == ["init", "shutdown"]

    def broken() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = broken
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi either
    out = gpu_check._driver()
    assert out["source"] is None and "NVML Shared Library Not Found" in out["error"] and "nvidia-smi" in out["error"]
