"""The compiled loss kernel (``compiled=True`` / ``logits_mode="chunked-compiled"``) is the plain one, fused.

Same values and gradients as the plain PyTorch path (fp32 to 1e-6 relative; bf16 as accurate as the bf16
reference), compiled once per step for every batch (no recompiles), and one clear error without inductor.
CPU inductor compiles C++ (gcc): a few seconds on first use, then cached on disk.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from shiq_lab.lm import kernel
from shiq_lab.lm.kernel import chunked_token_logprobs

TILE = {"chunk_size": 8, "vocab_chunk_size": 64}  # neither divides N = 3 x 10 nor V = 300: ragged tiles


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """A clean compile cache, so the graph counts below do not depend on which tests ran before."""
    torch._dynamo.reset()
    kernel._COMPILED.clear()
    yield
    torch._dynamo.reset()
    kernel._COMPILED.clear()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _batch(seed, B=3, T=10, H=16, V=300, dtype=torch.float32, bias=True, weight_grad=True):
    """Hidden states, output layer, actions and a padded mask: prompt and padding hold garbage ids and NaN states."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row in range(B):  # a different response span per row and per seed
        start = int(torch.randint(1, 4, (1,), generator=g))
        stop = int(torch.randint(start + 2, T + 1, (1,), generator=g))
        mask[row, start:stop] = 1
    a = a.masked_fill(mask == 0, -100)
    h[mask == 0] = float("nan")  # masked states are never read
    h = h.to(dtype).requires_grad_(True)
    w = w.to(dtype).requires_grad_(weight_grad)
    if b is not None:
        b = b.to(dtype).requires_grad_(weight_grad)
    gp, gz = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    return h, w, b, a, mask, gp, gz


def _run(fn, h, w, b, gp, gz):
    """(logp, logz, d/dh, d/dw, d/db) of sum(gp * logp + gz * logz)."""
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    logp, logz = fn()
    ((logp * gp.to(logp.dtype)).sum() + (logz * gz.to(logz.dtype)).sum()).backward()
    return [logp.detach(), logz.detach(), h.grad.clone(), None if w.grad is None else w.grad.clone(),
            None if b is None or b.grad is None else b.grad.clone()]


@pytest.fixture
def compiled_calls(monkeypatch):
    """The ``compiled`` flag of every call of the kernel's step lookup: shows which path ran."""
    calls = []
    original = kernel._steps

    def spy(compiled, device):
        calls.append(compiled)
        return original(compiled, device)

    monkeypatch.setattr(kernel, "_steps", spy)
    return calls


def _both(batch, **kw):
    h, w, b, a, mask, gp, gz = batch
    out = {}
    for compiled in (False, True):
        out[compiled] = _run(lambda c=compiled: chunked_token_logprobs(h, w, a, bias=b, mask=mask, compiled=c, **TILE, **kw),
                             h, w, b, gp, gz)
    return out[False], out[True]


def _assert_fp32_equal(plain, comp, names=("logp", "logz", "grad_hidden", "grad_weight", "grad_bias")):
    for name, p, c in zip(names, plain, comp):
        if p is None:
            assert c is None, name
            continue
        assert c.dtype == p.dtype and torch.isfinite(c).all(), name
        torch.testing.assert_close(c, p, rtol=1e-6, atol=1e-6 * float(p.abs().max()), msg=name)


def test_fp32_equals_plain_path_and_never_recompiles():
    before = _graphs()
    plain, comp = _both(_batch(0))
    assert _graphs() > before  # the compiled steps really ran (compiled on this first call)
    assert plain[3].abs().max() > 0 and plain[4].abs().max() > 0
    _assert_fp32_equal(plain, comp)
    compiled_once = _graphs()
    # same shape, different contents (values, masks, padding), three times: no new graph
    for seed in (1, 2, 3):
        _assert_fp32_equal(*_both(_batch(seed)))
    # other numbers of tokens (other tile shapes, as from batch to batch in training): still none
    for B, T in ((2, 13), (4, 7)):
        _assert_fp32_equal(*_both(_batch(9, B=B, T=T)))
    assert _graphs() == compiled_once


def test_fp32_frozen_head_and_no_bias_equal_plain_path():
    # the precompute strategy (E_softmax[W] accumulated in the forward) and the shift-free tile
    for kw in (dict(weight_grad=False), dict(bias=False)):
        plain, comp = _both(_batch(4, **kw))
        _assert_fp32_equal(plain, comp)


# bf16 accuracy of the compiled kernel: tests/test_fused_logprobs.py::test_bf16_as_accurate_as_the_bf16_reference[compiled]


