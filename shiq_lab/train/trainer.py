"""ShiQ on the Hugging Face stack: ``ShiQConfig`` (TrainingArguments) and ``ShiQTrainer`` (Trainer).

Users get what ``transformers.Trainer`` gives (gradient accumulation, mixed precision, checkpoints
and resume, TensorBoard logging, progress bars, multi-GPU through accelerate) with the losses of
:mod:`shiq_lab.losses`::

    from shiq_lab.train.trainer import ShiQConfig, ShiQTrainer
    args = ShiQConfig(output_dir="runs/x", loss_type="shiq", beta=0.1, max_steps=100,
                      per_device_train_batch_size=8, learning_rate=1e-5, report_to="tensorboard")
    trainer = ShiQTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()

What happens to ``train_dataset`` (any format of :mod:`shiq_lab.data`), in :meth:`ShiQTrainer.prepare_dataset`:
tokenisation and validation -> reward normalisation (``reward_normalization``) -> reference
statistics ``ref_logp`` / ``ref_logz`` through the on-disk cache (:mod:`shiq_lab.reference`; the
reference is the model as given, adapters disabled for PEFT, or ``ref_model=`` which is then
dropped: no reference model is held during training) -> for DPO / CoPG, one row per prompt group, so
a batch never splits a prompt's responses (``per_device_train_batch_size`` then counts prompts).

The loss. The policy's per-token ``(logp, logz)`` come from :func:`shiq_lab.lm.stats.token_stats`
(final hidden states x output layer, tile by tile: no [B, T, V] fp32 tensor), the same function
that computed the reference's, so at theta = ref every ShiQ residual is exactly 0. Normalisation:
the loss of a micro-batch is its sum of per-item terms divided by the number of items of the whole
optimizer step (all gradient-accumulation micro-batches on all processes; items = response tokens
for ShiQ, sequences for DRO and ShiQ with ``loss_reduction="sequence"``, pairs for DPO and CoPG),
so the optimised and logged loss is the plain mean over the global batch, whatever the number of
processes or accumulation steps.

Mixed precision (``bf16`` / ``fp16``): accelerate autocasts the model's forward only, so the step puts the
kernel under the same autocast; the output layer's matmuls then run in bf16 like the model's own
``lm_head`` (and SFT's, TRL's, Liger's), with logsumexp and gradients accumulated in fp32.
``cast_lm_head_to_fp32=True`` keeps them in fp32 (precise logits, i.e. Q-values; slower on tensor
cores). The reference precompute runs the same way, and the cache tells the two apart.

No host syncs in the step (issue 14): datasets are validated once in :meth:`prepare_dataset` (token
ids, masks, finite rewards), so the step runs the losses and the kernel under
:func:`shiq_lab.losses.trusted_inputs`; the collator computes the response positions on the host
(``action_positions``); metrics are summed as device tensors and read once per logging step, each
weighted by the unit its loss declares (``LossOutput.metric_reduction``), never by its name.

The syncs that remain in ``train()`` (counted, by origin, per optimizer step in ``tests/test_step_syncs.py``;
line numbers of transformers 5.24): per micro-batch, only the model's own forward, whose attention mask
reads the padding mask in ``masking_utils._ignore_causal_mask_sdpa`` (``fast_all(padding_mask)``, l. 292,
plus the prefill check ``fast_all(padding_mask[:, :q_length])``, l. 298, when the micro-batch is padded);
per logging step, three: Trainer's ``_maybe_log_save_evaluate`` reads the loss (``...mean().item()``,
l. 2257) and the grad norm (``grad_norm.item()``, l. 2264), and :meth:`ShiQTrainer._metrics` reads all
our metrics with one ``tolist()``; once per run, ``_finalize_training`` reads the unlogged loss (l. 2006).
So ``logging_steps`` (1 by default) sets how often the host waits. Settings that add syncs, all off by
default here: ``logging_nan_inf_filter`` (Trainer's ``_run_epoch`` tests ``torch.isnan(tr_loss_step) or
torch.isinf(tr_loss_step)``, l. 1919-1922: two per micro-batch; :class:`ShiQConfig` turns it off, so a
non-finite loss is logged as it is), ``include_num_input_tokens_seen`` (``_track_num_input_tokens``,
``.item()`` per micro-batch, l. 2748), ``fp16`` (the grad scaler reads ``found_inf`` each optimizer step;
``bf16`` does not) and DeepSpeed (``_get_grad_norm`` calls ``.item()`` each step). Gradient clipping and
the default fused AdamW read nothing. Sampling and collating read CPU tensors only (not device syncs).

Choices stated here:

- DRO's value V_phi(x) is a linear head (zero-initialised, so V = 0 at start) on the final hidden
  state of the prompt's last token, attached as ``model.shiq_value_head`` and trained jointly. Its
  input is detached: the value fits the returns without moving the policy's features, so the
  policy's gradient is DRO's. It is saved next to checkpoints as ``shiq_value_head.safetensors``
  (not inside the model's weights, which stay a plain checkpoint).
- Logged every logging step (``logging_steps=1`` by default): ``loss``; ``kl``, the sum over a
  response's tokens of the per-state KL(pi||ref)(s_t) at the dataset's states, each estimated from
  the data token by importance weighting, r ln r - r + 1 with r = pi/ref (unbiased per state when
  the responses were sampled from the reference, the usual offline set-up; the KL of the policy's
  own generations is what evaluation measures); ``logratio`` (mean sequence ln pi/ref);
  ``tokens_per_second`` (all processes, padding excluded); and the loss's own metrics
  (``residual_abs_mean``, ...).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from shiq_lab.data.batch import ShiQCollator, group_by_prompt
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.rewards import normalize_rewards
from shiq_lab.lm.modes import unwrap
from shiq_lab.lm.stats import action_positions, causal_lm_parts, resolve_logits_mode, token_stats
from shiq_lab.lm.value_head import (
    VALUE_HEAD_FILE,
    VALUE_HEAD_NAME,
    ValueHead,
    attach_value_head,
    load_value_head,
    save_value_head,
    value_head_of,
)
from shiq_lab.losses import LOSSES, LossOutput, copg_loss, dpo_loss, dro_loss, shiq_loss, trusted_inputs
from shiq_lab.reference.cache import precompute_reference
from shiq_lab.train.config import ShiQConfig

__all__ = ["ShiQConfig", "ShiQTrainer", "ValueHead", "VALUE_HEAD_NAME", "VALUE_HEAD_FILE", "autocast_dtype"]

logger = logging.getLogger(__name__)





class _WithPositions:
    """A collator whose batches also carry ``action_positions`` (:func:`shiq_lab.lm.stats.action_positions`).

    Computed here, on the host, before the batch moves to the device: the step then gathers the
    response states with an index whose length the host already knows (no device sync).
    """

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        if "action_mask" in batch and "action_positions" not in batch:
            batch["action_positions"] = action_positions(batch["action_mask"])
        return batch


class ShiQTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ShiQ (or DPO / DRO / CoPG) on offline reward data.

    Args:
        model: a causal LM (``PreTrainedModel`` or ``peft.PeftModel``). It is also the reference,
            unless ``ref_model`` is given (adapters disabled for a PEFT model).
        args: a :class:`ShiQConfig`.
        train_dataset, eval_dataset: any format of :mod:`shiq_lab.data`, raw or tokenised.
        processing_class: the tokenizer (needed for raw data and for its pad token).
        ref_model: optional separate reference; used for the precompute only, never kept.
        peft_config: optional ``peft`` config: the model is wrapped with ``get_peft_model``.
        Other keyword arguments go to ``transformers.Trainer``.

    Attributes: ``reward_stats`` (normalisation mean / std of the training returns).
    """

    # compute_loss divides by the item count of the whole accumulated, all-process batch itself
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        args: ShiQConfig,
        train_dataset: Dataset | list[dict] | None = None,
        eval_dataset: Dataset | list[dict] | None = None,
        processing_class: Any = None,
        *,
        ref_model: nn.Module | None = None,
        peft_config: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ):
        if not isinstance(args, ShiQConfig):
            raise TypeError(f"args must be a ShiQConfig (got {type(args).__name__}): it carries beta, loss_type, ...")
        if processing_class is None:
            raise ValueError("processing_class=None: pass the tokenizer (processing_class=tokenizer); it tokenises the "
                             "data and gives the pad token")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.reward_stats: dict[str, float] = {"mean": 0.0, "std": 1.0}
        # per split: running sums of metrics as device tensors, read once per logging step
        self._metric_sums: dict[str, dict[str, torch.Tensor | float]] = {"train": {}, "eval": {}}
        self._last_log_time: float | None = None

        if args.loss_type == "dro":
            core, _, head = causal_lm_parts(model)
            attach_value_head(model, getattr(core.config, "hidden_size", None) or head.weight.shape[1])

        # The reference statistics are computed where training will run (one process computes and
        # writes the cache, the others read it).
        reference = ref_model if ref_model is not None else model
        ref_home = _place(reference, args)
        if ref_model is not None:
            _place(model, args)
        if train_dataset is not None:
            train_dataset = self.prepare_dataset(train_dataset, reference, args, processing_class, split="train",
                                                 stats_path=args.ref_stats_path)
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self.prepare_dataset(v, reference, args, processing_class, split=f"eval[{k}]")
                                for k, v in eval_dataset.items()}
            else:
                eval_dataset = self.prepare_dataset(eval_dataset, reference, args, processing_class, split="eval")
        if ref_model is not None and ref_home is not None:
            ref_model.to(ref_home)  # give the training device back: the reference is not used any more
        del reference, ref_model

        if data_collator is None:
            data_collator = ShiQCollator(processing_class.pad_token_id, pair_mode=LOSSES[args.loss_type].pairing)
        data_collator = _WithPositions(data_collator)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._logits_mode = self._pick_logits_mode()
        if args.cast_lm_head_to_fp32 and autocast_dtype(args) is not None and self._logits_mode == "full":
            logger.warning("cast_lm_head_to_fp32=True has no effect with logits_mode='full' (the model's own lm_head, "
                           "used under FSDP / ZeRO-3 or when asked for, runs in the autocast dtype): the Q-values are "
                           "computed in %s", str(autocast_dtype(args)).replace("torch.", ""))
        from shiq_lab.train.progress import install as _compact_logging

        _compact_logging(self)  # one short line per logging step; TensorBoard events in output_dir
        # transformers < 5.2x has no loss_is_scaled_for_ga: it reads this flag to decide that the loss is
        # already normalised over the accumulated batch (compute_loss below does that for every model)
        self.model_accepts_loss_kwargs = True

    # ------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------

    def prepare_dataset(
        self,
        ds: Dataset | list[dict],
        reference: nn.Module,
        args: ShiQConfig,
        tokenizer: Any,
        *,
        split: str = "train",
        stats_path: str | None = None,
    ) -> Dataset:
        """Tokenise (if raw), normalise rewards, attach reference statistics, group (DPO / CoPG).

        A dataset this method already prepared for a pairwise loss (one row per group) is returned
        as it is.
        """
        if isinstance(ds, Dataset) and {"input_ids", "ref_logp"} <= set(ds.column_names) and len(ds) \
                and isinstance(ds[0]["input_ids"][0], list):
            return ds
        if not isinstance(ds, Dataset) or not {"input_ids", "action_mask", "token_rewards"} <= set(ds.column_names):
            ds = tokenize_dataset(ds, tokenizer, max_length=args.max_length, truncation=args.truncation,
                                  add_eos=args.add_eos, preference_rewards=(args.chosen_reward, args.rejected_reward),
                                  allow_zero_rewards=args.allow_zero_rewards)
        if args.reward_normalization != "none":
            ds, stats = normalize_rewards(ds, args.reward_normalization,
                                          stats=None if split == "train" else self.reward_stats)
            if split == "train":
                self.reward_stats = stats
        _check_rows(ds, reference, split)  # once per dataset: the step then checks nothing
        if not {"ref_logp", "ref_logz"} <= set(ds.column_names):
            with args.main_process_first(desc=f"reference statistics ({split})"):
                ds = precompute_reference(
                    reference, ds, batch_size=args.ref_batch_size, cache_dir=args.ref_cache_dir,
                    use_cache=args.use_ref_cache, stats_path=stats_path, reference_id=args.reference_id,
                    chunk_size=args.logits_chunk_size, logits_mode=_reference_logits_mode(args),
                    autocast_dtype=autocast_dtype(args), cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        if LOSSES[args.loss_type].pairwise:
            ds = group_by_prompt(ds)
            if args.loss_type == "dpo":
                before = len(ds)
                ds = ds.select([i for i, row in enumerate(ds) if _has_distinct_returns(row)])
                if len(ds) < before:
                    logger.warning("dpo: dropped %d of %d prompts whose responses all have the same return (no "
                                   "preference)", before - len(ds), before)
                if len(ds) == 0:
                    raise ValueError("dpo: no prompt has two responses with different rewards, so there is no preference")
        return ds

    # ------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------

    def _pick_logits_mode(self) -> str:
        mode = self.args.logits_mode
        if mode == "auto":
            zero3 = self.is_deepspeed_enabled and getattr(
                getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3
            if self.is_fsdp_enabled or zero3 or output_layer_sharded(self.args):
                logger.info("FSDP / ZeRO-3 shard the output layer: using the model's own logits (logits_mode='full')")
                return "full"
        return resolve_logits_mode(self.model, mode)

    def _loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """Number of terms the loss averages over in one micro-batch (a device tensor for tokens: no sync)."""
        lt = self.args.loss_type
        if LOSSES[lt].pairwise:
            return int(batch["pairs"].shape[0])  # a shape: known on the host
        if lt == "shiq" and self.args.loss_reduction == "token":
            if "action_positions" in batch:
                return int(batch["action_positions"].shape[0])
            return batch["action_mask"][:, 1:].sum()
        return int(batch["input_ids"].shape[0])

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and their item count (see :meth:`_get_num_items_in_batch`)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Items of the whole optimizer step: every micro-batch, summed over processes."""
        if not batch_samples:
            return None
        count = torch.stack([torch.as_tensor(self._loss_items(b), dtype=torch.float32, device=device).reshape(())
                             for b in batch_samples]).sum()
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def _loss_terms(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """The loss's :class:`~shiq_lab.losses.LossOutput` on a micro-batch, its item count, and logratios."""
        if "ref_logp" not in inputs:
            raise ValueError("the batch has no ref_logp / ref_logz: datasets given to ShiQTrainer get them in "
                             "prepare_dataset; a custom collator must keep those columns")
        ids, am, mask = inputs["input_ids"], inputs["attention_mask"], inputs["action_mask"]
        a = self.args
        # the data were validated once per dataset (prepare_dataset): no value checks, hence no host syncs, here
        with trusted_inputs():
            # accelerate puts only the model's forward under autocast; the output layer (our kernel, outside it)
            # gets the same mixed precision here, as in the reference precompute (prepare_dataset)
            with self.accelerator.autocast():
                logp, logz, hidden = token_stats(model, ids, am, mask, chunk_size=a.logits_chunk_size,
                                                 logits_mode=self._logits_mode, return_hidden=True,
                                                 positions=inputs.get("action_positions"),
                                                 cast_lm_head_to_fp32=a.cast_lm_head_to_fp32)
            lp, lz, m = logp[:, 1:], logz[:, 1:], mask[:, 1:]
            rlp, rlz, r = inputs["ref_logp"][:, 1:], inputs["ref_logz"][:, 1:], inputs["token_rewards"][:, 1:]
            count = self._loss_items(inputs)
            if LOSSES[a.loss_type].pairwise and count == 0:  # count is a shape here: no sync
                # no pair on this process this step: a zero loss that still touches the graph (DDP)
                return None, 0, (lp * m).sum() * 0.0
            out = self._loss(model, inputs, hidden, lp, lz, m, rlp, rlz, r)
        self._record("train" if model.training else "eval", out, count, lp.detach(), rlp, m, am.sum(),
                     n_pairs=int(inputs["pairs"].shape[0]) if "pairs" in inputs else 0)
        return out, count, None

    def _loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], hidden: torch.Tensor, lp: torch.Tensor,
              lz: torch.Tensor, m: torch.Tensor, rlp: torch.Tensor, rlz: torch.Tensor, r: torch.Tensor) -> LossOutput:
        a = self.args
        if a.loss_type == "shiq":
            out = shiq_loss(lp, lz, rlp, rlz, r, m, beta=a.beta, horizon=a.horizon,
                            detach_bootstrap=a.detach_bootstrap, reduction=a.loss_reduction)
            return out
        if a.loss_type == "dpo":
            pairs = inputs["pairs"]
            return dpo_loss(lp, rlp, m, beta=a.beta, chosen=pairs[:, 0], rejected=pairs[:, 1])
        if a.loss_type == "copg":
            return copg_loss(lp, rlp, r, m, beta=a.beta, pairs=inputs["pairs"])
        # dro
        head = value_head_of(model)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        prompt_state = hidden[rows, inputs["prompt_length"] - 1].detach()
        return dro_loss(lp, rlp, r, m, head(prompt_state), beta=a.beta)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Sum of this micro-batch's loss terms / items of the whole optimizer step (see module doc)."""
        out, count, zero = self._loss_terms(model, inputs)
        if out is None:
            loss = zero
        elif model.training and num_items_in_batch is not None:
            scale = self.accelerator.num_processes if (self.args.world_size > 1 and self.args.average_tokens_across_devices) else 1
            loss = out.loss * (count * scale) / num_items_in_batch
        elif model.training:
            loss = out.loss / self.current_gradient_accumulation_steps
        else:
            loss = out.loss
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the batch's mean loss (no predictions are gathered)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------
    # metrics and logging
    # ------------------------------------------------------------------------------------------

    def _record(self, split: str, out: LossOutput, count: torch.Tensor | int, lp: torch.Tensor, rlp: torch.Tensor,
                m: torch.Tensor, tokens: torch.Tensor, *, n_pairs: int = 0) -> None:
        """Add this micro-batch's metrics to the running sums, as device tensors (no host sync)."""
        sums = self._metric_sums[split]
        with torch.no_grad():
            bm = m.bool()
            zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
            lr = torch.where(bm, lp - rlp, zero)
            # r ln r - r + 1 (r = pi/ref): unbiased for KL(pi||ref) under ref's samples (E_ref[r] = 1),
            # and never negative term by term
            ratio = lr.exp()
            kl = torch.where(bm, ratio * lr - ratio + 1, zero).sum(1)
            n_seq = m.shape[0]
            # each metric is a mean over its declared unit: weight it by that unit's count here, so a
            # logged mean is the global batch's whatever the split into micro-batches and processes
            units = {"token": bm.sum(), "sequence": n_seq, "pair": n_pairs}
            add: dict[str, torch.Tensor | float] = {"kl": kl.sum(), "logratio": lr.sum(), "sequences": float(n_seq),
                                                    "tokens": tokens, "items": count}
            for k, v in out.metrics.items():
                if k in ("loss", "logratio_seq_mean"):  # the loss itself is logged by Trainer, logratio above
                    continue
                unit = out.metric_reduction[k]
                add[f"{unit}:{k}"] = v * units[unit]
                add[f"n:{unit}"] = units[unit]
        for k, v in add.items():
            sums[k] = sums.get(k, 0.0) + v

    def _metrics(self, split: str) -> dict[str, float]:
        """Averages of the recorded metrics since the last call, over all processes (the one host sync)."""
        sums = self._metric_sums[split]
        self._metric_sums[split] = {}
        if not sums:
            return {}
        keys = sorted(sums)
        device = self.args.device
        t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
        if self.args.world_size > 1:
            # every process logs at the same steps, so they all hold the same keys
            t = self.accelerator.reduce(t, reduction="sum")
        sums = dict(zip(keys, t.tolist()))
        if sums.get("sequences", 0) == 0:
            return {}
        n_seq = sums["sequences"]
        logs = {"kl": sums["kl"] / n_seq, "logratio": sums["logratio"] / n_seq}
        for k, v in sums.items():
            unit, _, name = k.partition(":")
            if unit in ("token", "sequence", "pair"):
                logs[name] = v / max(sums[f"n:{unit}"], 1.0)
        if split == "train":
            now = time.perf_counter()
            if self._last_log_time is not None and now > self._last_log_time:
                logs["tokens_per_second"] = sums["tokens"] / (now - self._last_log_time)
            self._last_log_time = now
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._metrics("train")}
        super().log(logs, start_time)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied output layer (lm_head.weight is embed_tokens.weight) is not in the checkpoint: loading the
        # embeddings loads it too, so it is not a missing key (transformers warned on every resume)
        missing = list(getattr(load_result, "missing_keys", []) or [])
        if missing:
            by_storage: dict[int, list[str]] = {}
            for name, param in unwrap(self.model).named_parameters(remove_duplicate=False):
                by_storage.setdefault(param.data_ptr(), []).append(name)
            tied = {n for names in by_storage.values() if len(names) > 1 for n in names}
            load_result = load_result._replace(missing_keys=[k for k in missing if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        self._metric_sums["eval"] = {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        for k, v in self._metrics("eval").items():
            output.metrics[f"{metric_key_prefix}_{k}"] = v
        return output

    # ------------------------------------------------------------------------------------------
    # runs: resume checks and the run record (shiq_lab.train.runs, issue 12)
    # ------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, *, run_fields: dict[str, Any] | None = None,
              **kwargs: Any):
        """``Trainer.train``, resuming only a valid checkpoint of this run, with the whole run's ``training_loss``.

        ``resume_from_checkpoint=True`` (or ``"last"``) takes the newest *valid* checkpoint of
        ``output_dir`` (broken ones, left by a killed save, are skipped with a warning); a checkpoint
        whose run record differs from this config is refused, naming the fields. ``run_fields``:
        extra fields for the record (the CLI's model and data). See :mod:`shiq_lab.train.runs`. A DRO
        run's value head is restored from the checkpoint's :data:`VALUE_HEAD_FILE`.
        """
        from shiq_lab.train import runs

        resume = runs.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            # DRO: the value head lives in its own file; the model's weights (which do not hold it) are then
            # loaded by Trainer without touching it
            load_value_head(self.model, resume)
        record = runs.run_record(self.args, run_fields, train_dataset=self.train_dataset)
        runs.begin(self.args, record, resume)
        self.callback_handler.callbacks = [cb for cb in self.callback_handler.callbacks
                                           if not isinstance(cb, runs.RunRecordCallback)]
        self.add_callback(runs.RunRecordCallback(record))
        start = runs.checkpoint_step(resume) if resume is not None else 0
        output = super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                               **kwargs)
        return runs.whole_run_loss(output, self.state.log_history, start)

    # ------------------------------------------------------------------------------------------
    # DRO value head: optimiser group, save, resume
    # ------------------------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        head = value_head_of(self.model)
        lr = self.args.value_head_learning_rate
        if head is not None and lr is not None:
            ids = {id(p) for p in head.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": list(head.parameters()), "lr": lr, "weight_decay": 0.0})
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (a plain checkpoint: the value head is in its ``_keys_to_ignore_on_save``) and,
        for DRO, the value head next to it as :data:`VALUE_HEAD_FILE`. Checkpoints come through here too."""
        super().save_model(output_dir, _internal_call)
        # every process takes part (FSDP gathers the head's shards); the main one writes
        save_value_head(self.model, output_dir if output_dir is not None else self.args.output_dir,
                        write=self.args.should_save)


def output_layer_sharded(args: TrainingArguments) -> bool:
    """Whether FSDP or DeepSpeed ZeRO-3 will shard the output layer, as the arguments or ``accelerate launch``'s
    environment say (known before the model is wrapped, so the reference precompute can follow the step)."""
    def on(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true")

    if args.fsdp or on("ACCELERATE_USE_FSDP"):
        return True
    hf_ds = getattr(args, "hf_deepspeed_config", None)
    stage = hf_ds.config.get("zero_optimization", {}).get("stage") if hf_ds is not None else None
    stage = stage if stage is not None else os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return (bool(args.deepspeed) or on("ACCELERATE_USE_DEEPSPEED")) and str(stage) == "3"


def _reference_logits_mode(args: ShiQConfig) -> str:
    """The reference precompute's logits mode: the step's (``"full"`` where the output layer will be sharded), so
    that at theta = ref the policy's statistics are the reference's, bit for bit."""
    return "full" if args.logits_mode == "auto" and output_layer_sharded(args) else args.logits_mode


def autocast_dtype(args: TrainingArguments) -> torch.dtype | None:
    """The mixed-precision compute dtype training will use (None in full precision)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def _check_rows(ds: Dataset, model: nn.Module, split: str) -> None:
    """Validate a prepared dataset once (so the step need not): 0/1 action masks with a response token,
    finite rewards on response tokens, token ids in the model's vocabulary. Errors name the row and the fix.

    Vectorised over the flattened Arrow columns (one row per sequence: this runs before group_by_prompt).
    """
    try:
        vocab: int | None = int(causal_lm_parts(model)[2].weight.shape[0])
    except (TypeError, AttributeError):
        vocab = None
    table = (ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds).data.table
    cols = {k: table.column(k).combine_chunks() for k in ("input_ids", "action_mask", "token_rewards")}
    offsets = cols["input_ids"].offsets.to_numpy()
    ids, mask, rewards = (cols[k].flatten().to_numpy(zero_copy_only=False) for k in cols)
    row_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    action = mask != 0
    action[offsets[:-1][np.diff(offsets) > 0]] = False  # position 0 of a row has no state before it

    def fail(bad: np.ndarray, what: str) -> None:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = int(row_of[k])
            raise ValueError(f"{split} dataset, row {row}, position {k - int(offsets[row])}: {what}")

    fail((mask != 0) & (mask != 1), "action_mask must hold only 0 and 1 (1 on tokens the policy generated)")
    empty = np.bincount(row_of[action], minlength=len(offsets) - 1) == 0
    if empty.any():
        raise ValueError(f"{split} dataset, row {int(np.flatnonzero(empty)[0])}: no response token after the first "
                         "position: drop the row (an empty response has nothing to learn)")
    fail((mask != 0) & ~np.isfinite(rewards.astype(np.float64)), "token_rewards are not finite on a response token: "
         "fix or drop the row")
    if vocab is not None:
        fail(action & ((ids < 0) | (ids >= vocab)), f"a token id is not in [0, {vocab}) (the model's vocabulary): "
             "tokenise the data with the model's own tokenizer")


def _place(model: nn.Module, args: ShiQConfig) -> torch.device | None:
    """Move a model to the training device (not sharded / device-mapped ones); returns where it was."""
    if getattr(model, "hf_device_map", None) or args.fsdp or args.deepspeed:
        return None
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return None
    if device != args.device:
        model.to(args.device)
    return device


def _has_distinct_returns(row: dict) -> bool:
    returns = [sum(r * m for r, m in zip(rew, mask)) for rew, mask in zip(row["token_rewards"], row["action_mask"])]
    return max(returns) - min(returns) > 1e-12 and not any(math.isnan(x) for x in returns)
