"""The exact ground truth (METHOD.md step 0) checked against brute force over enumerated paths.

The backward recursion of :func:`solve` and the occupancy-based KLs are compared with a direct
sum over every complete response of the tree: a different algorithm for the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from shiq_lab.exact.tree import (
    OfflineDataset,
    TokenTree,
    concat_datasets,
    coverage,
    enumerate_paths,
    expected_reward,
    make_token_tree,
    mean_state_kl,
    regularised_return,
    sample_dataset,
    sequence_kl,
    skewed_policy,
    solve,
    state_occupancy,
    state_values,
    uniform_log_probs,
    visited_pairs,
)

TREES = {
    "v3h3p2": dict(vocab_size=3, horizon=3, num_prompts=2, seed=0),
    "v4h3p1-terminal": dict(vocab_size=4, horizon=3, num_prompts=1, reward="terminal", seed=1),
    "v3h4p1-token": dict(vocab_size=3, horizon=4, num_prompts=1, reward="token", seed=2),
    "v3h5p2-env": dict(vocab_size=3, horizon=5, num_prompts=2, env_depths=(1, 3), seed=3),
}


@pytest.fixture(params=sorted(TREES), scope="module")
def tree(request) -> TokenTree:
    return make_token_tree(**TREES[request.param])


def path_log_probs(tree: TokenTree, log_pi: torch.Tensor, paths: OfflineDataset) -> torch.Tensor:
    """[B] log-probability of each path under a policy (environment tokens have probability 1)."""
    log_pi = tree.with_env(log_pi)
    on_path = paths.states >= 0
    per_token = log_pi[paths.states.clamp(min=0), paths.actions]
    return torch.where(on_path, per_token, 0.0).sum(1)


def random_policy(tree: TokenTree, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(2.0 * torch.randn(tree.ref_logits.shape, generator=gen, dtype=torch.float64), -1)


# --- the tree itself ---------------------------------------------------------------------------


def test_tree_structure_eos_horizon_and_offsets() -> None:
    t = make_token_tree(vocab_size=4, horizon=3, num_prompts=2, seed=5)
    assert t.eos == 3
    assert bool((t.next_state[:, t.eos] == -1).all()), "EOS must end the episode"
    last = t.depth == t.horizon - 1
    assert bool((t.next_state[last] == -1).all()), "every token at depth horizon-1 must end the episode"
    # states: per prompt 1 + 3 + 9 (non-EOS children up to depth horizon-1)
    assert t.num_states == 2 * (1 + 3 + 9)
    # children sit one level deeper, under the same prompt
    parent, action = torch.nonzero(t.next_state >= 0, as_tuple=True)
    child = t.next_state[parent, action]
    assert bool((t.depth[child] == t.depth[parent] + 1).all())
    assert bool((t.prompt[child] == t.prompt[parent]).all())
    # the reference logits carry large arbitrary per-state offsets (what the shift must absorb)
    assert float(t.ref_logits.mean(1).std()) > 10.0


def test_tree_is_reproducible_by_seed() -> None:
    a, b = make_token_tree(seed=4), make_token_tree(seed=4)
    c = make_token_tree(seed=5)
    assert torch.equal(a.ref_logits, b.ref_logits) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.ref_logits, c.ref_logits)


def test_reward_kinds() -> None:
    term = make_token_tree(vocab_size=3, horizon=4, reward="terminal", seed=0)
    assert bool((term.rewards[term.next_state >= 0] == 0).all()), "terminal reward only on episode-ending tokens"
    assert float(term.rewards[term.next_state < 0].abs().min()) > 0
    tok = make_token_tree(vocab_size=3, horizon=4, reward="token", seed=0)
    assert float(tok.rewards[tok.next_state >= 0].abs().min()) > 0


def test_env_states_pick_one_non_eos_token_and_carry_no_reward() -> None:
    t = make_token_tree(vocab_size=4, horizon=5, env_depths=(2,), seed=0)
    env = ~t.policy_states
    assert bool((t.depth[env] == 2).all()) and int(env.sum()) == 3 * 3  # 3 x 3 states at depth 2
    assert bool((t.env_action[env] >= 0).all()) and bool((t.env_action[env] < t.eos).all())
    assert bool((t.rewards[env] == 0).all())
    rows = torch.nonzero(env).flatten()
    assert bool((t.next_state[rows, t.env_action[rows]] >= 0).all())


# --- enumeration and coverage ------------------------------------------------------------------


def test_enumerate_paths_counts_and_probabilities(tree: TokenTree) -> None:
    paths = enumerate_paths(tree)
    V, H = tree.vocab_size, tree.horizon
    if bool(tree.policy_states.all()):
        # per prompt: EOS at each depth < H-1 after (V-1)^d non-EOS prefixes, then V^1 endings at depth H-1
        per_prompt = sum((V - 1) ** d for d in range(H - 1)) + V * (V - 1) ** (H - 1)
        assert len(paths) == tree.num_prompts * per_prompt
    # every path once: (prompt, actions) pairs are unique, and the last token ends the episode
    keys = {(int(p), tuple(a[:n].tolist())) for p, a, n in zip(paths.prompts, paths.actions, paths.lengths)}
    assert len(keys) == len(paths)
    last_state = paths.states[torch.arange(len(paths)), paths.lengths - 1]
    last_action = paths.actions[torch.arange(len(paths)), paths.lengths - 1]
    assert bool((tree.next_state[last_state, last_action] == -1).all())
    # under any policy the path probabilities of each prompt sum to 1
    for log_pi in (tree.ref_log_probs, random_policy(tree, 0)):
        probs = path_log_probs(tree, log_pi, paths).exp()
        per_prompt_mass = torch.zeros(tree.num_prompts, dtype=probs.dtype).index_add_(0, paths.prompts, probs)
        torch.testing.assert_close(per_prompt_mass, torch.ones_like(per_prompt_mass), rtol=0, atol=1e-12)
    assert coverage(tree, paths) == 1.0
    # rewards and the mask follow the tree
    on = paths.states >= 0
    assert torch.equal(paths.rewards[on], tree.rewards[paths.states[on], paths.actions[on]])
    assert torch.equal(paths.mask[on].bool(), tree.policy_states[paths.states[on]])
    assert bool((paths.mask[~on] == 0).all())


def test_coverage_of_a_small_sample_is_partial() -> None:
    t = make_token_tree(vocab_size=3, horizon=4, seed=0)
    few = sample_dataset(t, t.ref_log_probs, 3, seed=0)
    expected = {(int(s), int(a)) for s, a, m in zip(few.states.flatten(), few.actions.flatten(), few.mask.flatten()) if m == 1}
    seen = visited_pairs(t, few)
    assert {tuple(pair) for pair in torch.nonzero(seen).tolist()} == expected
    assert coverage(t, few) == pytest.approx(len(expected) / (int(t.policy_states.sum()) * t.vocab_size))
    assert 0 < coverage(t, few) < 1


# --- the exact solution ------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_v_star_satisfies_the_soft_bellman_recursion(tree: TokenTree, beta: float) -> None:
    sol = solve(tree, beta)
    nxt = torch.where(tree.next_state >= 0, sol.v[tree.next_state.clamp(min=0)], 0.0)
    torch.testing.assert_close(sol.q, tree.rewards + nxt, rtol=0, atol=1e-12)
    pol = tree.policy_states
    soft = beta * torch.logsumexp(tree.ref_log_probs + sol.q / beta, -1)
    torch.testing.assert_close(sol.v[pol], soft[pol], rtol=0, atol=1e-12)
    env = torch.nonzero(~pol).flatten()
    torch.testing.assert_close(sol.v[env], sol.q[env, tree.env_action[env]], rtol=0, atol=1e-12)
    # pi* = pi_ref exp((q* - v*)/beta) on policy states, deterministic on environment states
    pi = tree.ref_log_probs.exp() * torch.exp((sol.q - sol.v[:, None]) / beta)
    torch.testing.assert_close(sol.pi[pol], pi[pol], rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.pi.sum(-1), torch.ones(tree.num_states, dtype=sol.pi.dtype), rtol=0, atol=1e-12)
    assert bool((sol.pi[env].max(-1).values == 1).all())


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_optimum_matches_brute_force_over_paths(tree: TokenTree, beta: float) -> None:
    """v*(root) = beta ln E_{pi_ref}[exp(R/beta)] and pi*(path) = pi_ref(path) exp((R - v*)/beta)."""
    sol = solve(tree, beta)
    paths = enumerate_paths(tree)
    ref_lp = path_log_probs(tree, tree.ref_log_probs, paths)
    R = paths.returns
    for p in range(tree.num_prompts):
        rows = paths.prompts == p
        v_root = beta * torch.logsumexp(ref_lp[rows] + R[rows] / beta, 0)
        assert float(sol.root_values[p]) == pytest.approx(float(v_root), abs=1e-12)
    opt_lp = path_log_probs(tree, sol.log_pi, paths)
    torch.testing.assert_close(opt_lp, ref_lp + (R - sol.root_values[paths.prompts]) / beta, rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_regularised_return_is_maximised_by_pi_star(tree: TokenTree, beta: float) -> None:
    sol = solve(tree, beta)
    assert regularised_return(tree, sol.log_pi, beta) == pytest.approx(sol.optimal_return, abs=1e-12)
    torch.testing.assert_close(state_values(tree, sol.log_pi, beta), sol.v, rtol=0, atol=1e-12)
    others = [tree.ref_log_probs, uniform_log_probs(tree), skewed_policy(tree), random_policy(tree, 1)]
    for log_pi in others:
        j = regularised_return(tree, log_pi, beta)
        assert j < sol.optimal_return
        # the exact gap: J(pi*) - J(pi) = beta * KL(pi || pi*) over whole responses
        assert sol.optimal_return - j == pytest.approx(beta * sequence_kl(tree, log_pi, sol.log_pi), abs=1e-10)
        # and J is the expected reward minus beta * KL(pi || pi_ref)
        kl_ref = sequence_kl(tree, log_pi, tree.ref_log_probs)
        assert j == pytest.approx(expected_reward(tree, log_pi) - beta * kl_ref, abs=1e-10)


def test_kl_of_pi_star_to_itself_is_zero(tree: TokenTree) -> None:
    sol = solve(tree, 0.7)
    assert sequence_kl(tree, sol.log_pi, sol.log_pi) == 0.0
    assert mean_state_kl(tree, sol.log_pi, sol.log_pi) == 0.0
    assert sequence_kl(tree, sol.log_pi, tree.ref_log_probs) > 0.0


def test_sequence_kl_and_occupancy_match_brute_force(tree: TokenTree) -> None:
    paths = enumerate_paths(tree)
    log_p, log_q = random_policy(tree, 2), skewed_policy(tree)
    lp, lq = path_log_probs(tree, log_p, paths), path_log_probs(tree, log_q, paths)
    brute_kl = float((lp.exp() * (lp - lq)).sum()) / tree.num_prompts
    assert sequence_kl(tree, log_p, log_q) == pytest.approx(brute_kl, abs=1e-12)
    # occupancy(s) = P(a path visits s), prompt uniform
    occ = torch.zeros(tree.num_states, dtype=torch.float64)
    for b in range(len(paths)):
        visited = paths.states[b, : int(paths.lengths[b])]
        occ[visited] += float(lp[b].exp()) / tree.num_prompts
    torch.testing.assert_close(state_occupancy(tree, log_p), occ, rtol=0, atol=1e-12)


def test_exact_solution_in_closed_form_for_a_one_token_tree() -> None:
    t = make_token_tree(vocab_size=4, horizon=1, num_prompts=1, seed=3)
    beta = 0.5
    sol = solve(t, beta)
    ref = torch.softmax(t.ref_logits[0], -1)
    r = t.rewards[0]
    expected_v = beta * math.log(float((ref * torch.exp(r / beta)).sum()))
    assert sol.optimal_return == pytest.approx(expected_v, abs=1e-12)
    torch.testing.assert_close(sol.pi[0], torch.softmax(torch.log(ref) + r / beta, -1), rtol=0, atol=1e-12)


# --- sampling ----------------------------------------------------------------------------------


def test_sample_dataset_follows_the_tree_and_is_seeded() -> None:
    t = make_token_tree(vocab_size=3, horizon=5, num_prompts=2, env_depths=(2,), seed=1)
    data = sample_dataset(t, skewed_policy(t), 200, seed=3)
    again = sample_dataset(t, skewed_policy(t), 200, seed=3)
    assert torch.equal(data.actions, again.actions) and torch.equal(data.states, again.states)
    on = data.states >= 0
    assert torch.equal(on.sum(1), data.lengths)
    assert torch.equal(data.rewards[on], t.rewards[data.states[on], data.actions[on]])
    # environment tokens follow the environment and get mask 0
    env = on & ~t.policy_states[data.states.clamp(min=0)]
    assert bool(env.any()) and bool((data.mask[env] == 0).all())
    assert torch.equal(data.actions[env], t.env_action[data.states[env]])
    # each path starts at its prompt's root and follows next_state
    assert torch.equal(data.states[:, 0], t.roots[data.prompts])
    inner = on[:, 1:]
    assert torch.equal(data.states[:, 1:][inner], t.next_state[data.states[:, :-1][inner], data.actions[:, :-1][inner]])


def test_sample_dataset_frequencies_match_the_behaviour_policy() -> None:
    t = make_token_tree(vocab_size=3, horizon=3, num_prompts=1, seed=0)
    behaviour = skewed_policy(t, strength=1.0)
    n = 20000
    data = sample_dataset(t, behaviour, n, seed=0)
    paths = enumerate_paths(t)
    expected = path_log_probs(t, behaviour, paths).exp()
    index = {tuple(a[:k].tolist()): i for i, (a, k) in enumerate(zip(paths.actions, paths.lengths))}
    counts = torch.zeros(len(paths), dtype=torch.float64)
    for a, k in zip(data.actions, data.lengths):
        counts[index[tuple(a[:k].tolist())]] += 1
    sd = torch.sqrt(expected * (1 - expected) / n)
    assert bool(((counts / n - expected).abs() <= 5 * sd + 1e-12).all())


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=1), "vocab_size=1"),
        (dict(horizon=0), "horizon=0"),
        (dict(reward="dense"), "reward='dense'"),
        (dict(horizon=3, env_depths=(2,)), "env_depths"),
        (dict(horizon=4, env_depths=(0,)), "env_depths"),
    ],
)
def test_make_token_tree_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_token_tree(**kwargs)


def test_solve_and_sample_reject_bad_arguments() -> None:
    t = make_token_tree()
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            solve(t, beta)
    with pytest.raises(ValueError, match="num_paths=0"):
        sample_dataset(t, t.ref_log_probs, 0)


def test_concat_datasets_stacks_rows_and_checks_widths() -> None:
    t = make_token_tree(vocab_size=3, horizon=4, seed=0)
    a, b = sample_dataset(t, t.ref_log_probs, 5, seed=0), enumerate_paths(t)
    both = concat_datasets(a, b)
    assert len(both) == len(a) + len(b)
    assert torch.equal(both.actions[5:], b.actions) and torch.equal(both.mask[:5], a.mask)
    assert coverage(t, both) == 1.0
    with pytest.raises(ValueError, match="different widths"):
        concat_datasets(a, enumerate_paths(make_token_tree(vocab_size=3, horizon=3)))
    with pytest.raises(ValueError, match="at least one"):
        concat_datasets()
