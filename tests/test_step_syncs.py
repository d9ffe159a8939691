"""Issue 14: a training step makes no host-device synchronisation beyond the model's own forward and backward.

A sync is whatever makes the host wait for a tensor's value: ``.item()`` / ``bool()`` / ``int()`` /
``float()`` (all of them ``aten._local_scalar_dense``), ``nonzero`` and boolean-mask indexing (an
output shape that depends on values), ``masked_select``, ``tolist()`` / ``numpy()``. They are counted
by a dispatch mode (every aten call, backward included) and by patching the Python conversions.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shiq_lab.infra.models import load_model
from shiq_lab.train.trainer import ShiQConfig, ShiQTrainer

ROWS = [
    {"prompt": "the movie", "completion": " was great.", "reward": 1.0},
    {"prompt": "the movie", "completion": " was bad and boring.", "reward": -2.0},
    {"prompt": "the film", "completion": " good.", "reward": 0.5},
    {"prompt": "the film", "completion": " awful music.", "reward": -0.5},
]

aten = torch.ops.aten
_SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.nonzero_static.default}


class SyncCounter(TorchDispatchMode):
    """Counts the calls that synchronise (on an accelerator) while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            self.calls.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                self.calls.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """Yield the list of synchronising calls made inside the block."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def patched(name):
        def call(self, *a, **k):
            counter.calls.append(f"Tensor.{name}")
            return originals[name](self, *a, **k)
        return call

    for name in originals:
        setattr(torch.Tensor, name, patched(name))
    try:
        with counter:
            yield counter.calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with count_syncs() as calls:
        float(x.sum()), bool(x.any()), x[x > 2], torch.nonzero(x), x.tolist(), x.max().item()
    assert len(calls) == 6, calls
    with count_syncs() as calls:
        torch.where(x > 2, x, 0.0).sum(), x.index_select(0, torch.tensor([1, 3]))  # fixed shapes: no sync
    assert calls == []


@pytest.mark.parametrize("loss", ["shiq", "dpo", "copg", "dro"])
def test_kernel_and_losses_make_no_sync_on_trusted_inputs(loss):
    from shiq_lab.lm.kernel import chunked_token_logprobs
    from shiq_lab.losses import copg_loss, dpo_loss, dro_loss, shiq_loss, trusted_inputs

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 7, 5, 33
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    mask = torch.ones(B, T)
    mask[:, :2] = 0
    mask[1, 5:] = 0
    a = torch.randint(0, V, (B, T), generator=g).masked_fill(mask == 0, -100)  # padding holds no id
    ref, r, pairs = torch.zeros(B, T), torch.randn(B, T, generator=g), torch.tensor([[0, 1], [2, 3]])

    def step():
        logp, logz = chunked_token_logprobs(h, w, a, mask=mask, chunk_size=3, vocab_chunk_size=8)
        if loss == "shiq":
            out = shiq_loss(logp, logz, ref, ref, r, mask, beta=0.5, horizon=2)
        elif loss == "dpo":
            out = dpo_loss(logp, ref, mask, beta=0.5, chosen=pairs[:, 0], rejected=pairs[:, 1])
        elif loss == "copg":
            out = copg_loss(logp, ref, r, mask, beta=0.5, pairs=pairs)
        else:
            out = dro_loss(logp, ref, r, mask, torch.zeros(B), beta=0.5)
        out.loss.backward()

    with trusted_inputs(), count_syncs() as calls:
        step()
    assert calls == []
    with count_syncs() as calls:  # checked (the default): the value checks read the tensors
        step()
    assert len(calls) >= 2


def _trainer(tmp_path, loss_type: str) -> ShiQTrainer:
    model, tok = load_model("tiny")
    args = ShiQConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                      disable_tqdm=True, per_device_train_batch_size=2 if loss_type in ("dpo", "copg") else 4,
                      learning_rate=1e-2, max_steps=1, ref_cache_dir=str(tmp_path / "cache"), beta=0.5, max_length=32,
                      seed=0, loss_type=loss_type)
    return ShiQTrainer(model=model, args=args, train_dataset=list(ROWS), processing_class=tok)


def _model_own_syncs(model, batch) -> int:
    """Syncs of the model's own forward (as token_stats calls it) and backward: outside our control."""
    model.train()
    with count_syncs() as calls:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                    logits_to_keep=1)
        out.logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return len(calls)


@pytest.mark.parametrize("loss_type", ["shiq", "dpo", "copg", "dro"])
def test_a_training_step_adds_no_sync_to_the_models_own(tmp_path, loss_type):
    tr = _trainer(tmp_path, loss_type)
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))]))
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    own = _model_own_syncs(tr.model, batch)
    items = torch.as_tensor(float(tr._loss_items(batch)))
    with count_syncs() as calls:
        loss = tr.training_step(tr.model, batch, num_items_in_batch=items)
    assert len(calls) == own, calls  # 0 of ours: metrics stay on the device, no value checks, no masks
    # the metrics were recorded as tensors and are read once, at logging time
    sums = tr._metric_sums["train"]
    assert sums and all(isinstance(v, (torch.Tensor, int, float)) for v in sums.values())
    with count_syncs() as calls:
        logs = tr._metrics("train")
    assert calls == ["Tensor.tolist"]  # the one sync of a logging step
    assert logs["logratio"] == 0.0 and loss.item() >= 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_step_makes_no_sync_of_its_own(tmp_path):
    import warnings

    model, tok = load_model("tiny")
    model.cuda()
    args = ShiQConfig(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", disable_tqdm=True,
                      per_device_train_batch_size=4, max_steps=1, ref_cache_dir=str(tmp_path / "cache"), beta=0.5,
                      max_length=32)
    tr = ShiQTrainer(model=model, args=args, train_dataset=list(ROWS), processing_class=tok)
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(4)]))
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    items = torch.as_tensor(float(tr._loss_items(batch)), device="cuda")

    def warned(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    def plain():
        out = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       logits_to_keep=1)
        out.logits.float().sum().backward()

    own = warned(plain)
    tr.model.zero_grad(set_to_none=True)
    assert warned(lambda: tr.training_step(tr.model, batch, num_items_in_batch=items)) == own
