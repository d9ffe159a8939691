"""Issue 14: a training step makes no host-device synchronisation beyond the model's own forward and backward.

A sync is whatever makes the host wait for a tensor's value: ``.item()`` / ``bool()`` / ``int()`` /
``float()`` (all of them ``aten._local_scalar_dense``), ``nonzero`` and boolean-mask indexing (an
output shape that depends on values), ``masked_select``, ``tolist()`` / ``numpy()``. They are counted
by a dispatch mode (every aten call, backward included) and by patching the Python conversions.

Two scopes: ``ShiQTrainer.training_step`` alone (our code adds nothing to the model's own syncs), and a
whole ``train()`` with gradient accumulation, Hugging Face's inner loop included, where each sync is
attributed to the optimizer step and the code (file:function) that asked for it; the ones that remain
are listed in the docstring of :mod:`shiq_lab.train.trainer`.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

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


_HERE = Path(__file__).resolve()
_TORCH = Path(torch.__file__).resolve().parent


def _origin() -> str:
    """``file:function`` of the innermost caller outside torch and this file (where a sync was asked for)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path != _HERE and _TORCH not in path.parents:
            parts = path.parts
            for root in ("site-packages", _HERE.parent.parent.name):  # transformers/..., shiq_lab/...
                if root in parts:
                    parts = parts[len(parts) - parts[::-1].index(root):]
                    break
            return f"{'/'.join(parts)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class SyncLog(list):
    """The synchronising calls seen (their names), with ``where`` each came from (:func:`_origin`)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []
        self._paused = 0

    def add(self, name: str) -> None:
        if not self._paused:
            self.append(name)
            self.where.append(_origin())

    @contextlib.contextmanager
    def host_side(self):
        """Within the block nothing is counted: code that only ever reads host (CPU) tensors, on any device."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


