"""The SmolLM2 sweep's results record: derived comparisons by hand, byte-deterministic files, README block."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from shiq_lab.evaluation.generations import FRONTIER_COLUMNS
from shiq_lab.tasks.imdb import smollm2_report as report
from shiq_lab.tasks.imdb.sweep import ImdbTaskConfig, ImdbTaskResult, default_training


class _Eval:
    reward_mean, reward_sem, n, length_mean, finished_fraction = 0.5, 0.03, 64, 16.0, 0.1


def _result() -> ImdbTaskResult:
    cfg = ImdbTaskConfig(model="smollm2-135m", loss_types=["shiq_token", "dpo"], betas=[0.1, 0.5], eval_every=8, use_lora=True)
    training = default_training(max_steps=16, per_device_train_batch_size=16)
    rows = [{"label": "reference", "loss_type": "reference", "beta": float("nan"), "step": 0, "reward_mean": 0.5,
             "reward_sem": 0.03, "kl_mean": 0.0, "kl_sem": 0.0, "kl_states_mean": 0.0, "kl_states_sem": 0.0,
             "length_mean": 16.0, "finished_fraction": 0.1, "n": 64, "path": ""}]
    vals = {("shiq_token", 0.1): [(0.56, 1.5), (0.64, 3.0)], ("shiq_token", 0.5): [(0.52, 0.5), (0.55, 1.0)],
            ("dpo", 0.1): [(0.53, 2.0), (0.70, 8.0)], ("dpo", 0.5): [(0.51, 1.0), (0.58, 4.0)]}
    for (run, beta), pts in vals.items():
        for step, (rew, kl) in zip((8, 16), pts):
            rows.append({"label": "", "loss_type": run, "beta": beta, "step": step, "reward_mean": rew, "reward_sem": 0.04,
                         "kl_mean": kl, "kl_sem": 0.1, "kl_states_mean": kl, "kl_states_sem": 0.1, "length_mean": 16.0,
                         "finished_fraction": 0.1, "n": 64, "path": ""})
    frame = pd.DataFrame(rows)[FRONTIER_COLUMNS]
    ds = Dataset.from_dict({"reward": [0.2, 0.6, 0.7, 0.5], "finished": [True, False, False, True]})
    return ImdbTaskResult(config=cfg, training=training, frontier=frame, history=pd.DataFrame(), reference_eval=_Eval(), final_evals={},
                          classifier_meta={"accuracy_test": 0.9, "accuracy_test_windows": 0.7355, "accuracy_rotten_tomatoes": 0.73},
                          dataset=ds, paths={}, seconds=1234.5)


def test_record_and_derived_numbers_by_hand():
    rec = report.results_record(_result(), command="make bench-imdb-smollm2", machine={"cpu": "x"})
    assert rec["offline"] == {"n": 4, "reward_mean": 0.5, "cut_at_max_new_tokens": 2}
    assert rec["target_reward"] == 0.55
    assert [p["responses"] for p in rec["points"][:2]] == [128, 256]
    p = rec["points"][1]  # shiq_token beta 0.1 step 16
    assert report.gain_se(p, rec["reference"]) == pytest.approx(0.14 / math.hypot(0.04, 0.03))
    assert report.best_at_kl(rec, "dpo", 5.0)["reward_mean"] == 0.58  # 0.70 has KL 8
    assert report.best_at_kl(rec, "shiq_token", 1.0)["reward_mean"] == 0.55  # KL 1.0 counts
    assert report.best_at_kl(rec, "dpo", 0.5) is None
    assert report.responses_to_target(rec, "shiq_token") == 128  # 0.56 >= 0.55 at step 8
    assert report.responses_to_target(rec, "dpo") == 256
    assert [(q["run"], q["beta"], q["step"]) for q in report.final_points(rec)] == [
        ("shiq_token", 0.1, 16), ("shiq_token", 0.5, 16), ("dpo", 0.1, 16), ("dpo", 0.5, 16)]


def test_files_are_byte_deterministic_and_the_readme_block_reads_the_json(tmp_path):
    rec = report.results_record(_result(), command="make bench-imdb-smollm2", machine={"cpu": "x"})
    a = report.write_results(rec, tmp_path / "a", frontier=_result().frontier)
    b = report.write_results(json.loads(a["json"].read_text()), tmp_path / "b", frontier=_result().frontier)
    for kind in ("json", "md", "html"):
        assert a[kind].read_bytes() == b[kind].read_bytes(), kind
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "imdb_smollm2_cpu.json").write_text(a["json"].read_text())
    block = report.readme_section(root)
    assert "0.640 ± 0.040, KL 3.00 (+2.8 s.e.)" in block  # shiq_token beta 0.1, final step
    assert "| ShiQ, token rewards |" in block and "| DPO |" in block
    assert np.isclose(rec["reference"]["reward_mean"], 0.5)


def test_readme_block_before_any_run(tmp_path):
    assert "make bench-imdb-smollm2" in report.readme_section(tmp_path)


def test_committed_results_page_is_rendered_from_the_committed_json():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = sorted((root / "benchmarks" / "results").glob("imdb_smollm2_*.json"))
    if not files:
        pytest.skip("no committed SmolLM2 sweep yet")
    for path in files:
        record = report.load_record(root, path.stem)
        md = path.with_suffix(".md").read_text()
        assert md == report.render_markdown(record), f"stale {path.with_suffix('.md').name}: python -m shiq_lab.tasks.imdb.smollm2_report"
