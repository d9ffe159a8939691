"""BFCL prompts, decoding, offline multi-turn data (masks and per-turn rewards) and rollouts with the tiny model."""

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from shiq_lab.infra import assets

if not assets.is_fetched("bfcl"):
    pytest.skip("the BFCL-V3 asset is not fetched: run `python -m shiq_lab.infra.assets fetch bfcl` (1.7 MB, once)",
                allow_module_level=True)

from shiq_lab.data import tokenize_dataset
from shiq_lab.infra import models
from shiq_lab.tasks.bfcl import check_episode, load_episodes
from shiq_lab.tasks.bfcl.asset import CATEGORIES
from shiq_lab.tasks.bfcl.dataset import corrupt, execute, offline_rows, with_reward_mode
from shiq_lab.tasks.bfcl.prompts import (
    PromptConfig,
    assistant_message,
    decode_calls,
    render_docs,
    system_prompt,
    user_message,
)
from shiq_lab.tasks.bfcl.report import results_table
from shiq_lab.tasks.bfcl.rollout import rollout, trajectory_kl


@pytest.fixture(scope="module")
def base():
    return load_episodes("base")


@pytest.fixture(scope="module")
def tiny_tok():
    return models.load_tokenizer("tiny")


def test_decode_calls_reads_lists_fences_and_text() -> None:
    assert decode_calls("[cd(folder='a'), ls(a=True)]") == ["cd(folder='a')", "ls(a=True)"]
    assert decode_calls("```python\n[cd(folder='a')]\n```") == ["cd(folder='a')"]
    assert decode_calls("Sure: [cd(folder='a b')] is the call.") == ["cd(folder='a b')"]
    assert decode_calls("pwd()") == ["pwd()"]
    assert decode_calls("[]") == [] and decode_calls("I cannot do that.") == [] and decode_calls("[cd(") == []
    # a non-call element comes back as text: the parser refuses it later, nothing is evaluated here
    assert decode_calls("[__import__('os'), 1]") == ["__import__('os')", "1"]


def test_every_ground_truth_turn_round_trips_through_the_assistant_text() -> None:
    for category in CATEGORIES:
        for e in load_episodes(category):
            for turn in e.ground_truth:
                assert decode_calls(assistant_message(turn)) == turn


def test_docs_profiles(base) -> None:
    e = base[0]
    sig = render_docs(["cd", "ls", "mv"], ["GorillaFileSystem"], "signatures")
    assert sig.splitlines() == ["cd(folder)", "ls(a = False)", "mv(source, destination)"]
    compact = render_docs(["cd"], ["GorillaFileSystem"], "compact")
    assert compact == "cd(folder: str): Change the current working directory to the specified folder."
    sizes = [len(system_prompt(e, PromptConfig(docs=p))) for p in ("json", "compact", "signatures")]
    assert sizes[0] > 4 * sizes[1] > 4 * sizes[2] / 2 and sizes[1] > sizes[2]
    # miss_func: the withheld function's docs arrive with the turn that gives it back
    mf = load_episodes("miss_func")[0]
    assert "sort(" not in system_prompt(mf) and user_message(mf, 3).startswith("sort(")
    assert user_message(mf, 0) == mf.turns[0]


def test_corruptions_change_one_turn_and_later_turns_run_on_the_corrupted_state(base) -> None:
    rng = random.Random(0)
    for e in base[:30]:
        for kind in ("drop", "swap", "perturb"):
            got = corrupt(e, kind, rng)
            if got is None:
                assert kind == "swap"
                continue
            calls, info = got
            changed = [k for k in range(e.n_turns) if calls[k] != e.ground_truth[k]]
            assert changed == [info["turn"]]
            if kind == "drop":
                assert len(calls[info["turn"]]) == len(e.ground_truth[info["turn"]]) - 1
    # base_0, cd and mkdir swapped: temp is made in workspace/, the report lands in document/temp (a rename)
    e = base[0]
    calls = copy.deepcopy(e.ground_truth)
    calls[0][0], calls[0][1] = calls[0][1], calls[0][0]
    t = execute(e, calls, "swap")
    assert t.rewards == [0.0, 0.0, 0.0, 0.0] and t.score == 0.0


