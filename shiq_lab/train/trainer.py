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

The loss. The policy's per-token ``(logp, logz)`` come from :func:`shiq_lab.reference.token_stats`
(final hidden states x output layer, tile by tile: no [B, T, V] fp32 tensor), the same function
that computed the reference's, so at theta = ref every ShiQ residual is exactly 0. Normalisation:
the loss of a micro-batch is its sum of per-item terms divided by the number of items of the whole
optimizer step (all gradient-accumulation micro-batches on all processes; items = response tokens
for ShiQ, sequences for DRO and ShiQ with ``loss_reduction="sequence"``, pairs for DPO and CoPG),
so the optimised and logged loss is the plain mean over the global batch, whatever the number of
processes or accumulation steps.

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

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from shiq_lab.data.batch import ShiQCollator, group_by_prompt
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.rewards import normalize_rewards
from shiq_lab.lm.stats import causal_lm_parts, resolve_logits_mode, token_stats
from shiq_lab.losses import copg_loss, dpo_loss, dro_loss, shiq_loss
from shiq_lab.reference.cache import precompute_reference
from shiq_lab.train.config import ShiQConfig

__all__ = ["ShiQConfig", "ShiQTrainer", "ValueHead", "VALUE_HEAD_NAME", "VALUE_HEAD_FILE", "autocast_dtype"]

logger = logging.getLogger(__name__)

VALUE_HEAD_NAME = "shiq_value_head"
VALUE_HEAD_FILE = "shiq_value_head.safetensors"
_PAIRWISE = {"dpo": "preference", "copg": "all"}