class SyncCounter(TorchDispatchMode):
    """Counts the calls that synchronise (on an accelerator) while it is active."""

    def __init__(self, log: SyncLog | None = None) -> None:
        super().__init__()
        self.calls = log if log is not None else SyncLog()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            self.calls.add(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                self.calls.add(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    """Yield the :class:`SyncLog` of the synchronising calls made inside the block."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def patched(name):
        def call(self, *a, **k):
            counter.calls.add(f"Tensor.{name}")
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


# ---------------------------------------------------------------------------------------------
# the whole loop: ShiQTrainer.train(), Hugging Face's inner loop included
# ---------------------------------------------------------------------------------------------

STEPS, ACCUM, LOG_EVERY = 4, 2, 2  # optimizer steps 2 and 4 log; 1 and 3 do not

# Where the syncs of a run come from (file:function, as _origin names them), derived by hand:
#: the model's own forward, once per micro-batch: masking_utils.sdpa_mask -> _ignore_causal_mask_sdpa reads
#: ``fast_all(padding_mask)`` (1 sync); a micro-batch with padding fails it and reads the prefill case
#: ``fast_all(padding_mask[:, :q_length])`` too (a 2nd). The backward makes none.
MODEL_MASK = "transformers/masking_utils.py:_ignore_causal_mask_sdpa"
#: a logging step: Trainer._maybe_log_save_evaluate reads the loss (``nested_gather(tr_loss).mean().item()``)
#: and the grad norm (``grad_norm.item()``); ShiQTrainer._metrics reads all our metrics with one ``tolist()``
LOGGING = Counter({"transformers/trainer.py:_maybe_log_save_evaluate": 2, "shiq_lab/train/trainer.py:_metrics": 1})
#: once per run, after the last step: Trainer._finalize_training reads the loss not yet logged (``.item()``)
RUN_END = Counter({"transformers/trainer.py:_finalize_training": 1})


def _rows(n_prompts: int) -> list[dict]:
    """Two responses per prompt, of lengths that vary (so some micro-batches are padded, some not)."""
    words = ["good", "bad", "great fun", "boring and long", "fine"]
    return [{"prompt": f"film {i}:", "completion": f" {words[(i + j) % len(words)]}.", "reward": 1.0 - 2 * j}
            for i in range(n_prompts) for j in range(2)]


class _HostSideIterator:
    """The epoch iterator with the counter paused: sampling, collating (``action_positions``) and the copy
    to the device read only CPU tensors, whatever the training device, so they are no device syncs."""

    def __init__(self, it, calls: SyncLog):
        self.it, self.calls = it, calls

    def __iter__(self):
        return self

    def __next__(self):
        with self.calls.host_side():
            return next(self.it)


def _train_counting(tmp_path, loss_type: str, **overrides) -> tuple[list[Counter], Counter, list[list[dict]]]:
    """Train STEPS optimizer steps under the counter; returns the syncs of each step (from its batches to the
    next step's), those of the run's end, and each step's micro-batches."""
    from shiq_lab.losses import LOSSES

    model, tok = load_model("tiny")
    pairwise = LOSSES[loss_type].pairwise
    cfg = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
               disable_tqdm=True, per_device_train_batch_size=1 if pairwise else 2, gradient_accumulation_steps=ACCUM,
               learning_rate=1e-2, max_steps=STEPS, logging_steps=LOG_EVERY, ref_cache_dir=str(tmp_path / "cache"),
               beta=0.5, max_length=32, seed=0, loss_type=loss_type)
    # one prompt (two rows) per micro-batch: a pairwise batch counts prompts, the others rows
    tr = ShiQTrainer(model=model, args=ShiQConfig(**{**cfg, **overrides}), train_dataset=_rows(STEPS * ACCUM),
                     processing_class=tok)
    marks: list[int] = []
    batches: list[list[dict]] = []
    with count_syncs() as calls:
        def get_batch_samples(epoch_iterator, num_batches, device):
            marks.append(len(calls))  # a step starts when it fetches its micro-batches
            samples, items = ShiQTrainer.get_batch_samples(tr, _HostSideIterator(epoch_iterator, calls),
                                                           num_batches, device)
            batches.append(samples)
            return samples, items

        tr.get_batch_samples = get_batch_samples
        ends: list[int] = []

        class _End(TrainerCallback):
            def on_train_end(self, *a, **k):
                ends.append(len(calls))

        tr.add_callback(_End())
        tr.train()
    assert len(marks) == STEPS and len(tr.state.log_history) == STEPS // LOG_EVERY + 1
    bounds = marks + ends
    per_step = [Counter(calls.where[a:b]) for a, b in itertools.pairwise(bounds)]
    assert calls.where[:marks[0]] == [], "syncs before the first step"
    return per_step, Counter(calls.where[ends[0]:]), batches


def _mask_syncs(step_batches: list[dict]) -> int:
    return sum(1 + int(not bool(b["attention_mask"].all())) for b in step_batches)


@pytest.mark.parametrize("loss_type", ["shiq", "dpo", "copg", "dro"])
def test_a_training_run_syncs_only_in_the_model_and_at_logging(tmp_path, loss_type):
    per_step, after_end, batches = _train_counting(tmp_path, loss_type)
    padded = [sum(not bool(b["attention_mask"].all()) for b in bs) for bs in batches]
    assert 0 < sum(padded) < STEPS * ACCUM, padded  # both cases of the model's mask check occur
    for step, (seen, bs) in enumerate(zip(per_step, batches), start=1):
        expected = Counter({MODEL_MASK: _mask_syncs(bs)})
        if step % LOG_EVERY == 0:
            expected += LOGGING
        if step == STEPS:
            expected += RUN_END
        assert seen == expected, f"step {step}: {dict(seen)} != {dict(expected)}"
    # per micro-batch: 1 or 2 in the model (the mask), 0 of ours or Trainer's; + 3 per logging step, 1 per run
    assert sum(sum(c.values()) for c in per_step) == sum(map(_mask_syncs, batches)) + 2 * 3 + 1
    assert after_end == Counter()


def test_transformers_nan_inf_filter_would_cost_two_syncs_per_micro_batch(tmp_path):
    """Why ShiQConfig turns ``logging_nan_inf_filter`` off: Trainer's loop reads
    ``torch.isnan(tr_loss_step) or torch.isinf(tr_loss_step)`` on the host after every micro-batch."""
    assert ShiQConfig(output_dir=str(tmp_path), use_cpu=True).logging_nan_inf_filter is False
    per_step, _, batches = _train_counting(tmp_path, "shiq", logging_nan_inf_filter=True)
    filt = Counter({"transformers/trainer.py:_run_epoch": 2 * ACCUM})
    assert per_step[0] == Counter({MODEL_MASK: _mask_syncs(batches[0])}) + filt
