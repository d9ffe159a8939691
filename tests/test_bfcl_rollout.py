"""Batched BFCL rollouts: the same trajectories as one at a time, private back-ends, drop-out, seeds.

Two models: the tiny random Llama in float64 (real left padding, attention mask and KV cache; float64 so that
padding cannot flip an argmax or a draw through rounding) and :class:`helpers.fake_lm.ScriptedLM`, whose answers
are chosen call lists (so calls are executed, fed back and rewarded) and whose next token ignores padding.
"""

import pytest
import torch
from helpers.fake_lm import ScriptedLM

from shiq_lab.infra import assets

if not assets.is_fetched("bfcl"):
    pytest.skip("the BFCL-V3 asset is not fetched: run `python -m shiq_lab.infra.assets fetch bfcl` (1.7 MB, once)",
                allow_module_level=True)

from shiq_lab.infra import models
from shiq_lab.tasks.bfcl import check_episode, load_episodes
from shiq_lab.tasks.bfcl.checker import EpisodeRun
from shiq_lab.tasks.bfcl.prompts import assistant_message, system_prompt, tool_message, user_message
from shiq_lab.tasks.bfcl.rollout import rollout, rollouts


@pytest.fixture(scope="module")
def base():
    return load_episodes("base")


@pytest.fixture(scope="module")
def short(base):
    """The four shortest base entries: 3, 2, 4 and 1 turns, so trajectories finish at different steps."""
    eps = sorted(base, key=lambda e: len(system_prompt(e)) + sum(map(len, e.turns)))[:4]
    assert sorted(e.n_turns for e in eps) == [1, 2, 3, 4]
    return eps


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64 with its weights jittered: the built one's argmax is nearly always a newline,
    which would hide a change of the logits; jittered, its greedy text changes with the context."""
    torch.manual_seed(0)
    model, tok = models.load_model("tiny")
    model = model.to(torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, tok


def _ground_truth_answers(episodes):
    """The script that answers every turn of each episode with its ground-truth calls."""
    def answers(context, turn):
        e = next(e for e in episodes if user_message(e, 0) in context)
        return [(1.0, assistant_message(e.ground_truth[turn]))]
    return answers


def test_greedy_and_sampled_batches_equal_one_at_a_time_rollouts_on_the_tiny_model(tiny64, short) -> None:
    model, tok = tiny64
    solo = [rollout(model, tok, e, max_new_tokens=8, temperature=0.0) for e in short]
    assert rollouts(model, tok, short, [0] * 4, max_new_tokens=8, temperature=0.0, batch_size=4) == solo
    assert len({text for t in solo for text in t.texts}) == sum(e.n_turns for e in short)  # no repeated text
    # sampling: each trajectory draws from its own seeded stream, so the batch size (3: a slot is refilled when
    # the 1-turn entry finishes) changes nothing
    seeds = [11, 12, 13, 14]
    solo = [rollout(model, tok, e, max_new_tokens=8, temperature=1.0, seed=s) for e, s in zip(short, seeds)]
    batched = rollouts(model, tok, short, seeds, max_new_tokens=8, temperature=1.0, batch_size=3)
    assert batched == solo
    assert len({tuple(t.input_ids) for t in batched}) == 4  # four different trajectories, not one repeated
    for t, e in zip(batched, short):
        assert len(t.texts) == e.n_turns and t.rewards == check_episode(e, t.calls).rewards


def test_scripted_ground_truth_batch_executes_each_trajectory_and_scores_one(short) -> None:
    tok = models.load_tokenizer("tiny")
    model = ScriptedLM(tok, _ground_truth_answers(short))
    batched = rollouts(model, tok, short, [0] * 4, max_new_tokens=400, temperature=0.0, batch_size=4)
    assert batched == [rollout(model, tok, e, max_new_tokens=400, temperature=0.0) for e in short]
    for t, e in zip(batched, short):
        assert t.calls == e.ground_truth and t.rewards == [1.0] * e.n_turns and t.score == 1.0
        # the tool messages are the ground truth's own results of each turn, executed on this trajectory's side
        results = [r.results for r in check_episode(e, e.ground_truth).turns]
        assert [m["content"] for m in t.messages if m["role"] == "tool"] == [tool_message(r) for r in results if r]


def test_two_samples_of_one_episode_keep_their_own_back_ends(base) -> None:
    e = base[0]  # the file system: mkdir makes a folder that the next turn's ls lists
    tok = models.load_tokenizer("tiny")

    def answers(context, turn):
        if turn == 0:
            return [(0.5, "[mkdir(dir_name='alpha')]"), (0.5, "[mkdir(dir_name='beta')]")]
        return [(1.0, "[ls()]")]

    model = ScriptedLM(tok, answers)
    solo = {}
    for seed in range(40):  # the first seed of each branch
        t = rollout(model, tok, e, max_new_tokens=30, seed=seed)
        solo.setdefault(t.calls[0][0], (seed, t))
    (sa, a), (sb, b) = solo["mkdir(dir_name='alpha')"], solo["mkdir(dir_name='beta')"]
    batched = rollouts(model, tok, [e, e], [sa, sb], max_new_tokens=30, batch_size=2)
    assert batched == [a, b]
    folders = [set(t.final_state["GorillaFileSystem"]["root"][2]) for t in batched]  # ("Directory", name, contents)
    assert "alpha" in folders[0] - folders[1] and "beta" in folders[1] - folders[0]
    # each trajectory's ls of turn 1 lists only its own folder
    ls = [next(m["content"] for m in t.messages if m["role"] == "tool" and "current_directory_content" in m["content"])
          for t in batched]
    assert "alpha" in ls[0] and "beta" not in ls[0] and "beta" in ls[1] and "alpha" not in ls[1]
    # the state each carries is that of its calls replayed on fresh back-ends
    for t in batched:
        run = EpisodeRun(e)
        for calls in t.calls:
            run.step(calls)
        assert t.final_state == run.model.state() and t.result == run.result


class _CountingScriptedLM(ScriptedLM):
    """Records the rows of every prefill (one per assistant step of the batch)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.prefill_rows = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        if cache is None:
            self.prefill_rows.append(int(input_ids.shape[0]))
        return super().forward(input_ids, attention_mask, position_ids, cache, use_cache, **kwargs)


