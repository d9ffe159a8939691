"""The loss family (METHOD.md steps 1-4, tensor form, baselines) against exact values.

Exact identities on token trees (calibrated initialisation, the fixed point on every path),
an independent per-sequence loop, finite differences, the closed-form gradient, hand-computed
values for the baselines, and the errors bad inputs raise.
"""

from __future__ import annotations

import math

import pytest
import torch

from shiq_lab.exact.tree import (
    OfflineDataset,
    TokenTree,
    enumerate_paths,
    make_token_tree,
    sample_dataset,
    skewed_policy,
    solve,
    tabular_logits,
    uniform_log_probs,
)
from shiq_lab.losses import (
    LossOutput,
    copg_loss,
    dpo_loss,
    dro_loss,
    naive_q_loss,
    scoring_loss,
    sequence_logratio,
    shiq_logit_grad,
    shiq_loss,
    token_logprobs,
)

SHIFTED = {"shiq": None, "shiq_2step": 2, "shiq_1step": 1}


def shiq_on_tree(theta: torch.Tensor, tree: TokenTree, data: OfflineDataset, beta: float, horizon: int | None):
    logp, logz = token_logprobs(tabular_logits(theta, data), data.actions)
    ref_logp, ref_logz = token_logprobs(tabular_logits(tree.ref_logits, data), data.actions)
    return shiq_loss(logp, logz, ref_logp, ref_logz, data.rewards, data.mask, beta=beta, horizon=horizon)


def scoring_on_tree(theta: torch.Tensor, tree: TokenTree, data: OfflineDataset, beta: float):
    logp, logz = token_logprobs(tabular_logits(theta, data), data.actions)
    ref_logp, _ = token_logprobs(tabular_logits(tree.ref_logits, data), data.actions)
    return scoring_loss(logp, logz, ref_logp, data.rewards, data.mask, beta=beta)


def naive_on_tree(theta: torch.Tensor, tree: TokenTree, data: OfflineDataset, beta: float):
    logits, ref_logits = tabular_logits(theta, data), tabular_logits(tree.ref_logits, data)
    return naive_q_loss(logits, ref_logits, data.actions, data.rewards, data.mask, beta=beta)


def zero_reward(tree: TokenTree) -> TokenTree:
    tree.rewards = torch.zeros_like(tree.rewards)
    return tree


def datasets(tree: TokenTree) -> dict[str, OfflineDataset]:
    """Every path once, and paths sampled by pi_ref, the uniform policy and a skewed policy."""
    return {
        "all_paths": enumerate_paths(tree),
        "pi_ref": sample_dataset(tree, tree.ref_log_probs, 64, seed=1),
        "uniform": sample_dataset(tree, uniform_log_probs(tree), 64, seed=2),
        "skewed": sample_dataset(tree, skewed_policy(tree, strength=4.0), 64, seed=3),
    }


TREES = {
    "plain": dict(vocab_size=3, horizon=4, num_prompts=2, seed=0),
    "wide": dict(vocab_size=5, horizon=3, num_prompts=1, seed=1, logit_offset_scale=1000.0),
    "env": dict(vocab_size=3, horizon=5, num_prompts=2, env_depths=(1, 3), seed=2),
}


# --- step 3: calibrated initialisation ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TREES))
def test_shifted_residual_is_exactly_zero_at_initialisation_and_naive_is_not(name: str) -> None:
    tree = zero_reward(make_token_tree(**TREES[name]))
    beta = 0.7
    v_ref = torch.logsumexp(tree.ref_logits, -1)
    for data in datasets(tree).values():
        for horizon in SHIFTED.values():
            out = shiq_on_tree(tree.ref_logits, tree, data, beta, horizon)
            assert float(out.residuals.abs().max()) <= 1e-12
            assert float(out.loss) <= 1e-24
        naive = naive_on_tree(tree.ref_logits, tree, data, beta)
        assert float(naive.residuals.abs().max()) > 1.0
        # step 2: the unshifted scoring residual is beta * (V_ref(s_t) - V_ref(s_t+1)), V_ref(end) = 0
        scoring = scoring_on_tree(tree.ref_logits, tree, data, beta)
        assert float(scoring.residuals.abs().max()) > 1.0
        expected = torch.zeros_like(data.rewards)
        for b in range(len(data)):
            pos = torch.nonzero(data.mask[b]).flatten().tolist()
            for i, t in enumerate(pos):
                after = float(v_ref[data.states[b, pos[i + 1]]]) if i + 1 < len(pos) else 0.0
                expected[b, t] = beta * (float(v_ref[data.states[b, t]]) - after)
        torch.testing.assert_close(scoring.residuals, expected, rtol=1e-12, atol=1e-9)