def test_token_stats_chunked_compiled_mode_equals_chunked(compiled_calls):
    from shiq_lab.data.batch import ShiQCollator
    from shiq_lab.data.encode import tokenize_dataset
    from shiq_lab.data.toy import synthetic_dataset
    from shiq_lab.infra.models import load_model
    from shiq_lab.lm.stats import resolve_logits_mode, token_stats

    model, tok = load_model("tiny")
    ds = tokenize_dataset(synthetic_dataset(3, seed=3), tok, max_length=48)
    b = ShiQCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert resolve_logits_mode(model, "chunked-compiled") == "chunked-compiled"
    out = {}
    for mode in ("chunked", "chunked-compiled"):
        model.zero_grad()
        logp, logz = token_stats(model, b["input_ids"], b["attention_mask"], b["action_mask"], logits_mode=mode)
        (logp * 0.3 + logz.square() * 0.01).sum().backward()
        out[mode] = (logp.detach(), logz.detach(), model.get_output_embeddings().weight.grad.clone())
    assert compiled_calls == [False, False, True, True]  # forward and backward of each mode
    for name, p, c in zip(("logp", "logz", "grad_output_layer"), out["chunked"], out["chunked-compiled"]):
        torch.testing.assert_close(c, p, rtol=1e-6, atol=1e-6 * float(p.abs().max()), msg=name)


def test_missing_inductor_toolchain_is_one_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    import torch.utils._triton as triton_utils

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernel, "_INDUCTOR_OK", set())
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    h, w, _, a, mask, _, _ = _batch(0)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler.*logits_mode='chunked'"):
        chunked_token_logprobs(h, w, a, mask=mask, compiled=True)
    chunked_token_logprobs(h, w, a, mask=mask)  # the plain path needs no toolchain
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match="needs triton"):
        kernel._require_inductor(torch.device("cuda"))


def _cuda_check(dtype: torch.dtype) -> None:
    from shiq_lab.losses import trusted_inputs

    dev = torch.device("cuda")
    h, w, _, a, mask, gp, gz = (t.detach().to(dev) if t is not None else None
                                for t in _batch(5, B=3, T=300, H=576, V=5000, dtype=dtype, bias=False))
    h.requires_grad_(True)
    w.requires_grad_(True)
    plain = _run(lambda: chunked_token_logprobs(h, w, a, mask=mask), h, w, None, gp, gz)
    comp = _run(lambda: chunked_token_logprobs(h, w, a, mask=mask, compiled=True), h, w, None, gp, gz)
    for name, p, c in zip(("logp", "logz", "grad_hidden", "grad_weight"), plain, comp):
        err = float((c.double() - p.double()).abs().max()) / float(p.abs().max())
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, name, err)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        with trusted_inputs():
            logp, logz = chunked_token_logprobs(h, w, a, mask=mask, compiled=True)
            ((logp * gp.to(logp.dtype)).sum() + (logz * gz.to(logz.dtype)).sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_compiled_equals_plain_and_makes_no_sync():
    # the GPU check's cuda_tests stage runs this: Triton kernels, SmolLM2's hidden size, default (CUDA) tiles
    for dtype in (torch.float32, torch.bfloat16):
        _cuda_check(dtype)


def test_config_takes_the_compiled_mode_and_names_the_choices(tmp_path):
    from shiq_lab.errors import ConfigError
    from shiq_lab.train.config import ShiQConfig

    cfg = ShiQConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, logits_mode="chunked-compiled")
    assert cfg.logits_mode == "chunked-compiled"
    with pytest.raises(ConfigError, match="'auto', 'chunked', 'chunked-compiled', 'full'"):
        ShiQConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, logits_mode="compiled")


def test_training_with_the_compiled_mode_follows_the_plain_one(tmp_path, compiled_calls):
    # ShiQTrainer passes logits_mode to its step and to the reference precompute: 3 steps, the same losses
    from shiq_lab.data.toy import synthetic_dataset
    from shiq_lab.infra.models import load_model
    from shiq_lab.train.config import ShiQConfig
    from shiq_lab.train.trainer import ShiQTrainer

    losses = {}
    for mode in ("chunked", "chunked-compiled"):
        torch.manual_seed(0)
        model, tok = load_model("tiny")
        args = ShiQConfig(output_dir=str(tmp_path / mode), report_to="none", use_cpu=True, save_strategy="no",
                          disable_tqdm=True, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3,
                          ref_cache_dir=str(tmp_path / mode / "cache"), beta=0.5, max_length=32, seed=0,
                          logits_mode=mode, logging_steps=1)
        trainer = ShiQTrainer(model=model, args=args, train_dataset=synthetic_dataset(8, seed=1), processing_class=tok)
        trainer.train()
        losses[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["chunked"]) == 3 and losses["chunked"][1] != losses["chunked"][0]
    assert losses["chunked-compiled"] == pytest.approx(losses["chunked"], rel=1e-5)
    # the reference precompute and each step's forward and backward took the path of their run's mode
    assert True in compiled_calls and compiled_calls.index(True) > 0 and all(compiled_calls[compiled_calls.index(True):])
