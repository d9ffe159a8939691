"""The shiq-lab command line: every loss type from a config, flags, precompute-ref, resume, evaluate, models."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shiq_lab import cli
from shiq_lab.infra.config import ConfigError
from shiq_lab.infra.models import model_folder
from shiq_lab.reference import cache as ref_mod
from shiq_lab.reference.cache import StaleReferenceCacheError

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny_cpu.yaml")




def quick(tmp_path, *extra, out="run", steps=3):
    return ["--config", CONFIG, "--output_dir", str(tmp_path / out), "--max_steps", str(steps), "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--ref_cache_dir", str(tmp_path / "cache"),
            "--disable_tqdm", "true", *extra]


def history(folder):
    return [h for h in json.loads((Path(folder) / "log_history.json").read_text()) if "loss" in h]


@pytest.mark.parametrize("loss_type", ["shiq", "dpo", "dro", "copg"])
def test_train_each_loss_type_from_the_cli(tmp_path, loss_type):
    assert cli.main(["train", *quick(tmp_path, "--loss_type", loss_type, "--per_device_train_batch_size", "4")]) == 0
    logs = history(tmp_path / "run")
    assert len(logs) == 3 and logs[0]["kl"] == 0.0 and all(math.isfinite(h["loss"]) for h in logs)
    if loss_type == "dpo":
        assert logs[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-6)
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    initial = load_file(str(model_folder("tiny") / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert not any("value_head" in k for k in trained)
    assert (tmp_path / "run" / "shiq_value_head.safetensors").exists() == (loss_type == "dro")


def test_flags_override_the_config_and_unknown_fields_fail(tmp_path):
    run, cfg, _ = cli.parse_config(["--config", CONFIG, "--beta", "0.25", "--loss_type", "copg", "--use_lora", "true"])
    assert (cfg.beta, cfg.loss_type, run.use_lora, cfg.max_length, run.model) == (0.25, "copg", True, 64, "tiny")
    assert json.loads(run.dataset_kwargs) == {"n": 64, "seed": 0} and cfg.learning_rate == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nbetta: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field\(s\) 'betta' \(did you mean 'beta'\?\)"):
        cli.parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="--bogus"):
        cli.parse_config(["--config", CONFIG, "--bogus", "1"])
    with pytest.raises(ConfigError, match=r"beta=-1\.0: must be a finite number > 0"):
        cli.parse_config(["--config", CONFIG, "--beta", "-1"])
    assert cli.main(["nonsense"]) == 2


def test_precompute_ref_then_train_reads_the_stats_without_a_reference_pass(tmp_path, monkeypatch, capsys):
    stats = tmp_path / "stats"
    args = quick(tmp_path, "--eval_fraction", "0")
    assert cli.main(["precompute-ref", *args, "--output", str(stats)]) == 0
    assert str(stats) in capsys.readouterr().out
    calls = []
    original = ref_mod.compute_reference_stats
    monkeypatch.setattr(ref_mod, "compute_reference_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert cli.main(["train", *args, "--ref_stats_path", str(stats)]) == 0
    assert calls == [] and history(tmp_path / "run")[0]["kl"] == 0.0
    # the same entry for other data is stale: refused, not used
    other = quick(tmp_path, "--eval_fraction", "0", "--dataset_kwargs", '{"n": 64, "seed": 1}', out="run2")
    capsys.readouterr()
    assert cli.main(["train", *other, "--ref_stats_path", str(stats)]) == 2  # one message, no traceback
    assert "another dataset" in capsys.readouterr().err
    with pytest.raises(StaleReferenceCacheError, match="another dataset"):  # the traceback behind --debug
        cli.main(["train", *other, "--ref_stats_path", str(stats), "--debug"])
    assert not (tmp_path / "run2" / "model.safetensors").exists()
    # the keyed cache: precompute-ref fills it, train reads it
    calls.clear()
    assert cli.main(["precompute-ref", *args]) == 0
    assert len(calls) == 1
    assert cli.main(["train", *args, "--output_dir", str(tmp_path / "run3")]) == 0
    assert len(calls) == 1


def test_resume_last_checkpoint_from_the_cli(tmp_path, capfd, caplog):
    args = ["--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
    assert cli.main(["train", *quick(tmp_path, *args, steps=4, out="full")]) == 0
    full = history(tmp_path / "full")
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    assert cli.main(["train", *quick(tmp_path, *args, "--resume_from_checkpoint", "last", steps=4, out="part")]) == 0
    part = history(tmp_path / "part")
    # the tied lm_head.weight is not reported missing on resume
    assert "missing keys" not in capfd.readouterr().err + caplog.text
    assert [h["step"] for h in part] == [1, 2, 3, 4]
    assert [h["loss"] for h in part[2:]] == pytest.approx([h["loss"] for h in full[2:]], rel=1e-6)
    capfd.readouterr()
    assert cli.main(["train", *quick(tmp_path, "--resume_from_checkpoint", "last", out="empty")]) == 2
    assert "no checkpoint to resume in" in capfd.readouterr().err


def test_lora_from_the_cli_saves_adapters(tmp_path):
    assert cli.main(["train", *quick(tmp_path, "--use_lora", "true", "--lora_r", "4", "--lora_target_modules",
                                     "q_proj,v_proj", "--learning_rate", "1e-2")]) == 0
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    adapters = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())


def test_evaluate_offline_of_the_reference_itself_has_zero_kl(tmp_path, capsys):
    args = quick(tmp_path, "--per_device_eval_batch_size", "8")
    assert cli.main(["evaluate", "--offline", *args, "--checkpoint", str(model_folder("tiny"))]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.rindex("{\n"):])
    assert metrics["eval_kl"] == 0.0 and metrics["eval_logratio"] == 0.0 and metrics["eval_loss"] > 0


def test_evaluate_delegates_to_the_task_evaluator(monkeypatch):
    from shiq_lab.infra import registry

    registry.load_tasks()
    assert "imdb" in registry.EVALUATORS  # registered by the task package, not named by the core
    seen = []
    monkeypatch.setitem(registry.EVALUATORS, "imdb", lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(registry.EVALUATORS, "other", lambda argv: seen.append(["other", *argv]) or 0)
    assert cli.main(["evaluate", "--run_dir", "runs/x"]) == 0
    assert cli.main(["evaluate", "--task", "other", "--run_dir", "runs/y"]) == 0
    assert seen == [["--run_dir", "runs/x"], ["other", "--run_dir", "runs/y"]]


def test_models_list_and_fetch(capsys):
    assert cli.main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed
    assert cli.main(["models"]) == 0  # no sub-command: the same list, not a usage error
    assert capsys.readouterr().out == listed
    assert cli.main(["models", "fetch", "tiny"]) == 0
    assert str(model_folder("tiny")) in capsys.readouterr().out
    assert cli.main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_shipped_configs_parse_and_name_existing_things():
    import importlib

    configs = sorted((Path(CONFIG).parent).glob("*.yaml"))
    assert {c.name for c in configs} >= {"tiny_cpu.yaml", "smollm2_gpu.yaml"}
    # (use_cpu: this machine has no GPU, and bf16 needs one unless told to run on CPU)
    run, cfg, _ = cli.parse_config(["--config", str(Path(CONFIG).parent / "smollm2_gpu.yaml"), "--use_cpu", "true"])
    assert (run.model, cfg.bf16, cfg.loss_type, cfg.report_to) == ("smollm2-135m", True, "shiq", ["tensorboard"])
    module, fn = run.dataset.split(":")
    assert callable(getattr(importlib.import_module(module), fn))
    assert json.loads(run.dataset_kwargs)["model"] == "smollm2-135m"


def test_evaluate_offline_help_lists_its_own_flag_and_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", "--offline", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: shiq-lab evaluate --offline") and "--checkpoint CHECKPOINT" in out and "--beta" in out
