"""The synthetic benchmark: harness, metrics, baselines, data files and suite schema.

Notebook 03 (which runs the quick suite and asserts its findings) is executed by tests/test_notebooks.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shiq_lab.exact.tree import solve
from shiq_lab.tasks.synthetic.__main__ import main as bench_main
from shiq_lab.tasks.synthetic.forest import stack_datasets, stack_trees
from shiq_lab.tasks.synthetic.harness import METHODS, BatchedAdam, TabularPolicy, calibration_residual, train_forest
from shiq_lab.tasks.synthetic.metrics import policy_metrics, sequences_to_target
from shiq_lab.tasks.synthetic.neural_policy import NeuralPolicy, PathTransformer, state_tokens
from shiq_lab.tasks.synthetic.problems import (
    BEHAVIOURS,
    TASKS,
    behaviour_dataset,
    dataset_fingerprint,
    load_datasets,
    make_task_tree,
    task_specs,
    write_datasets,
)
from shiq_lab.tasks.synthetic.sequence_baselines import order_by_return, prompt_pairs, sequence_loss
from shiq_lab.tasks.synthetic.suite import PARAMETERISATIONS, SuiteConfig, run_suite, write_results

ROOT = Path(__file__).resolve().parent.parent


def _quick_tree(task: str = "token", seed: int = 0):
    return make_task_tree(task_specs("quick")[task], seed)


# ---------------------------------------------------------------- forest and optimiser


def test_batched_adam_is_torch_adam_per_copy() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, dtype=torch.float64)
    target = torch.randn(2, 5, dtype=torch.float64)
    ours = x0.clone().requires_grad_(True)
    opt = BatchedAdam([ours], torch.tensor([0.05, 0.2], dtype=torch.float64))
    refs = [x0[k].clone().requires_grad_(True) for k in range(2)]
    ref_opts = [torch.optim.Adam([refs[0]], lr=0.05), torch.optim.Adam([refs[1]], lr=0.2)]
    for _ in range(8):
        opt.zero_grad()
        ((ours - target) ** 4).sum().backward()
        opt.step()
        for k in range(2):
            ref_opts[k].zero_grad()
            ((refs[k] - target[k]) ** 4).sum().backward()
            ref_opts[k].step()
    assert torch.allclose(ours.detach(), torch.stack([r.detach() for r in refs]), atol=1e-12)


def test_forest_trains_each_copy_as_if_alone() -> None:
    """Two runs (other tree, data size and lr) side by side follow their standalone trajectories."""
    trees = [_quick_tree("multiturn", 0), _quick_tree("multiturn", 1)]
    datas = [behaviour_dataset(trees[0], "uniform", 40, seed=0), behaviour_dataset(trees[1], "mix", 100, seed=1)]
    lrs = [0.1, 0.3]
    for method in ("shiq", "dro", "copg"):  # token-mean, sequence-mean and pair-mean losses
        forest = stack_trees(trees)
        merged, rows = stack_datasets(forest, datas)
        pol = TabularPolicy(forest)
        together = train_forest(pol, method, forest, merged, rows, beta=0.5, lr=torch.tensor(lrs, dtype=torch.float64), steps=12)
        for k in range(2):
            alone_forest = stack_trees([trees[k]])
            alone_data, alone_rows = stack_datasets(alone_forest, [datas[k]])
            alone = train_forest(TabularPolicy(alone_forest), method, alone_forest, alone_data, alone_rows, beta=0.5,
                                 lr=torch.tensor([lrs[k]], dtype=torch.float64), steps=12)
            n = forest.states_per_copy
            assert torch.allclose(together.final_table[k * n:(k + 1) * n], alone.final_table, atol=1e-9), method
            assert math.isclose(float(together.final("normalised_return")[k]), float(alone.final("normalised_return")[0]), abs_tol=1e-9)


def test_forest_of_neural_policies_trains_each_copy_as_if_alone() -> None:
    trees = [_quick_tree("token", 0), _quick_tree("token", 1)]
    datas = [behaviour_dataset(trees[0], "uniform", 40, seed=0), behaviour_dataset(trees[1], "mix", 100, seed=1)]
    forest = stack_trees(trees)
    merged, rows = stack_datasets(forest, datas)
    together = train_forest(NeuralPolicy(forest, [5, 6]), "shiq", forest, merged, rows, beta=0.5,
                            lr=torch.tensor([0.01, 0.003], dtype=torch.float64), steps=6)
    alone_forest = stack_trees([trees[1]])
    alone_data, alone_rows = stack_datasets(alone_forest, [datas[1]])
    alone = train_forest(NeuralPolicy(alone_forest, [6]), "shiq", alone_forest, alone_data, alone_rows, beta=0.5,
                         lr=torch.tensor([0.003], dtype=torch.float64), steps=6)
    assert torch.allclose(together.final_table[forest.states_per_copy:], alone.final_table, atol=1e-4)
    assert float((together.final_table[forest.states_per_copy:] - trees[1].ref_logits).abs().max()) > 1e-3  # it moved


def test_stack_trees_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same tree arguments"):
        stack_trees([_quick_tree("token"), _quick_tree("multiturn")])


# ---------------------------------------------------------------- metrics


def test_metrics_against_exact_identities() -> None:
    """J* - J = beta * KL_seq(pi || pi*); pi* scores 1 and KL 0, pi_ref scores 0, per copy."""
    trees = [make_task_tree(task_specs("full")["multiturn"], s) for s in (0, 1)]
    forest = stack_trees(trees)
    beta = 0.5
    sol = solve(forest.tree, beta)
    gen = torch.Generator().manual_seed(3)
    random_pi = torch.log_softmax(forest.tree.ref_logits + torch.randn(forest.tree.ref_logits.shape, generator=gen, dtype=torch.float64), -1)
    m = policy_metrics(forest, random_pi, sol)
    assert torch.allclose(m["optimal_return"] - m["return"], beta * m["kl_seq"], atol=1e-10)
    assert bool((m["kl_seq"] > 0.01).all())
    at_opt = policy_metrics(forest, sol.log_pi, sol)
    assert torch.allclose(at_opt["normalised_return"], torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert float(at_opt["kl_states"].abs().max()) < 1e-12
    at_ref = policy_metrics(forest, forest.tree.ref_log_probs, sol)
    assert torch.allclose(at_ref["normalised_return"], torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert float(at_ref["kl_ref"].abs().max()) < 1e-12
    # each copy's numbers are its own tree's
    alone = policy_metrics(stack_trees([trees[1]]), random_pi[forest.states_per_copy:], solve(trees[1], beta))
    for key in ("return", "kl_seq", "kl_states", "reward", "kl_ref"):
        assert math.isclose(float(m[key][1]), float(alone[key][0]), rel_tol=1e-10, abs_tol=1e-12), key


def test_sequences_to_target_on_hand_made_curves() -> None:
    sizes = [10, 20, 40, 80]
    assert sequences_to_target(sizes, [0.5, 0.9, 0.995, 1.0]) == (40, True)
    # never reaches 0.99: plateau 0.8, 99 % of it is 0.792, first met at 80 (0.79 falls short)
    assert sequences_to_target(sizes, [0.2, 0.5, 0.79, 0.8]) == (80, False)
    # a diverged (NaN) size never counts; the plateau is read on the finite scores
    assert sequences_to_target(sizes, [0.3, float("nan"), 0.6, 0.59]) == (40, False)
    # worse than the reference everywhere: the plateau itself is the level
    assert sequences_to_target(sizes, [-3.0, -1.0, -2.0, -1.5]) == (20, False)
    with pytest.raises(ValueError, match="strictly increasing"):
        sequences_to_target([10, 10], [0.1, 0.2])


# ---------------------------------------------------------------- baselines


def test_prompt_pairs_connect_each_prompt_in_a_cycle() -> None:
    prompts = torch.tensor([0, 1, 0, 2, 0, 1])
    pairs = prompt_pairs(prompts, seed=0)
    assert pairs.shape == (4, 2)  # prompt 0: a 3-cycle, prompt 1: one pair, prompt 2: none
    assert bool((prompts[pairs[:, 0]] == prompts[pairs[:, 1]]).all())
    degree = torch.bincount(pairs.flatten(), minlength=6)
    assert degree.tolist() == [2, 1, 2, 0, 2, 1]
    with pytest.raises(ValueError, match="two responses"):
        prompt_pairs(torch.tensor([0, 1, 2]))


def test_order_by_return_puts_the_better_response_first_and_drops_ties() -> None:
    returns = torch.tensor([1.0, 3.0, 2.0, 2.0])
    chosen, rejected = order_by_return(returns, torch.tensor([[0, 1], [2, 0], [2, 3]]))
    assert chosen.tolist() == [1, 2] and rejected.tolist() == [0, 0]


def test_sequence_baselines_fixed_points_at_the_optimum() -> None:
    """At theta = log pi* (any per-state offset): DRO (V = v*) and CoPG are exactly 0, soft-label DPO
    is stationary, DPO with pairs ordered by return is not (its margins still want to grow)."""
    tree = _quick_tree("token")
    beta = 0.5
    sol = solve(tree, beta)
    data = behaviour_dataset(tree, "uniform", 64, seed=0)
    pairs = prompt_pairs(data.prompts)
    theta = (sol.log_pi + 7.0 * torch.randn(tree.num_states, 1, dtype=torch.float64)).requires_grad_(True)
    dro = sequence_loss("dro", theta, tree, data, beta=beta, values=sol.root_values)
    copg = sequence_loss("copg", theta, tree, data, beta=beta, pairs=pairs)
    assert float(dro.loss.detach()) < 1e-20 and float(copg.loss.detach()) < 1e-20
    (grad_bt,) = torch.autograd.grad(sequence_loss("dpo_bt", theta, tree, data, beta=beta, pairs=pairs).loss, theta)
    (grad_dpo,) = torch.autograd.grad(sequence_loss("dpo", theta, tree, data, beta=beta, pairs=pairs).loss, theta)
    assert float(grad_bt.abs().max()) < 1e-12
    assert float(grad_dpo.abs().max()) > 1e-3


# ---------------------------------------------------------------- harness on exact optima


def test_shiq_in_the_harness_reaches_pi_star_from_uniform_data() -> None:
    tree = _quick_tree("token")
    forest = stack_trees([tree])
    data, rows = stack_datasets(forest, [behaviour_dataset(tree, "uniform", 512, seed=0)])  # every (s, a) seen
    out = train_forest(TabularPolicy(forest), "shiq", forest, data, rows, beta=0.5, lr=torch.tensor([0.3], dtype=torch.float64),
                       steps=100, eval_every=50)
    assert float(out.final("kl_states")[0]) < 1e-3
    assert float(out.final("normalised_return")[0]) > 0.999


def test_shifted_losses_start_calibrated_and_unshifted_ones_do_not() -> None:
    tree = _quick_tree("multiturn")
    forest = stack_trees([tree, _quick_tree("multiturn", 1)])
    data, rows = stack_datasets(forest, [behaviour_dataset(tree, "mix", 64, seed=0), behaviour_dataset(forest.copy_tree(1), "uniform", 64, seed=1)])
    residual = {m: calibration_residual(m, TabularPolicy(forest), forest, data, rows, beta=0.5) for m in METHODS}
    for m in ("shiq", "shiq_nstep", "shiq_1step", "dro", "copg", "dpo", "dpo_bt"):
        assert float(residual[m].abs().max()) < 1e-9, m
    # the reference logits' per-state offsets (scale 50) show up in the unshifted residuals
    assert float(residual["scoring"].min()) > 1.0 and float(residual["naive"].min()) > 1.0


def test_neural_policy_starts_at_the_reference_and_reads_each_state_causally() -> None:
    trees = [_quick_tree("multiturn", s) for s in (0, 1)]
    forest = stack_trees(trees)
    pol = NeuralPolicy(forest, [0, 1])
    assert torch.equal(pol.table().detach(), forest.tree.ref_logits)
    with torch.no_grad():
        for p in pol.params:
            p.add_(0.1 * torch.randn_like(p))
    table = pol.table().detach()
    # copy 1 as a plain module, fed every state's own token sequence
    single = PathTransformer(trees[1].vocab_size + trees[1].num_prompts, trees[1].horizon, trees[1].vocab_size)
    single.load_state_dict({name: value[1] for name, value in pol._params.items()})
    tokens = state_tokens(trees[1])
    with torch.no_grad():
        direct = single(tokens)[torch.arange(tokens.shape[0]), trees[1].depth].double() + trees[1].ref_logits
    assert torch.allclose(table[forest.states_per_copy:], direct, atol=1e-5)


# ---------------------------------------------------------------- data files and suite


def test_written_datasets_read_back_exactly(tmp_path: Path) -> None:
    manifest = write_datasets(tmp_path, scale="quick", seeds=[0], size=32)
    files = json.loads(manifest.read_text())["files"]
    assert sorted(files) == sorted(f"{t}_seed0.safetensors" for t in TASKS)
    for task in TASKS:
        tree, datasets = load_datasets(tmp_path / f"{task}_seed0.safetensors")
        expected_tree = make_task_tree(task_specs("quick")[task], 0)
        assert torch.equal(tree.ref_logits, expected_tree.ref_logits) and torch.equal(tree.next_state, expected_tree.next_state)
        assert tree.prefixes == expected_tree.prefixes
        for b in BEHAVIOURS:
            want = behaviour_dataset(expected_tree, b, 32, seed=0)
            got = datasets[b]
            for field in ("states", "actions", "rewards", "mask", "prompts", "lengths"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (task, b, field)


def test_committed_data_files_match_the_generator() -> None:
    """data/synthetic/ holds what `python -m shiq_lab.tasks.synthetic synthetic-data` writes with this code."""
    folder = ROOT / "data" / "synthetic"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seeds"] == list(SuiteConfig().seeds) and manifest["size"] == SuiteConfig().largest_size
    same_torch = manifest["torch"] == torch.__version__.split("+")[0]
    for fname, entry in manifest["files"].items():
        _tree, datasets = load_datasets(folder / fname)
        for b, fingerprint in entry["fingerprints"].items():
            assert dataset_fingerprint(datasets[b]) == fingerprint, (fname, b)  # the file is intact
            if same_torch:  # and the generator still produces it (RNG streams may change across torch releases)
                want = behaviour_dataset(make_task_tree(task_specs("full")[entry["task"]["name"]], entry["seed"]), b, manifest["size"], seed=entry["seed"])
                assert dataset_fingerprint(want) == fingerprint, (fname, b)


def _micro_config() -> SuiteConfig:
    return SuiteConfig(scale="quick", seeds=(0,), steps=1, eval_every=1, main_size=16, sizes=(8, 16, 24), neural_sizes=(16,),
                       tabular_lrs=(0.1,), neural_lrs=(0.01,), frontier_betas=(0.5, 1.0))


def test_suite_results_cover_every_method_task_behaviour_and_parameterisation(tmp_path: Path) -> None:
    results = run_suite(_micro_config(), log=lambda _: None)
    summary = {(r["param"], r["task"], r["method"], r["behaviour"]): r for r in results["summary"]}
    assert set(summary) == {(p, t, m, b) for p in PARAMETERISATIONS for t in TASKS for m in METHODS for b in BEHAVIOURS}
    for key, row in summary.items():
        for metric in ("kl_states_mean", "kl_seq_mean", "normalised_return_mean", "return_mean", "optimal_return_mean", "calibration_residual_mean"):
            assert metric in row, (key, metric)
        assert ("sequences_to_target" in row) == (key[0] == "tabular")
    # shifted losses start at zero residual, the naive ones do not (read from the results)
    assert summary[("tabular", "token", "shiq", "uniform")]["calibration_residual_mean"] == 0.0
    assert summary[("tabular", "token", "naive", "uniform")]["calibration_residual_mean"] > 1.0
    assert {p["method"] for p in results["frontier"]["points"]} == set(METHODS)
    json_path, md_path = write_results(results, tmp_path)
    reread = json.loads(json_path.read_text())  # strict JSON: no NaN
    assert reread["meta"]["config"]["steps"] == 1
    md = md_path.read_text()
    assert "## Headline" in md and "ShiQ (full path)" in md and "exact π\\*" in md


def test_cli_rejects_a_bad_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["synthetic", "--quick", "--budget", "0", "--out", "/nonexistent"]) == 2
    assert "budget must be at least 1" in capsys.readouterr().err
