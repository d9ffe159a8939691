"""Tabular fits: gradient descent on the ShiQ loss from the reference logits reaches the exact pi*.

Exactness needs every policy (state, action) pair in the data (the loss says nothing about the
logits of a pair it never sees), so each fit asserts full coverage of its off-policy dataset.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from shiq_lab.exact.fit import TOKEN_LOSSES, fit_tabular, implied_policy, loss_gradient, token_loss
from shiq_lab.exact.tree import (
    TokenTree,
    concat_datasets,
    coverage,
    enumerate_paths,
    make_token_tree,
    mean_state_kl,
    regularised_return,
    sample_dataset,
    skewed_policy,
    solve,
    tabular_logits,
    uniform_log_probs,
    visited_pairs,
)
from shiq_lab.losses import shiq_logit_grad, shiq_loss, token_logprobs


def off_policy_behaviour(tree: TokenTree, uniform_weight: float = 0.5) -> torch.Tensor:
    """A skewed policy far from pi_ref, mixed with the uniform one so that every pair gets visited."""
    return torch.logaddexp(
        skewed_policy(tree, strength=3.0) + math.log(1 - uniform_weight),
        uniform_log_probs(tree) + math.log(uniform_weight),
    )


FIT_TREES = {
    "v3h3p2-mixed": dict(vocab_size=3, horizon=3, num_prompts=2, seed=0),
    "v4h3-terminal": dict(vocab_size=4, horizon=3, reward="terminal", seed=1),
    "v3h5-env": dict(vocab_size=3, horizon=5, env_depths=(2,), seed=3),
}


def assert_fit_reaches_pi_star(tree: TokenTree, data, beta: float) -> None:
    sol = solve(tree, beta)
    res = fit_tabular(tree, data, "shiq", beta=beta, optimizer="lbfgs", steps=6, eval_every=5)
    pol = tree.policy_states
    pi = implied_policy("shiq", res.theta, tree, beta).exp()
    assert float((pi - sol.pi)[pol].abs().max()) < 1e-6
    assert regularised_return(tree, pi.log(), beta) == pytest.approx(sol.optimal_return, abs=1e-9)
    assert res.history[-1]["loss"] < 1e-12 < res.history[0]["loss"]
    # the shift pins the logits themselves (not only the softmax): theta = l_ref + q*/beta
    assert float((res.theta - tree.ref_logits - sol.q / beta)[pol].abs().max()) < 1e-4


@pytest.mark.parametrize("name", sorted(FIT_TREES))
def test_lbfgs_on_the_shiq_loss_reaches_pi_star_from_off_policy_data(name: str) -> None:
    """Skewed-policy samples, topped up with every path once so that every pair is visited."""
    tree = make_token_tree(**FIT_TREES[name])
    skewed = sample_dataset(tree, skewed_policy(tree, strength=3.0), 200, seed=0)
    assert coverage(tree, skewed) < 1.0  # a skewed policy alone leaves pairs unvisited
    data = concat_datasets(skewed, enumerate_paths(tree))
    assert coverage(tree, data) == 1.0, "exactness needs every (state, action) pair visited"
    assert_fit_reaches_pi_star(tree, data, beta=0.5)


def test_lbfgs_on_the_shiq_loss_reaches_pi_star_from_sampled_off_policy_data() -> None:
    tree = make_token_tree(**FIT_TREES["v3h3p2-mixed"])
    data = sample_dataset(tree, off_policy_behaviour(tree), 500, seed=0)
    assert coverage(tree, data) == 1.0, "exactness needs every (state, action) pair visited"
    assert_fit_reaches_pi_star(tree, data, beta=2.0)


@pytest.mark.parametrize("loss", ["shiq_nstep", "shiq_1step"])
def test_n_step_and_one_step_fits_reach_pi_star_on_a_covering_dataset(loss: str) -> None:
    tree = make_token_tree(vocab_size=3, horizon=4, seed=2)
    beta = 0.5
    sol = solve(tree, beta)
    data = enumerate_paths(tree)
    res = fit_tabular(tree, data, loss, beta=beta, optimizer="lbfgs", steps=10, eval_every=10, horizon=2)
    pi = implied_policy(loss, res.theta, tree, beta).exp()
    assert float((pi - sol.pi)[tree.policy_states].abs().max()) < 1e-6


def test_unvisited_pairs_are_not_learned() -> None:
    """Why coverage matters: a fit on partial data reaches zero loss but not pi* everywhere."""
    tree = make_token_tree(vocab_size=3, horizon=4, seed=2)
    beta = 0.5
    sol = solve(tree, beta)
    data = sample_dataset(tree, tree.ref_log_probs, 20, seed=0)
    assert coverage(tree, data) < 1.0
    res = fit_tabular(tree, data, "shiq", beta=beta, optimizer="lbfgs", steps=10, eval_every=10)
    assert res.history[-1]["loss"] < 1e-12
    err = (implied_policy("shiq", res.theta, tree, beta).exp() - sol.pi).abs().max(-1).values
    unvisited_states = ~visited_pairs(tree, data).any(-1) & tree.policy_states
    assert float(err[unvisited_states].max()) > 1e-2
    torch.testing.assert_close(res.theta[unvisited_states], tree.ref_logits[unvisited_states], rtol=0, atol=0)


def test_with_zero_reward_shiq_stays_at_pi_ref_while_the_unshifted_losses_drift() -> None:
    tree = make_token_tree(vocab_size=3, horizon=4, seed=0)
    tree = dataclasses.replace(tree, rewards=torch.zeros_like(tree.rewards))  # pi* = pi_ref
    beta = 1.0
    data = enumerate_paths(tree)
    for loss in ("shiq", "shiq_1step"):
        assert float(loss_gradient(loss, tree.ref_logits, tree, data, beta=beta).abs().max()) == 0.0
        res = fit_tabular(tree, data, loss, beta=beta, steps=30, lr=0.1, eval_every=10)
        assert torch.equal(res.theta, tree.ref_logits)
        assert max(abs(k) for k in res.column("kl_to_optimum")) < 1e-15
    for loss in ("scoring", "naive"):
        res = fit_tabular(tree, data, loss, beta=beta, steps=30, lr=0.1, eval_every=10)
        assert res.history[0]["loss"] > 1.0
        assert res.history[-1]["kl_to_optimum"] > 0.05


def test_adam_fit_approaches_pi_star_and_records_history() -> None:
    tree = make_token_tree(vocab_size=3, horizon=4, reward="terminal", seed=1)
    beta = 1.0
    sol = solve(tree, beta)
    data = enumerate_paths(tree)
    seen: list[int] = []

    def on_eval(step: int, pol: torch.Tensor) -> dict[str, float]:
        seen.append(step)
        return {"kl_to_ref": mean_state_kl(tree, pol, tree.ref_log_probs)}

    res = fit_tabular(tree, data, "shiq", beta=beta, steps=150, lr=0.05, eval_every=50, on_eval=on_eval)
    assert seen == [0, 50, 100, 149]
    assert res.column("step") == [0.0, 50.0, 100.0, 149.0]
    kl = res.column("kl_to_optimum")
    assert kl[-1] < 1e-3 * kl[0]
    assert res.history[-1]["return"] == pytest.approx(sol.optimal_return, abs=1e-3)
    assert res.history[-1]["optimal_return"] == sol.optimal_return
    assert res.history[-1]["kl_to_ref"] > 0.01  # reward moved the policy away from pi_ref


def test_implied_policy_of_each_loss_at_its_fixed_point_is_pi_star() -> None:
    tree = make_token_tree(vocab_size=4, horizon=3, num_prompts=2, env_depths=(1,), seed=6)
    beta = 0.7
    sol = solve(tree, beta)
    fixed_points = {
        "shiq": tree.ref_logits + sol.q / beta,
        "shiq_1step": tree.ref_logits + sol.q / beta,
        "scoring": tree.ref_log_probs + sol.q / beta,
        "naive": sol.q,
    }
    for loss, theta in fixed_points.items():
        torch.testing.assert_close(implied_policy(loss, theta, tree, beta).exp(), sol.pi, rtol=0, atol=1e-12)
    # the naive loss reads logits as q: sampling from it needs pi_ref and beta, a plain softmax is wrong
    plain = torch.softmax(sol.q, -1)
    assert float((plain - sol.pi)[tree.policy_states].abs().max()) > 1e-2


def test_token_loss_dispatches_to_the_loss_functions() -> None:
    tree = make_token_tree(vocab_size=3, horizon=4, seed=3)
    data = enumerate_paths(tree)
    theta = tree.ref_logits + torch.randn(tree.ref_logits.shape, dtype=torch.float64)
    logp, logz = token_logprobs(tabular_logits(theta, data), data.actions)
    ref_logp, ref_logz = token_logprobs(tabular_logits(tree.ref_logits, data), data.actions)
    for name, horizon in [("shiq", None), ("shiq_1step", 1), ("shiq_nstep", 3)]:
        direct = shiq_loss(logp, logz, ref_logp, ref_logz, data.rewards, data.mask, beta=0.5, horizon=horizon)
        via = token_loss(name, theta, tree, data, beta=0.5, horizon=3)
        torch.testing.assert_close(via.residuals, direct.residuals, rtol=0, atol=0)


def test_loss_gradient_matches_the_closed_form_and_reaches_only_what_a_loss_sees() -> None:
    tree = make_token_tree(vocab_size=3, horizon=4, reward="terminal", seed=0)
    data = enumerate_paths(tree)
    beta = 0.5
    theta = tree.ref_logits + 0.3 * torch.randn(tree.ref_logits.shape, dtype=torch.float64)
    grad = loss_gradient("shiq", theta, tree, data, beta=beta)
    logits = tabular_logits(theta, data)
    out = token_loss("shiq", theta, tree, data, beta=beta)
    per_token = shiq_logit_grad(logits, data.actions, out.residuals, data.mask, beta=beta) / data.mask.sum()
    on = data.mask.bool()
    closed = torch.zeros_like(theta).index_add_(0, data.states[on], per_token[on])
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-14)
    # at initialisation with a terminal reward: the full path moves every visited logit at once,
    # the one-step loss only the logits of episode-ending tokens (their reward is all it sees)
    full = loss_gradient("shiq", tree.ref_logits, tree, data, beta=beta)
    one = loss_gradient("shiq_1step", tree.ref_logits, tree, data, beta=beta)
    continuing = tree.next_state >= 0
    assert float(full[continuing].abs().min()) > 1e-6
    assert float(one[continuing].abs().max()) == 0.0
    assert float(one[~continuing].abs().min()) > 1e-6


def test_bad_arguments_name_the_problem() -> None:
    tree = make_token_tree()
    data = enumerate_paths(tree)
    with pytest.raises(ValueError, match="loss='dpo'"):
        token_loss("dpo", tree.ref_logits, tree, data, beta=1.0)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        fit_tabular(tree, data, "shiq", beta=1.0, optimizer="sgd")
    assert set(TOKEN_LOSSES) == {"shiq", "shiq_nstep", "shiq_1step", "scoring", "naive"}
