"""chunked_token_logprobs equals token_logprobs(hidden @ W.T + b) in values and gradients, never holds [N, V]."""

import sys
from pathlib import Path

import pytest
import torch

from shiq_lab.lm.kernel import TILE_ELEMENTS, chunked_token_logprobs, default_tile
from shiq_lab.losses import sequence_logratio, shiq_logit_grad, shiq_loss, token_logprobs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _inputs(B=2, T=9, H=6, V=37, dtype=torch.float64, bias=True, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = torch.randint(0, V, (B, T), generator=g)
    h = h.to(dtype).requires_grad_(True)
    w = w.to(dtype).requires_grad_(weight_grad)
    if b is not None:
        b = b.to(dtype).requires_grad_(weight_grad)
    return h, w, b, a


def _grads(fn, h, w, b, gp, gz):
    """(logp, logz) of fn and the gradients of sum(gp*logp + gz*logz) with respect to h, w, b."""
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    logp, logz = fn()
    ((logp * gp.to(logp.dtype)).sum() + (logz * gz.to(logz.dtype)).sum()).backward()
    out = [logp.detach(), logz.detach(), h.grad.clone()]
    out += [w.grad.clone() if w.requires_grad else None, b.grad.clone() if b is not None and b.requires_grad else None]
    return out


def _reference(h, w, b, a):
    logits = h @ w.T + (b if b is not None else 0)
    return token_logprobs(logits, a)


@pytest.mark.parametrize("weight_grad", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("tile", [(5, 7), (18, 37), (1, 1), (4, 64)], ids=str)
def test_fp64_values_and_gradients_equal_reference(tile, weight_grad):
    # tiles that do not divide N = 18 or V = 37, a single tile, 1 x 1 tiles, and tiles larger than V
    h, w, b, a = _inputs(weight_grad=weight_grad)
    gp, gz = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    ref = _grads(lambda: _reference(h, w, b, a), h, w, b, gp, gz)
    got = _grads(lambda: chunked_token_logprobs(h, w, a, bias=b, chunk_size=tile[0], vocab_chunk_size=tile[1]), h, w, b, gp, gz)
    for name, r, x in zip(("logp", "logz", "grad_hidden", "grad_weight", "grad_bias"), ref, got):
        if r is None:
            assert x is None, name
            continue
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12, msg=name)


def test_fp32_close_to_reference_without_bias():
    h, w, b, a = _inputs(B=3, T=11, H=16, V=300, dtype=torch.float32, bias=False)
    gp, gz = torch.randn(3, 11), torch.randn(3, 11)
    ref = _grads(lambda: _reference(h, w, b, a), h, w, b, gp, gz)
    got = _grads(lambda: chunked_token_logprobs(h, w, a, chunk_size=8, vocab_chunk_size=64), h, w, b, gp, gz)
    for name, r, x in zip(("logp", "logz", "grad_hidden", "grad_weight"), ref, got):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()), msg=name)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "compiled"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trained-head", "frozen-head"])
def test_bf16_as_accurate_as_the_bf16_reference(weight_grad, compiled):
    # Truth from fp64; the fused bf16 kernel (plain, or through torch.compile: logits_mode chunked-compiled) must
    # be about as close to it as the plain bf16 path.
    h64, w64, b64, a = _inputs(B=2, T=20, H=32, V=500, bias=True, weight_grad=weight_grad, seed=3)
    gp, gz = torch.randn(2, 20, dtype=torch.float64), torch.randn(2, 20, dtype=torch.float64)
    truth = _grads(lambda: _reference(h64, w64, b64, a), h64, w64, b64, gp, gz)
    h, w, b = (t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in (h64, w64, b64))
    ref = _grads(lambda: _reference(h, w, b, a), h, w, b, gp, gz)
    got = _grads(lambda: chunked_token_logprobs(h, w, a, bias=b, chunk_size=16, vocab_chunk_size=128, compiled=compiled),
                 h, w, b, gp, gz)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for name, t, r, x in zip(("logp", "logz", "grad_hidden", "grad_weight", "grad_bias"), truth, ref, got):
        if t is None or r is None:
            continue
        scale = float(t.abs().max())
        err_ref = float((r.double() - t).abs().max()) / scale
        err_got = float((x.double() - t).abs().max()) / scale
        assert err_got < 0.03, (name, err_got)
        assert err_got <= 2 * err_ref + 1e-3, (name, err_got, err_ref)