def test_tokenised_rows_mask_environment_tokens_and_put_each_turn_reward_on_its_last_assistant_token(
        base, tiny_tok) -> None:
    episodes = [base[0], load_episodes("miss_func")[0]]
    rows = offline_rows(episodes, corruptions_per_kind=1, seed=0)
    assert {r["source"] for r in rows} == {"ground_truth", "drop", "swap", "perturb"}
    final = [with_reward_mode(r["messages"], r["score"], "final") for r in rows]
    ds = tokenize_dataset([{"messages": r["messages"]} for r in rows] + [{"messages": m} for m in final],
                          tiny_tok, max_length=16384)
    for i, msgs in enumerate([r["messages"] for r in rows] + final):
        ids, mask, rewards = ds[i]["input_ids"], ds[i]["action_mask"], ds[i]["token_rewards"]
        runs, cur = [], []
        for t, m in enumerate(mask):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        assistant = [m for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(assistant)
        ends = {run[-1]: a["reward"] for run, a in zip(runs, assistant)}
        assert all(rewards[t] == ends.get(t, 0.0) for t in range(len(ids)))
        for run, a in zip(runs, assistant):
            assert tiny_tok.decode([ids[t] for t in run]) == a["content"] + "<|im_end|>"
        environment = tiny_tok.decode([ids[t] for t in range(len(ids)) if not mask[t]])
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")  # what follows it is not trained on
        for m in msgs[:last]:
            if m["role"] in ("user", "tool", "system"):
                assert m["content"] in environment
    # the per-turn rows of base_0's ground truth: four turns, each rewarded 1
    assert [m["reward"] for m in rows[0]["messages"] if m["role"] == "assistant"] == [1.0, 1.0, 1.0, 1.0]


def test_rollout_keeps_the_sampled_ids_and_scores_them(base, tiny_tok) -> None:
    torch.manual_seed(0)
    model, tok = models.load_model("tiny")
    e = min(base, key=lambda x: len(system_prompt(x)) + sum(map(len, x.turns)))
    a = rollout(model, tok, e, max_new_tokens=6, temperature=1.0, seed=3)
    b = rollout(model, tok, e, max_new_tokens=6, temperature=1.0, seed=3)
    assert a.input_ids == b.input_ids and a.texts == b.texts
    assert len(a.input_ids) == len(a.action_mask) and 0 < sum(a.action_mask) <= 6 * e.n_turns
    assert a.rewards == check_episode(e, a.calls).rewards
    environment = tok.decode([t for t, m in zip(a.input_ids, a.action_mask) if not m])
    assert all(user_message(e, k) in environment for k in range(e.n_turns))
    assert trajectory_kl(model, model, a.input_ids, a.action_mask) == 0.0
    other, _ = models.load_model("tiny")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert trajectory_kl(other, model, a.input_ids, a.action_mask) > 0.0


def test_results_table_renders_the_numbers() -> None:
    doc = {"results": {"reference": {"turn_accuracy": 0.0, "score": 0.0, "kl_states_mean": 0.0, "kl_states_sem": 0.0},
                       "shiq_turn": {"turn_accuracy": 0.25, "score": 0.125, "kl_states_mean": 1.5,
                                     "kl_states_sem": 0.25}}}
    assert results_table(doc).splitlines()[2:] == [
        "| reference (SmolLM2-135M-Instruct) | 0.000 | 0.000 | 0.00 ± 0.00 |",
        "| ShiQ, per-turn rewards | 0.250 | 0.125 | 1.50 ± 0.25 |"]


@pytest.mark.slow
def test_quick_sweep_runs_every_variant_and_writes_no_committed_results(tmp_path) -> None:
    from shiq_lab.tasks.bfcl.sweep import VARIANTS, main

    committed = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "bfcl_cpu.json"
    before = committed.read_bytes() if committed.exists() else None
    assert main(["--quick", "--model", "tiny", "--output_dir", str(tmp_path), "--results", str(tmp_path / "r")]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["results"]) == {"reference", *VARIANTS}
    assert doc["results"]["reference"]["kl_states_mean"] == 0.0
    assert all(0.0 <= r["score"] <= 1.0 and 0.0 <= r["turn_accuracy"] <= 1.0 for r in doc["results"].values())
    assert all(r["score"] == 0.0 for r in doc["results"].values() if r["turn_accuracy"] == 0.0)
    assert not (tmp_path / "r.json").exists()  # --quick never writes results files
    assert (committed.read_bytes() if committed.exists() else None) == before

