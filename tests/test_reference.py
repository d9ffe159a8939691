"""Reference statistics: per-token values, cache keying, reuse, staleness, atomic writes, LoRA."""

import copy
import warnings

import pytest
import torch

from shiq_lab.data.batch import ShiQCollator
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.toy import synthetic_dataset
from shiq_lab.infra.models import load_model
from shiq_lab.lm.stats import token_stats
from shiq_lab.reference import cache as ref_mod
from shiq_lab.reference.cache import (
    ReferenceCache,
    StaleReferenceCacheError,
    dataset_fingerprint,
    precompute_reference,
    reference_identity,
    write_reference_stats,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def data(tiny):
    return tokenize_dataset(synthetic_dataset(6, seed=3), tiny[1], max_length=48)


def batch_of(ds, tok, rows=None):
    rows = range(len(ds)) if rows is None else rows
    return ShiQCollator(tok.pad_token_id)([ds[i] for i in rows])


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_token_stats_equal_log_softmax_of_the_models_logits(tiny, data):
    model, tok = tiny
    b = batch_of(data, tok)
    logp, logz = token_stats(model, b["input_ids"], b["attention_mask"], b["action_mask"], chunk_size=5)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    want_logz = torch.logsumexp(logits[:, :-1], -1)
    want_logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    m = b["action_mask"][:, 1:].bool()
    assert torch.allclose(logp[:, 1:][m].double(), want_logp[m], atol=1e-5)
    assert torch.allclose(logz[:, 1:][m].double(), want_logz[m], atol=1e-5)
    assert logp[:, 0].eq(0).all() and logp[:, 1:][~m].eq(0).all() and logz[:, 1:][~m].eq(0).all()
    full = token_stats(model, b["input_ids"], b["attention_mask"], b["action_mask"], logits_mode="full")
    assert torch.allclose(full[0], logp, atol=1e-5) and torch.allclose(full[1], logz, atol=1e-5)


def test_chunked_and_full_paths_give_the_same_gradients(tiny, data):
    model, tok = tiny
    b = batch_of(data, tok, [0, 1, 2])
    grads = []
    for mode in ("chunked", "full"):
        model.zero_grad()
        logp, logz = token_stats(model, b["input_ids"], b["attention_mask"], b["action_mask"], logits_mode=mode)
        (logp * 0.3 + logz.square() * 0.01).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_cache_is_reused_without_a_forward_pass(tiny, data, tmp_path):
    model, _ = tiny
    calls, handle = count_forwards(model)
    try:
        first = precompute_reference(model, data, cache_dir=tmp_path, batch_size=4)
        n_first = len(calls)
        second = precompute_reference(model, data, cache_dir=tmp_path, batch_size=4)
    finally:
        handle.remove()
    assert n_first == 2 and len(calls) == 2  # 6 rows in batches of 4; the second run reads the cache
    assert second["ref_logp"] == first["ref_logp"] and second["ref_logz"] == first["ref_logz"]
    assert len(list(tmp_path.iterdir())) == 1


def test_changed_data_or_weights_give_another_key(tiny, data, tmp_path):
    model, tok = tiny
    precompute_reference(model, data, cache_dir=tmp_path)
    fp = dataset_fingerprint(data)
    changed = tokenize_dataset(synthetic_dataset(6, seed=4), tok, max_length=48)
    assert dataset_fingerprint(changed) != fp
    other_mask = data.map(lambda r: {"action_mask": r["action_mask"][:-1] + [0]})
    assert dataset_fingerprint(other_mask) != fp  # same tokens, another action mask
    assert dataset_fingerprint(data.select(range(6))) == fp
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.norm.weight[0] += 1e-3
    assert reference_identity(perturbed) != reference_identity(model)
    calls, handle = count_forwards(perturbed)
    try:
        out = precompute_reference(perturbed, data, cache_dir=tmp_path, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1 and len(list(tmp_path.iterdir())) == 2
    assert out["ref_logz"] != precompute_reference(model, data, cache_dir=tmp_path)["ref_logz"]
    assert reference_identity(model, "org/name@rev")["reference_id"] == "org/name@rev"


def test_explicit_stats_must_match_dataset_and_model(tiny, data, tmp_path):
    model, tok = tiny
    entry = write_reference_stats(tmp_path / "stats", model, data)
    ok = precompute_reference(model, data, stats_path=entry)
    assert ok["ref_logp"] == precompute_reference(model, data, use_cache=False)["ref_logp"]
    other = tokenize_dataset(synthetic_dataset(6, seed=5), tok, max_length=48)
    with pytest.raises(StaleReferenceCacheError, match=r"another dataset or tokenisation.*shiq-lab precompute-ref"):
        precompute_reference(model, other, stats_path=entry)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.lm_head.weight[3, 0] += 0.5
    with pytest.raises(StaleReferenceCacheError, match="another reference model \\(weights differ\\)"):
        precompute_reference(perturbed, data, stats_path=entry)
    with pytest.raises(StaleReferenceCacheError, match="not a reference-statistics entry"):
        precompute_reference(model, data, stats_path=tmp_path / "nothing")


def test_damaged_entry_is_detected_and_recomputed(tiny, data, tmp_path):
    model, _ = tiny
    good = precompute_reference(model, data, cache_dir=tmp_path)
    (entry,) = list(tmp_path.iterdir())
    stats = entry / ReferenceCache.STATS_FILE
    raw = bytearray(stats.read_bytes())
    raw[-3] ^= 0xFF
    stats.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        again = precompute_reference(model, data, cache_dir=tmp_path)
    assert again["ref_logp"] == good["ref_logp"]
    fp, ident = dataset_fingerprint(data), reference_identity(model)
    assert ReferenceCache.read(entry, fingerprint=fp, identity=ident)[0].size > 0  # entry repaired


def test_failed_write_leaves_the_previous_entry_intact(tiny, data, tmp_path, monkeypatch):
    model, _ = tiny
    entry = write_reference_stats(tmp_path / "stats", model, data)
    before = (entry / ReferenceCache.STATS_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ref_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_reference_stats(tmp_path / "stats", model, data)
    assert (entry / ReferenceCache.STATS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]  # no half-written leftovers
    ReferenceCache.read(entry, fingerprint=dataset_fingerprint(data), identity=reference_identity(model))


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny, data, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base_stats = precompute_reference(model, data, use_cache=False)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    b = batch_of(data, tok, [0])
    with torch.no_grad():
        adapted = token_stats(lora, b["input_ids"], b["attention_mask"], b["action_mask"])[0]
    assert not torch.allclose(adapted, torch.tensor(base_stats[0]["ref_logp"])[None], atol=1e-4)  # adapters matter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_stats = precompute_reference(lora, data, use_cache=False)
    assert lora_stats["ref_logp"] == base_stats["ref_logp"] and lora_stats["ref_logz"] == base_stats["ref_logz"]
    assert reference_identity(lora) == reference_identity(model)
    lora.train()
    precompute_reference(lora, data, cache_dir=tmp_path)
    assert lora.training  # the precompute restores the training mode


def test_the_output_layer_never_sees_more_than_one_position_per_row(tiny, data):
    """The [B, T, V] logits are never built: the model's own lm_head runs on the last position only."""
    model, tok = tiny
    b = batch_of(data, tok)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    try:
        logp, logz = token_stats(model, b["input_ids"], b["attention_mask"], b["action_mask"])
        (logp.sum() + logz.sum()).backward()
    finally:
        handle.remove()
        model.zero_grad()
    assert shapes == [(len(data), 1, model.config.vocab_size)]


def test_token_stats_keep_the_bits_the_cache_was_written_with(tiny, data):
    """STATS_VERSION 1 entries stay hits only if token_stats still gives their bits (else bump the version).

    Version 1 ran the kernel on the response states compacted by a boolean mask, in row-major order,
    with the positions the host now passes (``action_positions``) giving the same rows in the same order.
    """
    from shiq_lab.lm.kernel import chunked_token_logprobs
    from shiq_lab.lm.stats import action_positions, forward_hidden

    model, tok = tiny
    b = batch_of(data, tok)
    ids, am, mask = b["input_ids"], b["attention_mask"], b["action_mask"]
    with torch.no_grad():
        hidden, _ = forward_hidden(model, ids, am)
        m = mask[:, 1:].bool()
        w = model.get_output_embeddings().weight
        v1_logp, v1_logz = chunked_token_logprobs(hidden[:, :-1][m], w, ids[:, 1:][m], chunk_size=5)
        for positions in (None, action_positions(mask)):
            logp, logz = token_stats(model, ids, am, mask, chunk_size=5, positions=positions)
            assert torch.equal(logp[:, 1:][m], v1_logp) and torch.equal(logz[:, 1:][m], v1_logz)


def test_under_autocast_the_output_layer_runs_in_the_autocast_dtype(tiny, data):
    """Mixed precision: the kernel's matmuls run in bf16 on the bf16-cast hidden states and weights (as the model's
    own lm_head does under autocast), the fp32 master weight still gets its gradient, and the statistics are
    not the fp32-output-layer ones (hence another cache identity)."""
    from shiq_lab.lm.kernel import chunked_token_logprobs
    from shiq_lab.lm.stats import forward_hidden

    model, tok = tiny
    b = batch_of(data, tok, [0, 1])
    ids, am, mask = b["input_ids"], b["attention_mask"], b["action_mask"]
    w = model.get_output_embeddings().weight
    assert w.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, _ = forward_hidden(model, ids, am)
        logp, logz = token_stats(model, ids, am, mask, chunk_size=5)
    m = mask[:, 1:].bool()
    with torch.no_grad():
        h = hidden[:, :-1][m]
        want = chunked_token_logprobs(h.bfloat16(), w.bfloat16(), ids[:, 1:][m], chunk_size=5)
        fp32 = chunked_token_logprobs(h.float(), w, ids[:, 1:][m], chunk_size=5)
    assert torch.equal(logp[:, 1:][m], want[0]) and torch.equal(logz[:, 1:][m], want[1])
    assert (logz[:, 1:][m] - fp32[1]).abs().max() > 1e-6  # bf16 logits are not fp32 ones (the tiny model: ~3e-5)
    model.zero_grad()
    logz.sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and w.grad.abs().max() > 0
    model.zero_grad()
    ident = reference_identity(model, autocast_dtype=torch.bfloat16)
    assert ident["output_layer"] == "autocast" and "output_layer" not in reference_identity(model)


def test_cast_lm_head_to_fp32_keeps_the_output_layer_in_fp32_under_autocast(tiny, data):
    """The precise option: under bf16 autocast the kernel runs on fp32 weights and the (bf16) hidden states cast
    to fp32, the 0.1 behaviour, whose cache entries keep their identity."""
    from shiq_lab.lm.kernel import chunked_token_logprobs
    from shiq_lab.lm.stats import forward_hidden

    model, tok = tiny
    b = batch_of(data, tok, [0, 1])
    ids, am, mask = b["input_ids"], b["attention_mask"], b["action_mask"]
    w = model.get_output_embeddings().weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, _ = forward_hidden(model, ids, am)
        logp, logz = token_stats(model, ids, am, mask, chunk_size=5, cast_lm_head_to_fp32=True)
    m = mask[:, 1:].bool()
    with torch.no_grad():
        want = chunked_token_logprobs(hidden[:, :-1][m].float(), w, ids[:, 1:][m], chunk_size=5)
    assert torch.equal(logp[:, 1:][m], want[0]) and torch.equal(logz[:, 1:][m], want[1])
    ident = reference_identity(model, autocast_dtype=torch.bfloat16, cast_lm_head_to_fp32=True)
    assert "output_layer" not in ident and ident["autocast"] == "bfloat16"


def test_full_mode_statistics_are_not_reused_as_fp32_output_layer_ones(tiny, data, tmp_path):
    """In ``logits_mode="full"`` the model's own lm_head runs in the autocast dtype whatever ``cast_lm_head_to_fp32``
    says, so under bf16 its entries are bf16-output-layer statistics: a chunked run that asks for the fp32 output
    layer must not get them from the cache (it would start with theta = ref but KL != 0)."""
    model, _ = tiny
    kw = dict(batch_size=4, autocast_dtype=torch.bfloat16, cast_lm_head_to_fp32=True)
    full = precompute_reference(model, data, cache_dir=tmp_path, logits_mode="full", **kw)
    chunked = precompute_reference(model, data, cache_dir=tmp_path, logits_mode="chunked", **kw)
    fresh = precompute_reference(model, data, use_cache=False, logits_mode="chunked", **kw)
    assert chunked["ref_logz"] == fresh["ref_logz"] and full["ref_logz"] != fresh["ref_logz"]
    # the identity says what ran: the full mode's output layer followed autocast
    assert reference_identity(model, None, torch.bfloat16, cast_lm_head_to_fp32=True,
                              logits_mode="full")["output_layer"] == "autocast"
    assert "output_layer" not in reference_identity(model, None, torch.bfloat16, cast_lm_head_to_fp32=True,
                                                    logits_mode="chunked")