def test_shifted_residuals_ignore_per_state_logit_offsets() -> None:
    """Adding c(s) to both policy and reference logits changes nothing in the shifted losses."""
    tree = make_token_tree(vocab_size=3, horizon=4, num_prompts=2, seed=3)
    data = enumerate_paths(tree)
    gen = torch.Generator().manual_seed(0)
    theta = tree.ref_logits + torch.randn(tree.ref_logits.shape, generator=gen, dtype=torch.float64)
    offsets = 300.0 * torch.randn(tree.num_states, 1, generator=gen, dtype=torch.float64)
    moved = make_token_tree(vocab_size=3, horizon=4, num_prompts=2, seed=3)
    moved.ref_logits = tree.ref_logits + offsets
    for horizon in SHIFTED.values():
        a = shiq_on_tree(theta, tree, data, 0.5, horizon).residuals
        b = shiq_on_tree(theta + offsets, moved, data, 0.5, horizon).residuals
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    a = scoring_on_tree(theta, tree, data, 0.5).residuals
    b = scoring_on_tree(theta + offsets, moved, data, 0.5).residuals
    assert float((a - b).abs().max()) > 1.0, "the unshifted scoring loss does depend on the offsets"


# --- the fixed point, on every path, whichever policy sampled it -------------------------------


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("beta", [0.25, 2.0])
def test_all_residuals_vanish_at_the_fixed_point(name: str, beta: float) -> None:
    tree = make_token_tree(**TREES[name])
    sol = solve(tree, beta)
    pol = tree.policy_states
    theta_star = tree.ref_logits + sol.q / beta  # ShiQ logits at the optimum
    torch.testing.assert_close(torch.softmax(theta_star, -1)[pol], sol.pi[pol], rtol=0, atol=1e-12)
    g_star = tree.ref_log_probs + sol.q / beta  # unshifted scoring function at the optimum
    for data_name, data in datasets(tree).items():
        for horizon in SHIFTED.values():
            out = shiq_on_tree(theta_star, tree, data, beta, horizon)
            assert float(out.residuals.abs().max()) < 1e-9, (data_name, horizon)
        assert float(scoring_on_tree(g_star, tree, data, beta).residuals.abs().max()) < 1e-9
        assert float(naive_on_tree(sol.q, tree, data, beta).residuals.abs().max()) < 1e-9
        # the implied value beta * dV(s) read off the logits is v*(s) on every response token
        out = shiq_on_tree(theta_star, tree, data, beta, None)
        first = data.states[:, 0]
        assert out.metrics["value_first_mean"] == pytest.approx(float(sol.v[first].mean()), abs=1e-9)


def test_environment_tokens_must_be_masked_for_the_optimum_to_be_a_fixed_point() -> None:
    tree = make_token_tree(vocab_size=3, horizon=5, num_prompts=1, env_depths=(2,), seed=4)
    beta = 0.5
    theta_star = tree.ref_logits + solve(tree, beta).q / beta
    data = enumerate_paths(tree)
    assert float(shiq_on_tree(theta_star, tree, data, beta, None).residuals.abs().max()) < 1e-9
    unmasked = data.subset(slice(None))
    unmasked.mask = (data.states >= 0).to(data.mask.dtype)  # environment tokens wrongly treated as policy tokens
    assert float(shiq_on_tree(theta_star, tree, unmasked, beta, None).residuals.abs().max()) > 1e-3


# --- the batched tensor form against a plain per-sequence loop ---------------------------------