class ValueHead(nn.Module):
    """DRO's V_phi(x): a zero-initialised linear map of the prompt's final hidden state, in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


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
        self._metric_sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._last_log_time: float | None = None

        if args.loss_type == "dro":
            core, _, head = causal_lm_parts(model)
            hidden_size = getattr(core.config, "hidden_size", None) or head.weight.shape[1]
            if not hasattr(model, VALUE_HEAD_NAME):
                setattr(model, VALUE_HEAD_NAME, ValueHead(hidden_size))

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
            data_collator = ShiQCollator(processing_class.pad_token_id, pair_mode=_PAIRWISE.get(args.loss_type))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._logits_mode = self._pick_logits_mode()
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
                                  add_eos=args.add_eos, preference_rewards=(args.chosen_reward, args.rejected_reward))
        if args.reward_normalization != "none":
            ds, stats = normalize_rewards(ds, args.reward_normalization,
                                          stats=None if split == "train" else self.reward_stats)
            if split == "train":
                self.reward_stats = stats
        if not {"ref_logp", "ref_logz"} <= set(ds.column_names):
            with args.main_process_first(desc=f"reference statistics ({split})"):
                ds = precompute_reference(
                    reference, ds, batch_size=args.ref_batch_size, cache_dir=args.ref_cache_dir,
                    use_cache=args.use_ref_cache, stats_path=stats_path, reference_id=args.reference_id,
                    chunk_size=args.logits_chunk_size, logits_mode=args.logits_mode,
                    autocast_dtype=autocast_dtype(args))
        if args.loss_type in _PAIRWISE:
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
            if self.is_fsdp_enabled or zero3:
                logger.info("FSDP / ZeRO-3 shard the output layer: using the model's own logits (logits_mode='full')")
                return "full"
        return resolve_logits_mode(self.model, mode)

    def _loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of terms the loss averages over in one micro-batch."""
        lt = self.args.loss_type
        if lt in _PAIRWISE:
            return int(batch["pairs"].shape[0])
        if lt == "shiq" and self.args.loss_reduction == "token":
            return int(batch["action_mask"][:, 1:].sum())
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
        count = torch.tensor(float(sum(self._loss_items(b) for b in batch_samples)), device=device)
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
        logp, logz, hidden = token_stats(model, ids, am, mask, chunk_size=a.logits_chunk_size,
                                         logits_mode=self._logits_mode, return_hidden=True)
        lp, lz, m = logp[:, 1:], logz[:, 1:], mask[:, 1:]
        rlp, rlz, r = inputs["ref_logp"][:, 1:], inputs["ref_logz"][:, 1:], inputs["token_rewards"][:, 1:]
        count = self._loss_items(inputs)
        if a.loss_type in _PAIRWISE and count == 0:
            # no pair on this process this step: a zero loss that still touches the graph (DDP)
            return None, 0, (lp * m).sum() * 0.0
        if a.loss_type == "shiq":
            out = shiq_loss(lp, lz, rlp, rlz, r, m, beta=a.beta, horizon=a.horizon,
                            detach_bootstrap=a.detach_bootstrap, reduction=a.loss_reduction)
        elif a.loss_type == "dpo":
            pairs = inputs["pairs"]
            out = dpo_loss(lp, rlp, m, beta=a.beta, chosen=pairs[:, 0], rejected=pairs[:, 1])
        elif a.loss_type == "copg":
            out = copg_loss(lp, rlp, r, m, beta=a.beta, pairs=inputs["pairs"])
        else:  # dro
            head = getattr(_unwrap(model), VALUE_HEAD_NAME)
            rows = torch.arange(ids.shape[0], device=ids.device)
            prompt_state = hidden[rows, inputs["prompt_length"] - 1].detach()
            out = dro_loss(lp, rlp, r, m, head(prompt_state), beta=a.beta)
        self._record("train" if model.training else "eval", out, count, lp.detach(), rlp, m, int(am.sum()))
        return out, count, None

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

    def _record(self, split: str, out: Any, count: int, lp: torch.Tensor, rlp: torch.Tensor, m: torch.Tensor,
                tokens: int) -> None:
        sums = self._metric_sums[split]
        with torch.no_grad():
            lr = torch.where(m.bool(), lp - rlp, torch.zeros((), dtype=lp.dtype, device=lp.device))
            # r ln r - r + 1 (r = pi/ref): unbiased for KL(pi||ref) under ref's samples (E_ref[r] = 1),
            # and never negative term by term
            ratio = lr.exp()
            kl = torch.where(m.bool(), ratio * lr - ratio + 1, torch.zeros((), dtype=lp.dtype, device=lp.device)).sum(1)
            n_seq = float(m.shape[0])
            add = {"kl": float(kl.sum()), "logratio": float(lr.sum()), "sequences": n_seq, "tokens": float(tokens),
                   "items": float(count)}
        for k, v in out.metrics.items():
            if k in ("loss", "logratio_seq_mean"):  # the loss itself is logged by Trainer, logratio above
                continue
            # per-sequence means add up weighted by sequences, the others by the loss's items (tokens,
            # sequences or pairs), so a logged mean is the global batch's whatever the split
            per_sequence = "_seq_" in k or k.startswith(("first_", "value"))
            add[("s:" if per_sequence else "i:") + k] = v * (n_seq if per_sequence else count)
        for k, v in add.items():
            sums[k] = sums.get(k, 0.0) + v

    def _metrics(self, split: str) -> dict[str, float]:
        """Averages of the recorded metrics since the last call, over all processes."""
        sums = self._metric_sums[split]
        keys = sorted(sums)
        if self.args.world_size > 1:
            # every process logs at the same steps, so they all hold the same keys
            t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
            t = self.accelerator.reduce(t, reduction="sum")
            sums = dict(zip(keys, t.tolist()))
        self._metric_sums[split] = {}
        if not sums or sums.get("sequences", 0) == 0:
            return {}
        n_seq, items = sums["sequences"], max(sums["items"], 1.0)
        logs = {"kl": sums["kl"] / n_seq, "logratio": sums["logratio"] / n_seq}
        logs.update({k[2:]: v / (n_seq if k[0] == "s" else items) for k, v in sums.items() if k[:2] in ("s:", "i:")})
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

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        self._metric_sums["eval"] = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for k, v in self._metrics("eval").items():
            output.metrics[f"{prefix}_{k}"] = v
        return output

    # ------------------------------------------------------------------------------------------
    # DRO value head: optimiser group, save, resume
    # ------------------------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        head = getattr(_unwrap(self.model), VALUE_HEAD_NAME, None)
        lr = self.args.value_head_learning_rate
        if head is not None and lr is not None:
            ids = {id(p) for p in head.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": list(head.parameters()), "lr": lr, "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        holder = _unwrap(self.model)
        head = holder._modules.pop(VALUE_HEAD_NAME, None)
        try:
            if state_dict is not None:
                state_dict = {k: v for k, v in state_dict.items() if VALUE_HEAD_NAME not in k}
            super()._save(output_dir, state_dict=state_dict)
        finally:
            if head is not None:
                holder._modules[VALUE_HEAD_NAME] = head
        if head is not None and self.args.should_save:
            from safetensors.torch import save_file

            os.makedirs(output_dir, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                      os.path.join(output_dir, VALUE_HEAD_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        holder = _unwrap(model if model is not None else self.model)
        head = holder._modules.pop(VALUE_HEAD_NAME, None)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            if head is not None:
                holder._modules[VALUE_HEAD_NAME] = head
        path = os.path.join(resume_from_checkpoint, VALUE_HEAD_FILE)
        if head is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {VALUE_HEAD_FILE}: it was not written by a "
                                        "dro run, so the value head cannot be resumed")
            from safetensors.torch import load_file

            head.load_state_dict(load_file(path, device=str(next(head.parameters()).device)))


def autocast_dtype(args: TrainingArguments) -> torch.dtype | None:
    """The mixed-precision compute dtype training will use (None in full precision)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


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
