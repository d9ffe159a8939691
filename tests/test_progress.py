"""Training you can watch: compact log lines, the Trainer's callbacks swapped, TensorBoard in the run folder,
the sweep bar, and the demo's per-cell bar."""

from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from shiq_lab.infra.models import load_model
from shiq_lab.train.progress import (
    CompactPrinterCallback,
    CompactProgressCallback,
    SweepProgress,
    format_logs,
    install,
)


def test_format_logs_is_one_short_line_of_the_metrics_that_matter():
    logs = {"loss": 0.69314718, "kl": 0.0, "learning_rate": 1e-3, "grad_norm": 14.0512, "epoch": 0.1,
            "tokens_per_second": 1278.4, "total_flos": 12345.0, "value_first_mean": 0.5}
    assert format_logs(logs, 3, 40) == "step 3/40  loss 0.6931  kl 0  |g| 14.05  lr 0.001  tok/s 1278"
    assert format_logs({"eval_loss": 2.5e-5, "eval_kl": 123456.0}, 10) == \
        "step 10  eval_loss 2.50e-05  eval_kl 1.23e+05"
    assert format_logs({"train_runtime": 14.04, "train_loss": 0.4}, 30, 30) == "step 30/30  done in 14.0 s"


@pytest.mark.parametrize("disable_tqdm, old, new", [(False, ProgressCallback, CompactProgressCallback),
                                                    (True, PrinterCallback, CompactPrinterCallback)])
def test_install_swaps_the_printing_callbacks_and_points_tensorboard_at_the_run(tmp_path, disable_tqdm, old, new):
    model = load_model("tiny")[0]
    args = TrainingArguments(output_dir=str(tmp_path / "shiq-beta0.1"), report_to=["tensorboard"], use_cpu=True,
                             disable_tqdm=disable_tqdm)
    trainer = Trainer(model=model, args=args)
    install(trainer)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert new in kinds and old not in kinds
    board = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback")
    assert Path(board.logging_dir) == tmp_path / "shiq-beta0.1"  # not <output_dir>/runs/<timestamp>_<host>


class _Bar:
    def __init__(self):
        self.n, self.postfix = 0, ""

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


class _State:
    def __init__(self, step):
        self.global_step = step


def test_sweep_progress_advances_the_shared_bar_by_each_runs_steps():
    bar = _Bar()
    for name in ("shiq-beta0.1", "dpo-beta0.1"):
        cb = SweepProgress(bar, name)
        for step in (1, 2, 3):
            cb.on_step_end(None, _State(step), None)
            cb.on_log(None, _State(step), None, logs={"loss": 0.5 / step})
    assert bar.n == 6 and bar.postfix == "dpo-beta0.1 loss 0.1667"


def test_the_demo_runs_each_notebook_with_a_bar_over_its_cells(monkeypatch, tmp_path):
    import papermill

    from shiq_lab.infra import demo, notebook_runner

    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda src, dst, **kw: seen.append((Path(src).stem, kw)))
    monkeypatch.setenv("SHIQ_LAB_RUNS", str(tmp_path))
    monkeypatch.setattr(notebook_runner, "runs_dir", lambda: tmp_path)
    monkeypatch.setattr(demo, "runs_dir", lambda: tmp_path)
    assert demo.main(["--only", "01"]) == 0
    (stem, kwargs), = seen
    assert stem == "01_bellman_derivation"
    assert kwargs["progress_bar"]["unit"] == "cell" and "01_bellman_derivation" in kwargs["progress_bar"]["desc"]