def test_a_trajectory_that_finishes_early_leaves_the_others_unchanged(short) -> None:
    one, two, four = (next(e for e in short if e.n_turns == n) for n in (1, 2, 4))
    tok = models.load_tokenizer("tiny")
    answers = _ground_truth_answers(short)

    def shortest_first(context, turn):  # the 1-turn entry answers "[]" (EOS after two tokens), the others at length
        return [(1.0, "[]")] if user_message(one, 0) in context else answers(context, turn)

    model = _CountingScriptedLM(tok, shortest_first)
    solo = [rollout(model, tok, e, max_new_tokens=400, temperature=0.0) for e in (one, two, four)]
    model.prefill_rows.clear()
    batched = rollouts(model, tok, [one, four, two], [0, 0, 0], max_new_tokens=400, temperature=0.0, batch_size=2)
    assert batched == [solo[0], solo[2], solo[1]]
    assert batched[0].texts == ["[]"] and batched[0].rewards == [0.0]  # its ground truth has calls
    assert batched[1].score == batched[2].score == 1.0
    # steps: {one, four} -> one is done, two takes its slot -> {four, two} x 2 -> two is done -> {four}
    assert model.prefill_rows == [2, 2, 2, 1]


def test_same_seeds_give_identical_batches_and_other_seeds_do_not(tiny64, short) -> None:
    model, tok = tiny64
    jobs = [short[0], short[0], short[1], short[2]]  # two samples of one entry among them
    a = rollouts(model, tok, jobs, [5, 6, 7, 8], max_new_tokens=6, batch_size=4)
    b = rollouts(model, tok, jobs, [5, 6, 7, 8], max_new_tokens=6, batch_size=4)
    c = rollouts(model, tok, jobs, [9, 6, 7, 8], max_new_tokens=6, batch_size=4)
    assert a == b
    assert a[0].input_ids != a[1].input_ids  # two seeds of one entry: two samples
    assert c[0].input_ids != a[0].input_ids and c[1:] == a[1:]  # a seed changes its own trajectory only


def test_bad_rollout_arguments_are_refused(tiny64, short) -> None:
    model, tok = tiny64
    with pytest.raises(ValueError, match="2 episodes but 1 seeds"):
        rollouts(model, tok, short[:2], [0])
    with pytest.raises(ValueError, match="batch_size=0"):
        rollouts(model, tok, short[:1], [0], batch_size=0)


def test_sweep_evaluation_does_not_depend_on_the_rollout_batch_size(tiny64, short) -> None:
    from shiq_lab.tasks.bfcl.sweep import BfclSweepConfig, evaluate_bfcl

    model, tok = tiny64
    evals = [evaluate_bfcl(model, model, tok, short, BfclSweepConfig(
        model="tiny", max_new_tokens=6, eval_samples_per_entry=2, rollout_batch_size=b)) for b in (1, 3)]
    assert evals[0] == evals[1] and evals[0].n_trajectories == 8 and evals[0].n_turns == 2 * 10
    assert [x["episode_id"] for x in evals[0].examples] == [e.id for e in short]  # the first sample of each entry
    with pytest.raises(ValueError, match="rollout_batch_size=0"):
        BfclSweepConfig(rollout_batch_size=0)


def test_a_row_that_stops_early_draws_nothing_more_from_its_stream(short) -> None:
    """A trajectory's draws must not depend on how long its batch neighbours keep generating: one whose answer
    ends (EOS) while the others go on takes no further draws from its generator, so its next turn samples what
    it would alone."""
    two, four = (next(e for e in short if e.n_turns == n) for n in (2, 4))
    tok = models.load_tokenizer("tiny")
    answers = _ground_truth_answers(short)

    def script(context, turn):  # `two` answers "[]" at once, then samples one of two calls; `four` writes at length
        if user_message(two, 0) in context:
            return [(1.0, "[]")] if turn == 0 else [(0.5, "[ls()]"), (0.5, "[pwd()]")]
        return answers(context, turn)

    model = ScriptedLM(tok, script)
    seeds = range(12)
    solo = [rollout(model, tok, two, max_new_tokens=400, seed=s) for s in seeds]
    assert len({t.texts[1] for t in solo}) == 2  # both calls are drawn: the check below can see a shifted stream
    batched = [rollouts(model, tok, [two, four], [s, 0], max_new_tokens=400, batch_size=2)[0] for s in seeds]
    assert batched == solo
