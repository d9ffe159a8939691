"""Evaluation of generations: exact-zero KL for the reference, known KLs, alignment, the frontier files."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.fake_lm import FakeLM, constant_table

from shiq_lab.evaluation.frontier import (
    CheckpointSpec,
    find_checkpoints,
    frontier_summary,
    pareto_mask,
    plot_frontier,
    save_frontier,
)
from shiq_lab.evaluation.generations import FRONTIER_COLUMNS, evaluate_policy, sequence_stats
from shiq_lab.evaluation.sampling import sample_completions
from shiq_lab.infra.models import load_model, load_tokenizer


def _word_count(prompts, completions):
    return torch.tensor([float(len(c.split())) for c in completions])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _perturbed(model, scale=0.5, seed=0):
    copy, _ = load_model("tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen) * p.std())
    return copy


def test_reference_against_itself_has_exactly_zero_kl(tiny):
    model, tok = tiny
    same_weights, _ = load_model("tiny")  # another object, same weights: the same code path gives 0 too
    for reference in (model, same_weights):
        result = evaluate_policy(model, reference, tok, ["the movie", "a film was"], _word_count,
                                 samples_per_prompt=3, max_new_tokens=5)
        assert result.kl_mean == 0.0 and result.kl_states_mean == 0.0
        assert np.all(result.stats.logratio == 0.0)
    assert result.reward_mean == pytest.approx(np.mean([len(c.split()) for c in result.samples.completions]))
    assert result.n == 6 and result.row()["n"] == 6 and "samples" not in result.row()


def test_known_kl_of_iid_token_policies():
    tok = load_tokenizer("tiny")
    p = {10: 0.7, 11: 0.2, 12: 0.1}
    q = {10: 0.2, 11: 0.3, 12: 0.5}
    per_token = sum(pi * math.log(pi / q[a]) for a, pi in p.items())
    policy, reference = FakeLM(constant_table(p, len(tok))), FakeLM(constant_table(q, len(tok)))
    T = 6  # no EOS is reachable: every response has T tokens
    result = evaluate_policy(policy, reference, tok, ["the movie"] * 50, _word_count, samples_per_prompt=8,
                             max_new_tokens=T, batch_size=100, seed=0)
    # the exact per-state KL is the same at every state
    assert np.allclose(result.stats.kl_states, T * per_token, rtol=1e-5)
    # the sampled log-ratio is an unbiased, noisy estimate of the same number
    assert abs(result.kl_mean - T * per_token) < 4 * result.kl_sem
    assert result.kl_sem > 0 and result.length_mean == T and result.finished_fraction == 0.0


def test_teacher_forced_logratios_align_with_a_plain_per_sample_computation(tiny):
    reference, tok = tiny
    policy = _perturbed(reference)
    samples = sample_completions(policy, tok, ["the movie was", "bad", "a very long and boring film"],
                                 samples_per_prompt=2, max_new_tokens=5, seed=3)
    stats = sequence_stats(policy, reference, samples, pad_id=tok.pad_token_id, batch_size=4)
    for i in range(len(samples)):
        ids = torch.tensor([samples.prompt_ids[i] + samples.completion_ids[i]])
        start, n = len(samples.prompt_ids[i]), len(samples.completion_ids[i])
        with torch.no_grad():
            lp = torch.log_softmax(policy(input_ids=ids).logits[0].float(), -1)
            lr = torch.log_softmax(reference(input_ids=ids).logits[0].float(), -1)
        acts = ids[0, start:start + n]
        states = torch.arange(start - 1, start + n - 1)
        expected = (lp[states, acts] - lr[states, acts]).sum().item()
        kl = (lp[states].exp() * (lp[states] - lr[states])).sum().item()
        assert stats.logratio[i] == pytest.approx(expected, abs=1e-4)
        assert stats.kl_states[i] == pytest.approx(kl, abs=1e-4)
        assert stats.lengths[i] == n
    assert (stats.kl_states > 0).all()


def test_peft_policy_with_reference_none_uses_disabled_adapters(tiny):
    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    lora = get_peft_model(load_model("tiny")[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    a = evaluate_policy(lora, None, tok, ["the movie"], _word_count, samples_per_prompt=4, max_new_tokens=4)
    b = evaluate_policy(lora, base, tok, ["the movie"], _word_count, samples_per_prompt=4, max_new_tokens=4)
    assert a.samples.completion_ids == b.samples.completion_ids
    assert np.allclose(a.stats.logratio, b.stats.logratio, atol=1e-5) and a.kl_states_mean > 0
    with pytest.raises(ValueError, match="peft"):
        evaluate_policy(base, None, tok, ["the movie"], _word_count)


def test_pareto_mask_on_hand_made_points():
    frame = pd.DataFrame({"loss_type": ["a", "a", "a", "a", "b"],
                          "kl_states_mean": [0.0, 1.0, 2.0, 1.0, 3.0],
                          "reward_mean": [0.5, 0.6, 0.55, 0.7, 0.4]})
    assert pareto_mask(frame, by=None).tolist() == [True, False, False, True, False]
    assert pareto_mask(frame).tolist() == [True, False, False, True, True]  # "b" alone on its own front


def _frame():
    rows = [{"label": "reference", "loss_type": "reference", "beta": float("nan"), "step": 0, "path": ""},
            {"label": "x", "loss_type": "shiq", "beta": 0.1, "step": 10, "path": "p"},
            {"label": "y", "loss_type": "shiq", "beta": 0.1, "step": 20, "path": "p"},
            {"label": "z", "loss_type": "dpo", "beta": 0.5, "step": 20, "path": "q"}]
    numbers = {"reward_mean": [0.5, 0.6, 0.7, 0.65], "reward_sem": [0.01] * 4, "kl_mean": [0, 1, 2, 3],
               "kl_sem": [0, .1, .1, .1], "kl_states_mean": [0, 1.1, 2.1, 2.9], "kl_states_sem": [0, .05, .05, .05],
               "length_mean": [10] * 4, "finished_fraction": [0.1] * 4, "n": [64] * 4}
    frame = pd.DataFrame(rows)
    for k, v in numbers.items():
        frame[k] = v
    return frame[FRONTIER_COLUMNS]


def test_save_and_plot_frontier(tmp_path):
    frame = _frame()
    paths = save_frontier(frame, tmp_path / "f")
    back = pd.read_csv(paths["csv"])
    assert back["reward_mean"].tolist() == frame["reward_mean"].tolist()
    records = json.loads(paths["json"].read_text())
    assert [r["label"] for r in records] == ["reference", "x", "y", "z"]
    assert paths["html"].exists() and (tmp_path / "f" / "plotly.min.js").exists()
    fig = plot_frontier(frame)
    names = [t.name for t in fig.data]
    assert names == ["dpo β=0.5", "shiq β=0.1", "reference"]  # ShiQ drawn after (on top of) the other losses
    shiq = fig.data[1]
    # each run's line starts at the reference point and follows its checkpoints in step order
    assert list(shiq.x) == [0.0, 1.1, 2.1] and list(shiq.y) == [0.5, 0.6, 0.7]
    assert list(shiq.text) == ["", "", "β=0.1, step 20"]  # the run's last point carries its beta and step
    assert list(shiq.customdata) == ["reference", "step 10", "step 20"]  # every point's hover its step
    assert shiq.line.color == shiq.marker.color == "#d62728" and shiq.zorder > fig.data[0].zorder
    assert fig.layout.legend.orientation == "h" and fig.layout.autosize and fig.layout.width is None
    table = frontier_summary(frame)
    assert list(table["run"]) == ["reference", "shiq β=0.1", "shiq β=0.1", "dpo β=0.5"]
    assert table["reward"][1] == "0.600 ± 0.010" and len(table.columns) == 6
    with pytest.raises(ValueError, match="kl="):
        plot_frontier(frame, kl="kl")


def test_find_checkpoints_reads_run_json_and_steps(tmp_path, tiny):
    model, _tok = tiny
    run = tmp_path / "shiq-beta0.1"
    for sub in ("checkpoint-10", "final"):
        model.save_pretrained(run / sub)
    (run / "run.json").write_text(json.dumps({"model": "tiny", "loss_type": "shiq", "beta": 0.1}))
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    specs = find_checkpoints(tmp_path)
    assert [(s.loss_type, s.beta, s.step) for s in specs] == [("shiq", 0.1, 10), ("shiq", 0.1, -1)]
    assert isinstance(specs[0], CheckpointSpec) and specs[0].label == "shiq beta=0.1 step=10"
    # `shiq-lab train` saves its final model next to checkpoint-N of the same step: listed once
    cli_run = tmp_path / "cli"
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        model.save_pretrained(cli_run / sub)
    (cli_run / "log_history.json").write_text(json.dumps([{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}]))
    for n in (2, 4):
        (cli_run / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    assert [(Path(s.path).name, s.step) for s in find_checkpoints(cli_run)] == [("checkpoint-2", 2), ("checkpoint-4", 4)]
    (cli_run / "checkpoint-4" / "config.json").unlink()  # only checkpoint-2 kept: the final model is step 4
    assert [(Path(s.path).name, s.step) for s in find_checkpoints(cli_run)] == [("checkpoint-2", 2), ("cli", 4)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model folder"):
        find_checkpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoints(tmp_path / "missing")