def loop_residuals(logp, logz, ref_logp, ref_logz, rewards, mask, beta: float, horizon: int | None) -> torch.Tensor:
    """delta_t from METHOD.md written as a loop over each sequence's policy tokens."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        pos = [t for t in range(mask.shape[1]) if mask[b, t] == 1]
        for i, t in enumerate(pos):
            stop = len(pos) if horizon is None else min(len(pos), i + horizon)
            total = beta * float(logz[b, t] - ref_logz[b, t])
            for u in pos[i:stop]:
                total += beta * float(logp[b, u] - ref_logp[b, u]) - float(rewards[b, u])
            if stop < len(pos):
                u = pos[stop]
                total -= beta * float(logz[b, u] - ref_logz[b, u])
            out[b, t] = total
    return out


def garbage_batch(seed: int = 0):
    """A [5, 8] batch with prompt tokens, environment tokens and padding, all filled with garbage."""
    gen = torch.Generator().manual_seed(seed)
    B, T, V = 5, 8, 6
    logits = 3.0 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ref_logits = logits + torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    actions = torch.randint(V, (B, T), generator=gen)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1, 1],  # prompt, then a response to the end (no padding)
            [0, 1, 1, 0, 0, 1, 1, 0],  # environment tokens in the middle, padding
            [1, 0, 1, 0, 1, 0, 1, 0],  # alternating turns
            [0, 0, 0, 1, 0, 0, 0, 0],  # a single response token
            [1, 1, 1, 1, 1, 0, 0, 0],  # response then padding
        ],
        dtype=torch.float64,
    )
    return logits, ref_logits, actions, rewards, mask


def fill_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=x.dtype)
    filler = junk[torch.arange(x.numel()) % 4].reshape(x.shape)
    return torch.where(mask.bool(), x, filler)


@pytest.mark.parametrize("horizon", [None, 1, 2, 3])
def test_batched_masked_padded_loss_equals_a_per_sequence_loop(horizon: int | None) -> None:
    logits, ref_logits, actions, rewards, mask = garbage_batch()
    logp, logz = token_logprobs(logits, actions)
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    beta = 0.3
    expected = loop_residuals(logp, logz, ref_logp, ref_logz, rewards, mask, beta, horizon)
    inputs = [fill_garbage(x, mask) for x in (logp, logz, ref_logp, ref_logz, rewards)]
    inputs[0] = inputs[0].detach().requires_grad_(True)
    out = shiq_loss(*inputs, mask, beta=beta, horizon=horizon)
    torch.testing.assert_close(out.residuals, expected, rtol=0, atol=1e-12)
    assert float(out.loss.detach()) == pytest.approx(float((expected**2).sum() / mask.sum()), rel=1e-12)
    seq = shiq_loss(*inputs, mask, beta=beta, horizon=horizon, reduction="sequence")
    per_seq = (expected**2).sum(1) / mask.sum(1)
    assert float(seq.loss.detach()) == pytest.approx(float(per_seq.mean()), rel=1e-12)
    # garbage never reaches a gradient either
    out.loss.backward()
    grad = inputs[0].grad
    assert bool(torch.isfinite(grad).all()) and bool((grad[mask == 0] == 0).all())
    # each row alone, cut to its own length, gives the same residuals
    for b in range(mask.shape[0]):
        end = int(torch.nonzero(mask[b]).max()) + 1
        row = shiq_loss(*(x[b : b + 1, :end].detach() for x in inputs), mask[b : b + 1, :end], beta=beta, horizon=horizon)
        torch.testing.assert_close(row.residuals[0], out.residuals[b, :end].detach(), rtol=0, atol=1e-12)


def test_n_step_equals_full_path_when_n_covers_the_response() -> None:
    logits, ref_logits, actions, rewards, mask = garbage_batch(1)
    logp, logz = token_logprobs(logits, actions)
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    full = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=0.5)
    longest = int(mask.sum(1).max())
    for n in (longest, longest + 1, 100):
        nstep = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=0.5, horizon=n)
        assert torch.equal(nstep.residuals, full.residuals)
    shorter = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=0.5, horizon=longest - 1)
    assert float((shorter.residuals - full.residuals).abs().max()) > 1e-3


def test_hand_computed_shifted_losses() -> None:
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    logz = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    ref_logz = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    # beta*lr - r = [0.25, -1.5]; beta*dV = [0.5, 1.0]
    full = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=0.5)
    torch.testing.assert_close(full.residuals, torch.tensor([[-0.75, -0.5]], dtype=torch.float64))
    assert float(full.loss) == pytest.approx((0.75**2 + 0.5**2) / 2)
    one = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=0.5, horizon=1)
    torch.testing.assert_close(one.residuals, torch.tensor([[-0.25, -0.5]], dtype=torch.float64))
    assert float(one.loss) == pytest.approx((0.25**2 + 0.5**2) / 2)
    # scoring: beta*(logp + logz - ref_logp - logz_next) - r
    score = scoring_loss(logp, logz, ref_logp, rewards, mask, beta=0.5)
    torch.testing.assert_close(score.residuals, torch.tensor([[-0.25, 0.5]], dtype=torch.float64))


def test_naive_q_loss_hand_computed() -> None:
    # two tokens, vocabulary 2; q = logits, v(s) = beta * ln sum pi_ref exp(q / beta)
    logits = torch.tensor([[[1.0, 0.0], [2.0, 4.0]]], dtype=torch.float64)
    ref_logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]], dtype=torch.float64)
    actions = torch.tensor([[1, 0]])
    rewards = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    beta = 1.0
    v2 = math.log(0.25 * math.exp(2.0) + 0.75 * math.exp(4.0))
    out = naive_q_loss(logits, ref_logits, actions, rewards, mask, beta=beta)
    expected = torch.tensor([[0.0 - 0.5 - v2, 2.0 - 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out.residuals, expected)


# --- gradients ---------------------------------------------------------------------------------


def test_autograd_gradient_matches_finite_differences_and_the_closed_form() -> None:
    logits, ref_logits, actions, rewards, mask = garbage_batch(2)
    logits = logits[:, :, :4].contiguous()
    ref_logits, actions = ref_logits[:, :, :4], actions % 4
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    beta = 0.4

    def loss_of(horizon):
        def f(x: torch.Tensor) -> torch.Tensor:
            logp, logz = token_logprobs(x, actions)
            return shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=beta, horizon=horizon).loss

        return f

    x = logits.clone().requires_grad_(True)
    for horizon in (None, 2):
        assert torch.autograd.gradcheck(loss_of(horizon), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    out = shiq_loss(*token_logprobs(x, actions), ref_logp, ref_logz, rewards, mask, beta=beta)
    (grad,) = torch.autograd.grad(out.loss, x)
    closed = shiq_logit_grad(logits, actions, out.residuals.detach(), mask, beta=beta) / mask.sum()
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)
    assert float(grad.abs().max()) > 1e-3


def test_detached_bootstrap_keeps_the_value_and_drops_its_gradient() -> None:
    logits, ref_logits, actions, rewards, mask = garbage_batch(3)
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    logp, logz = token_logprobs(logits, actions)
    logz = logz.clone().requires_grad_(True)
    beta = 0.5
    plain = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=beta, horizon=1)
    detached = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=beta, horizon=1, detach_bootstrap=True)
    assert float(plain.loss.detach()) == float(detached.loss.detach())
    (g_plain,) = torch.autograd.grad(plain.loss, logz)
    (g_detached,) = torch.autograd.grad(detached.loss, logz)
    n = mask.sum()
    delta = plain.residuals.detach()
    # detached: logz_t only enters its own residual as +beta*dV(s_t)
    torch.testing.assert_close(g_detached, 2 * beta * delta / n)
    # not detached: it also enters the previous policy token's residual as -beta*dV(s_t)
    prev = torch.zeros_like(delta)
    for b in range(mask.shape[0]):
        pos = torch.nonzero(mask[b]).flatten().tolist()
        for i in range(1, len(pos)):
            prev[b, pos[i]] = delta[b, pos[i - 1]]
    torch.testing.assert_close(g_plain, 2 * beta * (delta - prev) / n)


# --- step 4 vs DRO -----------------------------------------------------------------------------


def test_first_residual_is_the_dro_residual_with_the_value_read_off_the_logits() -> None:
    gen = torch.Generator().manual_seed(7)
    B, T, V = 4, 6, 5
    logits = 2.0 * torch.randn(B, T, V, generator=gen, dtype=torch.float64) + 20.0
    ref_logits = 2.0 * torch.randn(B, T, V, generator=gen, dtype=torch.float64) - 5.0
    actions = torch.randint(V, (B, T), generator=gen)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 4])
    start = torch.tensor([0, 2, 1, 1])  # prompt tokens before the (single-turn) response
    pos = torch.arange(T)
    mask = ((pos >= start[:, None]) & (pos < (start + lengths).clamp(max=T)[:, None])).to(torch.float64)
    logp, logz = token_logprobs(logits, actions)
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    beta = 0.8
    shiq = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=beta)
    rows = torch.arange(B)
    values = beta * (logz - ref_logz)[rows, start]  # V_phi(x) = beta * dV(s_1)
    dro = dro_loss(logp, ref_logp, rewards, mask, values, beta=beta)
    delta1 = shiq.residuals[rows, start]
    dro_resid = dro.residuals.sum(1)  # DRO puts its residual on the last response token
    torch.testing.assert_close(delta1, -dro_resid, rtol=0, atol=1e-12)
    assert float(dro.loss) == pytest.approx(0.5 * float((delta1**2).mean()), rel=1e-12)


# --- precision ---------------------------------------------------------------------------------


def test_bf16_logits_give_fp32_results_close_to_the_fp32_path() -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 50
    logits = 3.0 * torch.randn(B, T, V, generator=gen) + 10.0
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=gen)
    actions = torch.randint(V, (B, T), generator=gen)
    rewards = torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T)
    bf16 = logits.to(torch.bfloat16)
    logp16, logz16 = token_logprobs(bf16, actions)
    assert logp16.dtype == torch.float32 and logz16.dtype == torch.float32
    # computed in fp32 from the bf16 values, not in bf16
    up_logp, up_logz = token_logprobs(bf16.float(), actions)
    assert torch.equal(logp16, up_logp) and torch.equal(logz16, up_logz)
    # and within the bf16 rounding of the logits of the fp32 path: |d logz| <= eps, |d logp| <= 2 eps
    eps = float((bf16.float() - logits).abs().max())
    logp32, logz32 = token_logprobs(logits, actions)
    assert float((logz16 - logz32).abs().max()) <= eps + 1e-5
    assert float((logp16 - logp32).abs().max()) <= 2 * eps + 1e-5
    ref_logp, ref_logz = token_logprobs(ref_logits, actions)
    beta = 0.5
    out16 = shiq_loss(logp16, logz16, ref_logp, ref_logz, rewards, mask, beta=beta)
    out32 = shiq_loss(logp32, logz32, ref_logp, ref_logz, rewards, mask, beta=beta)
    assert out16.loss.dtype == torch.float32 and out16.residuals.dtype == torch.float32
    bound = beta * eps * (1 + 2 * T) + 1e-5  # one dV and up to T log-ratios per residual
    assert float((out16.residuals - out32.residuals).abs().max()) <= bound
    # bf16 logp/logz given directly are upcast too
    direct = shiq_loss(logp32.bfloat16(), logz32.bfloat16(), ref_logp, ref_logz, rewards, mask, beta=beta)
    assert direct.loss.dtype == torch.float32
    # the gradient reaches the bf16 logits
    x = bf16.clone().requires_grad_(True)
    loss = shiq_loss(*token_logprobs(x, actions), ref_logp, ref_logz, rewards, mask, beta=beta).loss
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and float(x.grad.float().abs().max()) > 0


# --- baselines, hand-computed --------------------------------------------------------------------


def baseline_batch():
    # 4 rows, 3 tokens; log-ratios per row: [1.0, -0.5, 0.25, 0.0] (padding holds garbage)
    ref_logp = torch.full((4, 3), -1.0, dtype=torch.float64)
    logp = ref_logp + torch.tensor(
        [[0.5, 0.5, 0.0], [-0.5, 9.0, 9.0], [0.25, 0.0, 9.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 2.0], [1.0, 5.0, 5.0], [0.5, 0.5, 5.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    return logp, ref_logp, mask, rewards  # returns R = [2.0, 1.0, 1.0, -1.0]


def test_sequence_logratio_hand_computed() -> None:
    logp, ref_logp, mask, _ = baseline_batch()
    torch.testing.assert_close(sequence_logratio(logp, ref_logp, mask), torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64))


def test_dpo_loss_hand_computed() -> None:
    logp, ref_logp, mask, _ = baseline_batch()
    out = dpo_loss(logp, ref_logp, mask, beta=0.5, chosen=torch.tensor([0, 3]), rejected=torch.tensor([1, 2]))
    # margins: 0.5*(1.0 - -0.5) = 0.75 and 0.5*(0.0 - 0.25) = -0.125
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.125))) / 2
    assert float(out.loss) == pytest.approx(expected, rel=1e-12)
    assert out.metrics["accuracy"] == 0.5
    assert out.metrics["margin_mean"] == pytest.approx((0.75 - 0.125) / 2)
    # implied reward beta*logratio sits on each row's last response token
    assert float(out.residuals[0, 2]) == pytest.approx(0.5) and float(out.residuals[1, 0]) == pytest.approx(-0.25)
    assert float(out.residuals[0, :2].abs().sum()) == 0.0


def test_dro_loss_hand_computed_and_value_gradient() -> None:
    logp, ref_logp, mask, rewards = baseline_batch()
    values = torch.tensor([0.5, 0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    out = dro_loss(logp, ref_logp, rewards, mask, values, beta=2.0)
    # resid = R - V - beta*lr = [2-0.5-2, 1-0+1, 1-1-0.5, -1+2-0] = [-0.5, 2, -0.5, 1]
    resid = [-0.5, 2.0, -0.5, 1.0]
    assert float(out.loss.detach()) == pytest.approx(0.5 * sum(r * r for r in resid) / 4, rel=1e-12)
    torch.testing.assert_close(out.residuals.sum(1), torch.tensor(resid, dtype=torch.float64))
    (g,) = torch.autograd.grad(out.loss, values)
    torch.testing.assert_close(g, -torch.tensor(resid, dtype=torch.float64) / 4)


def test_copg_loss_hand_computed() -> None:
    logp, ref_logp, mask, rewards = baseline_batch()
    out = copg_loss(logp, ref_logp, rewards, mask, beta=2.0, pairs=torch.tensor([[0, 1], [2, 3], [1, 1]]))
    # own = R - beta*lr = [0.0, 2.0, 0.5, -1.0]; pair differences -2.0, 1.5, 0.0
    assert float(out.loss) == pytest.approx((4.0 + 2.25 + 0.0) / 3, rel=1e-12)
    torch.testing.assert_close(out.residuals.sum(1), torch.tensor([0.0, 2.0, 0.5, -1.0], dtype=torch.float64))


# --- bad inputs --------------------------------------------------------------------------------


def shiq_args(B: int = 2, T: int = 3) -> dict:
    t = torch.zeros(B, T)
    return dict(logp=t, logz=t, ref_logp=t, ref_logz=t, rewards=t.clone(), mask=torch.ones(B, T))


def call_shiq(args: dict, **kw):
    return shiq_loss(args["logp"], args["logz"], args["ref_logp"], args["ref_logz"], args["rewards"], args["mask"], **kw)


def test_token_logprobs_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="actions shape"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.long"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3))


def test_shiq_loss_rejects_bad_inputs() -> None:
    args = shiq_args()
    args["ref_logz"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"ref_logz has shape \(2, 4\)"):
        call_shiq(args, beta=1.0)
    args = shiq_args()
    args["rewards"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rewards\[1, 2\] is nan on a response token"):
        call_shiq(args, beta=1.0)
    args["mask"][1, 2] = 0.0  # the same NaN on a padding position is fine
    assert float(call_shiq(args, beta=1.0).loss) == 0.0
    args = shiq_args()
    args["mask"][1] = 0.0
    with pytest.raises(ValueError, match=r"mask rows \[1\] have no response token"):
        call_shiq(args, beta=1.0)
    args = shiq_args()
    args["mask"][0, 0] = 0.5
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        call_shiq(args, beta=1.0)
    args = shiq_args()
    args["mask"] = torch.ones(2, 3, 1)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        call_shiq(args, beta=1.0)
    for beta in (0.0, -0.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="beta"):
            call_shiq(shiq_args(), beta=beta)
    for horizon in (0, -1, 1.5):
        with pytest.raises(ValueError, match="horizon"):
            call_shiq(shiq_args(), beta=1.0, horizon=horizon)
    with pytest.raises(ValueError, match="reduction"):
        call_shiq(shiq_args(), beta=1.0, reduction="sum")


def test_ablation_and_baseline_losses_reject_bad_inputs() -> None:
    a = shiq_args(4, 3)
    logits = torch.zeros(4, 3, 5)
    actions = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="ref_logits shape"):
        naive_q_loss(logits, torch.zeros(4, 3, 6), actions, a["rewards"], a["mask"], beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        scoring_loss(a["logp"], a["logz"], a["ref_logp"], a["rewards"], a["mask"], beta=0)
    with pytest.raises(ValueError, match=r"values must be \[B\]"):
        dro_loss(a["logp"], a["ref_logp"], a["rewards"], a["mask"], torch.zeros(4, 1), beta=1.0)
    dpo_bad = [
        (dict(chosen=torch.tensor([0, 1]), rejected=torch.tensor([2])), "same length"),
        (dict(chosen=torch.tensor([0]), rejected=torch.tensor([4])), r"row indices in \[0, 4\)"),
        (dict(chosen=torch.tensor([-1]), rejected=torch.tensor([1])), r"row indices in \[0, 4\)"),
        (dict(chosen=torch.tensor([], dtype=torch.long), rejected=torch.tensor([], dtype=torch.long)), "at least one pair"),
        (dict(chosen=torch.tensor([0.0]), rejected=torch.tensor([1.0])), "long row indices"),
    ]
    for kw, message in dpo_bad:
        with pytest.raises(ValueError, match=message):
            dpo_loss(a["logp"], a["ref_logp"], a["mask"], beta=1.0, **kw)
    copg_bad = [
        (torch.tensor([[0, 1, 2]]), r"pairs must be \[P, 2\]"),
        (torch.tensor([0, 1]), r"pairs must be \[P, 2\]"),
        (torch.tensor([[0, 9]]), r"row indices in \[0, 4\)"),
        (torch.zeros(0, 2, dtype=torch.long), "at least one pair"),
    ]
    for pairs, message in copg_bad:
        with pytest.raises(ValueError, match=message):
            copg_loss(a["logp"], a["ref_logp"], a["rewards"], a["mask"], beta=1.0, pairs=pairs)


# ---------------------------------------------------------------------------------------------
# the registry, declared metric reductions, pairing, soft-label DPO, trusted inputs
# ---------------------------------------------------------------------------------------------


def _seq_batch():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]])
    logp = torch.tensor([[-1.0, -0.5, 9.0], [-0.2, -0.3, -0.4], [9.0, -1.5, -0.1], [-2.0, 9.0, 9.0]], dtype=torch.float64)
    ref_logp = torch.full_like(logp, -0.5)
    rewards = torch.zeros_like(logp)
    rewards[0, 1], rewards[1, 2], rewards[2, 2], rewards[3, 0] = 1.0, -1.0, 0.5, 2.0
    return logp, ref_logp, rewards, mask


def test_registry_knows_levels_and_pairing() -> None:
    from shiq_lab.losses import LOSS_TYPES, LOSSES, is_pairwise

    assert LOSS_TYPES == ("shiq", "dpo", "dro", "copg")  # what ShiQConfig.loss_type accepts, in this order
    assert [n for n in LOSSES if is_pairwise(n)] == ["dpo", "dpo_bt", "copg"]
    assert [n for n, s in LOSSES.items() if s.level == "sequence"] == ["dpo", "dpo_bt", "dro", "copg"]
    assert LOSSES["copg"].pairing == "all" and LOSSES["dpo"].pairing == "preference" and LOSSES["dpo_bt"].pairing == "cycle"
    with pytest.raises(ValueError, match="choose one of"):
        is_pairwise("ppo")


def test_every_loss_declares_the_unit_of_each_metric() -> None:
    logp, ref_logp, rewards, mask = _seq_batch()
    pairs = torch.tensor([[0, 1], [2, 3]])
    outs = {
        "shiq": shiq_loss(logp, logp, ref_logp, ref_logp, rewards, mask, beta=0.5),
        "shiq_seq": shiq_loss(logp, logp, ref_logp, ref_logp, rewards, mask, beta=0.5, reduction="sequence"),
        "dpo": dpo_loss(logp, ref_logp, mask, beta=0.5, chosen=pairs[:, 0], rejected=pairs[:, 1]),
        "dro": dro_loss(logp, ref_logp, rewards, mask, torch.zeros(4, dtype=torch.float64), beta=0.5),
        "copg": copg_loss(logp, ref_logp, rewards, mask, beta=0.5, pairs=pairs),
    }
    for name, out in outs.items():
        assert set(out.metric_reduction) == set(out.metrics), name
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    assert outs["shiq"].metric_reduction["residual_abs_mean"] == "token"
    assert outs["shiq"].metric_reduction["loss"] == "token" and outs["shiq_seq"].metric_reduction["loss"] == "sequence"
    assert outs["shiq"].metric_reduction["first_residual_abs_mean"] == "sequence"
    assert outs["dpo"].metric_reduction == {"loss": "pair", "margin_mean": "pair", "accuracy": "pair",
                                            "logratio_seq_mean": "sequence"}
    assert outs["copg"].metric_reduction["pair_residual_abs_mean"] == "pair"
    assert set(outs["dro"].metric_reduction.values()) == {"sequence"}
    floats = outs["dpo"].floats()
    assert floats["loss"] == pytest.approx(float(outs["dpo"].loss)) and isinstance(floats["accuracy"], float)
    with pytest.raises(ValueError, match="metric_reduction"):
        LossOutput(torch.zeros(()), torch.zeros(1, 1), {"x": torch.zeros(())})


def test_soft_dpo_loss_hand_computed_with_real_residuals() -> None:
    from shiq_lab.losses import soft_dpo_loss

    logp, ref_logp, _, mask = _seq_batch()
    beta = 0.5
    returns = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [3, 2]])
    out = soft_dpo_loss(logp, ref_logp, mask, returns, pairs, beta=beta)
    lr = [-1.0 + 0.5 - 0.5 + 0.5, -0.2 - 0.3 - 0.4 + 1.5, -1.5 - 0.1 + 1.0, -2.0 + 0.5]  # sum of logp - ref_logp
    want = 0.0
    for (i, j) in [(0, 1), (3, 2)]:
        m = beta * (lr[i] - lr[j])
        p = 1 / (1 + math.exp(-(float(returns[i]) - float(returns[j]))))
        want += -(p * math.log(1 / (1 + math.exp(-m))) + (1 - p) * math.log(1 / (1 + math.exp(m))))
    assert out.loss.item() == pytest.approx(want / 2, rel=1e-12)
    # each sequence's implied reward beta*logratio on its last response token (DPO's convention), 0 elsewhere
    last = [1, 2, 2, 0]
    for b in range(4):
        assert out.residuals[b, last[b]].item() == pytest.approx(beta * lr[b], rel=1e-12)
        assert out.residuals[b].count_nonzero().item() == 1
    at_ref = soft_dpo_loss(ref_logp, ref_logp, mask, returns, pairs, beta=beta)
    assert at_ref.residuals.abs().max().item() == 0.0  # calibrated at theta = ref


def test_response_pairs_rules() -> None:
    from shiq_lab.losses import response_pairs

    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    returns = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, 5.0])
    assert response_pairs(groups, rule="all").tolist() == [[0, 1], [2, 3], [2, 4], [3, 4]]
    assert response_pairs(groups, rule="preference", returns=returns).tolist() == [[1, 0], [4, 2], [4, 3]]
    cycle = response_pairs(groups, rule="cycle", seed=0)
    assert len(cycle) == 1 + 3  # 2 rows: one pair; 3 rows: a cycle of 3; 1 row: none
    assert sorted(cycle[0].tolist()) == [0, 1]
    nodes = sorted(set(cycle[1:].flatten().tolist()))
    assert nodes == [2, 3, 4] and all(sorted(p) != [a, a] for a in nodes for p in cycle[1:].tolist())
    assert torch.equal(cycle, response_pairs(groups, rule="cycle", seed=0))  # seeded
    assert response_pairs(torch.tensor([0, 1]), rule="all").shape == (0, 2)
    with pytest.raises(ValueError, match="returns="):
        response_pairs(groups, rule="preference")
    with pytest.raises(ValueError, match="pair rule"):
        response_pairs(groups, rule="random")  # type: ignore[arg-type]
    # the data layer's and the synthetic benchmark's pairing are this function
    from shiq_lab.data.batch import make_pairs
    from shiq_lab.tasks.synthetic.sequence_baselines import prompt_pairs

    assert torch.equal(make_pairs(groups, returns, "all"), response_pairs(groups, rule="all"))
    assert torch.equal(prompt_pairs(groups, seed=3), response_pairs(groups, rule="cycle", seed=3))


def test_trusted_inputs_skip_only_the_value_checks() -> None:
    from shiq_lab.losses import checks_values, trusted_inputs

    logp, ref_logp, rewards, mask = _seq_batch()
    bad = mask.clone()
    bad[3] = 0  # an empty row: refused when checked
    with pytest.raises(ValueError, match="no response token"):
        shiq_loss(logp, logp, ref_logp, ref_logp, rewards, bad, beta=0.5)
    with trusted_inputs():
        assert not checks_values()
        shiq_loss(logp, logp, ref_logp, ref_logp, rewards, bad, beta=0.5)  # the caller's promise: not re-checked
        with pytest.raises(ValueError, match="all per-token inputs"):  # shapes are free to check: still checked
            shiq_loss(logp, logp, ref_logp, ref_logp, rewards[:, :2], mask, beta=0.5)
    assert checks_values()
