"""The configuration of a training run: :class:`RunArguments` (model, data, adapters) and :class:`ShiQConfig`.

``ShiQConfig`` is ``transformers.TrainingArguments`` plus the ShiQ fields (TRL keeps ``dpo_config.py`` beside
``dpo_trainer.py`` the same way). Both are parsed from YAML + flags by :func:`shiq_lab.infra.config.parse_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from shiq_lab.data.formats import TRUNCATION_POLICIES
from shiq_lab.lm.stats import LOGITS_MODES
from shiq_lab.losses import LOSS_TYPES

__all__ = ["RunArguments", "ShiQConfig"]

@dataclass
class RunArguments:
    """Model, data and adapter fields of a run (the training fields live in ``ShiQConfig``)."""

    model: str = field(default="tiny", metadata={"help": "registered model name (shiq-lab models list), folder or hub id"})
    ref_model: str | None = field(default=None, metadata={"help": "separate reference model (default: the model itself)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 | auto"})
    dataset: str = field(default="synthetic", metadata={
        "help": "file (.jsonl/.json/.csv/.parquet), save_to_disk folder, 'synthetic[:kind]' or 'package.module:function'"})
    dataset_kwargs: str | None = field(default=None, metadata={"help": "JSON object of keyword arguments for the dataset"})
    eval_dataset: str | None = field(default=None, metadata={"help": "evaluation dataset, same forms as dataset"})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "hold out this fraction of the prompts (with all their responses) for evaluation"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first n rows of the dataset"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (reference = adapters disabled)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps theta = ref exact at start)"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names or all-linear"})


@dataclass
class ShiQConfig(TrainingArguments):
    """``TrainingArguments`` plus the ShiQ fields (each one is also a ``shiq-lab train`` flag)."""

    loss_type: str = field(default="shiq", metadata={"help": "loss: shiq | dpo | dro | copg"})
    beta: float = field(default=0.1, metadata={"help": "KL weight beta > 0"})
    horizon: int | None = field(default=None, metadata={
        "help": "shiq: None = full path (the ShiQ loss), n = n-step residuals with a bootstrap"})
    detach_bootstrap: bool = field(default=False, metadata={"help": "shiq with horizon: stop-gradient on the bootstrap value"})
    loss_reduction: str = field(default="token", metadata={
        "help": "shiq: 'token' (mean over response tokens) or 'sequence' (mean of per-sequence means)"})
    max_length: int = field(default=512, metadata={"help": "max tokens per row (prompt + response)"})
    truncation: str = field(default="truncate", metadata={
        "help": "rows longer than max_length: 'truncate' (cut the response, keep its return), 'drop' or 'error'"})
    add_eos: bool = field(default=True, metadata={"help": "append EOS to text completions (they are finished responses)"})
    reward_normalization: str = field(default="none", metadata={"help": "'none' or 'zscore' (of sequence returns)"})
    chosen_reward: float = field(default=1.0, metadata={"help": "reward of 'chosen' in preference data"})
    rejected_reward: float = field(default=0.0, metadata={"help": "reward of 'rejected' in preference data"})
    allow_zero_rewards: bool = field(default=False, metadata={
        "help": "accept multi-turn data in which no assistant turn has a reward (all rewards 0, on purpose)"})
    ref_cache_dir: str | None = field(default=None, metadata={
        "help": "reference-statistics cache folder (default: $SHIQ_LAB_CACHE/ref_stats)"})
    use_ref_cache: bool = field(default=True, metadata={"help": "read / write the reference-statistics cache"})
    ref_stats_path: str | None = field(default=None, metadata={
        "help": "entry written by `shiq-lab precompute-ref --output`; must match the data and reference"})
    reference_id: str | None = field(default=None, metadata={
        "help": "identity of the reference for the cache key (e.g. name@revision) instead of a weights hash"})
    ref_batch_size: int = field(default=8, metadata={"help": "batch size of the reference precompute"})
    logits_mode: str = field(default="auto", metadata={
        "help": "'chunked' (no [B,T,V] tensor), 'chunked-compiled' (the same kernel through torch.compile: triton "
                "on CUDA, a C++ compiler on CPU), 'full' (model logits; FSDP / ZeRO-3 / soft-capping) or 'auto'"})
    logits_chunk_size: int | None = field(default=None, metadata={"help": "tokens per tile of the chunked log-probs"})
    # bf16/fp16: the output layer's matmuls follow autocast by default, as the model's own lm_head, SFT, TRL and
    # Liger do (in fp32 they are ~15x slower on a GPU's tensor cores without TF32). fp32 logits are the precise
    # option for Q-values (bf16 keeps ~3 significant digits of a logit); logsumexp and gradients are fp32 either way
    cast_lm_head_to_fp32: bool = field(default=False, metadata={
        "help": "bf16/fp16: run the output layer (the Q-values) in fp32 instead of the autocast dtype (slower)"})
    value_head_learning_rate: float | None = field(default=None, metadata={
        "help": "dro: learning rate of the value head (default: learning_rate)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: the loss reads its own columns"})
    logging_steps: float = field(default=1, metadata={"help": "log every n steps (loss, kl, tokens/s)"})
    # off (transformers: on): the filter reads every micro-batch's loss on the host, `torch.isnan(tr_loss_step) or
    # torch.isinf(tr_loss_step)` in Trainer._run_epoch: two device syncs per micro-batch (issue 14). Off, a
    # non-finite loss is logged as it is (a NaN in the log, not the average of earlier losses); gradients are the same
    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "replace NaN/Inf losses in the logs by earlier averages (costs 2 host syncs per micro-batch)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "train into an output_dir that holds another run's outputs, deleting its checkpoints (else refused)"})

    def __post_init__(self) -> None:
        from shiq_lab.train.validation import validate_config

        validate_config(self)  # ranges and types, before TrainingArguments' own set-up (issue 12)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: choose one of {LOSS_TYPES}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta={self.beta!r}: must be > 0 (the KL weight)")
        if self.horizon is not None and (self.horizon < 1 or self.loss_type != "shiq"):
            raise ValueError(f"horizon={self.horizon!r}: an int >= 1, and only for loss_type='shiq'")
        if self.loss_reduction not in ("token", "sequence"):
            raise ValueError(f"loss_reduction={self.loss_reduction!r}: choose 'token' or 'sequence'")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation={self.truncation!r}: choose one of {TRUNCATION_POLICIES}")
        if self.reward_normalization not in ("none", "zscore"):
            raise ValueError(f"reward_normalization={self.reward_normalization!r}: choose 'none' or 'zscore'")
        if self.logits_mode not in LOGITS_MODES:
            raise ValueError(f"logits_mode={self.logits_mode!r}: choose one of {', '.join(map(repr, LOGITS_MODES))}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the reward and reference columns: leave it False")
        # non-reentrant checkpointing works with frozen embeddings (LoRA) without extra hooks; the field
        # was renamed activation_checkpointing_kwargs in transformers 5.2x (older name kept as an alias)
        name = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") \
            else "gradient_checkpointing_kwargs"
        if getattr(self, name) is None and getattr(self, "gradient_checkpointing_kwargs", None) is None:
            setattr(self, name, {"use_reentrant": False})
        # every parameter of a causal LM (and of the DRO value head) gets a gradient in every step: DDP's
        # search for unused ones only costs a graph traversal and warns at each step that it found none
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        super().__post_init__()