def _shiq_batch(B=3, T=10, V=41, H=8, seed=1):
    """A padded batch: prompts (mask 0) of varying length, padding with garbage actions."""
    g = torch.Generator().manual_seed(seed)
    h, w, _, a = _inputs(B=B, T=T, H=H, V=V, bias=False, seed=seed)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 2:10] = 1
    mask[1, 3:6] = 1  # then padding
    mask[2, 1:4] = 1
    mask[2, 6:9] = 1  # an environment turn in between (multi-turn)
    a = a.masked_fill(mask == 0, -100)  # HF's ignore index: not a token id
    a[1, 7] = V + 5
    ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logz = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[0, 9], rewards[1, 5], rewards[2, 3], rewards[2, 8] = 1.0, -0.5, 0.3, 2.0
    return h, w, a, mask, ref_logp, ref_logz, rewards


@pytest.mark.parametrize("horizon", [None, 2])
def test_shiq_loss_through_fused_kernel_equals_naive_on_padded_batch(horizon):
    h, w, a, mask, ref_logp, ref_logz, rewards = _shiq_batch()
    beta = 0.3

    def loss(logp, logz):
        return shiq_loss(logp, logz, ref_logp, ref_logz, rewards, mask, beta=beta, horizon=horizon).loss

    naive = loss(*token_logprobs(h @ w.T, a.clamp(0, w.shape[0] - 1)))  # the reference needs valid ids
    naive.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = loss(*chunked_token_logprobs(h, w, a, mask=mask, chunk_size=4, vocab_chunk_size=16))
    fused.backward()
    torch.testing.assert_close(fused, naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(h.grad, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)
    # padding and prompt positions were never computed: no gradient reaches their hidden states
    assert torch.all(h.grad[mask == 0] == 0)
    assert torch.all(h.grad[mask == 1].abs().sum(-1) > 0)


def test_gradient_is_the_closed_form_of_method_md():
    # d loss / d logits = 2*beta*[S_t*onehot - (S_t - delta_t)*softmax] / n_tokens, so
    # d loss / d hidden = G @ W and d loss / d W = G^T @ hidden.
    h, w, a, mask, ref_logp, ref_logz, rewards = _shiq_batch(seed=4)
    beta = 0.5
    out = shiq_loss(*chunked_token_logprobs(h, w, a, mask=mask, chunk_size=3, vocab_chunk_size=10),
                    ref_logp, ref_logz, rewards, mask, beta=beta)
    out.loss.backward()
    logits = (h @ w.T).detach()
    G = shiq_logit_grad(logits, a.clamp(0, w.shape[0] - 1), out.residuals.detach(), mask, beta=beta) / mask.sum()
    torch.testing.assert_close(h.grad, G @ w.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, torch.einsum("btv,bth->vh", G, h.detach()), rtol=1e-10, atol=1e-12)


def test_logp_only_losses_get_the_right_gradient():
    # DPO / DRO / CoPG read logp only: the unused logz must contribute nothing
    h, w, a, mask, ref_logp, *_ = _shiq_batch(seed=5)
    lr = sequence_logratio(*chunked_token_logprobs(h, w, a, mask=mask, vocab_chunk_size=8)[:1], ref_logp, mask)
    (lr * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lr_ref = sequence_logratio(token_logprobs(h @ w.T, a.clamp(0, w.shape[0] - 1))[0], ref_logp, mask)
    (lr_ref * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_tiny_fp64():
    h, w, b, a = _inputs(B=2, T=3, H=3, V=7)
    f = lambda h_, w_, b_: chunked_token_logprobs(h_, w_, a, bias=b_, chunk_size=4, vocab_chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w, b))
    # frozen output layer: the precompute strategy (E_softmax[W] kept from the forward pass)
    w_frozen, b_frozen = w.detach(), b.detach()
    assert torch.autograd.gradcheck(lambda h_: chunked_token_logprobs(h_, w_frozen, a, bias=b_frozen, vocab_chunk_size=3), (h,))


def test_no_grad_values_and_all_masked_rows():
    h, w, b, a = _inputs()
    with torch.no_grad():
        logp, logz = chunked_token_logprobs(h, w, a, bias=b, vocab_chunk_size=5)
    ref_logp, ref_logz = _reference(h, w, b, a)
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logz, ref_logz.detach(), rtol=1e-12, atol=1e-12)
    # nothing to compute: zeros, and backward gives zero gradients instead of failing
    logp, logz = chunked_token_logprobs(h, w, torch.full_like(a, -1), mask=torch.zeros_like(a))
    assert torch.all(logp == 0) and torch.all(logz == 0)
    (logp.sum() + logz.sum()).backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_never_allocates_the_full_logits():
    from benchmarks.common import measure_memory

    N, V, H = 64, 2048, 16
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    a = torch.randint(0, V, (N,))
    full_logits = N * V * 4

    def step(fn):
        def run():
            logp, logz = fn()
            (logp.sum() + logz.sum()).backward()
        return run

    fused = measure_memory(step(lambda: chunked_token_logprobs(h, w, a, chunk_size=16, vocab_chunk_size=256)), torch.device("cpu"))
    h.grad = w.grad = None
    naive = measure_memory(step(lambda: token_logprobs((h @ w.T)[None], a[None])), torch.device("cpu"))
    assert naive["largest_temp_bytes"] >= full_logits  # the measurement sees the naive [N, V] logits
    assert fused["largest_temp_bytes"] <= 16 * 256 * 4  # one tile at most
    grads = (N * H + V * H) * 4
    assert fused["peak_bytes"] - grads < 0.1 * (naive["peak_bytes"] - grads)


def test_default_tile_fits_the_budget():
    budget = TILE_ELEMENTS["cpu"]
    n, v = default_tile(512, 49152, "cpu")
    assert n == 512 and v % 256 == 0 and budget // 2 < n * v <= budget
    assert default_tile(10, 100, "cpu") == (10, 100)  # small problems: one tile
    n, v = default_tile(100_000, 49152, "cpu")
    assert n == 4096 and v == 256  # never fewer than 256 vocabulary columns


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(actions=torch.full((2, 9), 37)), ValueError, "mask="),
        (dict(actions=torch.zeros(2, 8, dtype=torch.long)), ValueError, "actions shape"),
        (dict(actions=torch.zeros(2, 9, dtype=torch.int32)), TypeError, "torch.long"),
        (dict(weight=torch.zeros(37, 6, dtype=torch.float32)), TypeError, "share one float dtype"),
        (dict(weight=torch.zeros(37, 5, dtype=torch.float64)), ValueError, "H=5"),
        (dict(mask=torch.ones(2, 8)), ValueError, "mask shape"),
        (dict(mask=torch.full((2, 9), 2)), ValueError, "only 0 and 1"),
        (dict(chunk_size=0), ValueError, "chunk_size=0"),
        (dict(bias=torch.zeros(36, dtype=torch.float64)), ValueError, "bias"),
    ],
)
def test_bad_input_errors_name_the_field(kwargs, err, match):
    h, w, _, a = _inputs(bias=False)
    args = dict(hidden=h, weight=w, actions=a)
    args.update(kwargs)
    hidden, weight, actions = args.pop("hidden"), args.pop("weight"), args.pop("actions")
    with pytest.raises(err, match=match):
        chunked_token_logprobs(hidden, weight, actions, **args)
