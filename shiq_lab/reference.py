"""Per-token statistics of a causal LM, and the reference's, computed once and cached on disk.

ShiQ needs the reference only through two numbers per response token: ``ref_logp`` (log-prob of
the action) and ``ref_logz`` (log-partition of the state). For an offline dataset they are computed
once (:func:`precompute_reference`), stored next to nothing else, and reused by every run: the
reference model is never in memory during training.

Public API:

- :func:`token_stats`: ``(logp, logz)`` [B, L] of a causal LM on a batch, aligned to ``input_ids``
  (value at t = statistics of generating token t; 0 off the action mask). It runs the model's
  decoder, then :func:`shiq_lab.fused_logprobs.chunked_token_logprobs` on the final hidden states
  and the output layer, on response tokens only, so no [B, T, V] fp32 tensor exists. The trainer
  uses the same function for the policy, so at theta = ref both sides are bit-identical.
- :func:`precompute_reference`: adds ``ref_logp`` / ``ref_logz`` columns to a tokenised dataset,
  through the cache.
- :func:`dataset_fingerprint`, :func:`reference_identity`: what the cache is keyed by.
- :class:`ReferenceCache`, :class:`StaleReferenceCacheError`.

Cache key: sha256 of (dataset fingerprint = hash of every row's ``input_ids`` and ``action_mask``,
i.e. the data *and* its tokenisation settings; reference identity = model class + architecture
config + a hash of the weights, or a user-given ``reference_id`` such as ``name@revision``; the
statistics' format version). For a PEFT model the reference is the base model, adapters disabled,
and its identity is the base weights'. Entries are written to a temporary folder and renamed into
place, so an interrupted run never leaves a half entry; an entry whose checksum or metadata does not
match is detected and never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from datasets import Dataset
from safetensors.numpy import load_file, save_file

from .fused_logprobs import chunked_token_logprobs
from .losses import token_logprobs

__all__ = [
    "STATS_VERSION",
    "StaleReferenceCacheError",
    "causal_lm_parts",
    "forward_hidden",
    "stats_from_hidden",
    "token_stats",
    "resolve_logits_mode",
    "dataset_fingerprint",
    "reference_identity",
    "ReferenceCache",
    "default_cache_dir",
    "compute_reference_stats",
    "precompute_reference",
    "attach_reference_stats",
    "write_reference_stats",
]

logger = logging.getLogger(__name__)

#: bump when the meaning or layout of stored statistics changes: old entries are then never read
STATS_VERSION = 1

_RUNTIME_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "_commit_hash", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "_experts_implementation", "architectures",
}


class StaleReferenceCacheError(RuntimeError):
    """Stored reference statistics do not belong to this dataset or this reference model."""


# ---------------------------------------------------------------------------------------------
# per-token statistics of a model
# ---------------------------------------------------------------------------------------------


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """``(causal_lm, decoder, output_layer)`` of a possibly wrapped (DDP, PEFT) causal LM."""
    core = model
    while hasattr(core, "module") and isinstance(core.module, torch.nn.Module):  # DDP / accelerate wrappers
        core = core.module
    if hasattr(core, "get_base_model"):  # peft.PeftModel: the causal LM with adapter layers inside
        core = core.get_base_model()
    if not hasattr(core, "get_decoder") or not hasattr(core, "get_output_embeddings"):
        raise TypeError(f"{type(core).__name__} is not a Hugging Face causal LM (no get_decoder / get_output_embeddings)")
    head = core.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(core).__name__} has no output layer (get_output_embeddings() is None)")
    return core, core.get_decoder(), head


def resolve_logits_mode(model: torch.nn.Module, mode: str = "auto") -> str:
    """``"chunked"`` (hidden states x output layer, tile by tile) or ``"full"`` (the model's own logits).

    ``"auto"`` picks ``"chunked"`` unless the output layer cannot be read as a plain [V, H] matrix
    next to the forward pass: logit soft-capping or scaling in the config, an adapter on the output
    layer, or a sharded weight (FSDP / DeepSpeed ZeRO-3), where ``"full"`` is the safe path.
    """
    if mode not in ("auto", "chunked", "full"):
        raise ValueError(f"logits_mode={mode!r}: choose 'auto', 'chunked' or 'full'")
    if mode != "auto":
        return mode
    core, _, head = causal_lm_parts(model)
    cfg = getattr(core, "config", None)
    special = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
               if getattr(cfg, k, None) not in (None, 1, 1.0)]
    weight = getattr(head, "weight", None)
    sharded = weight is None or weight.dim() != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") or \
        type(weight).__name__ == "DTensor"
    if special or hasattr(head, "base_layer") or sharded:
        return "full"
    return "chunked"


def forward_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, full_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, logits)``: [B, L, H] final hidden states (after the last norm), via the model's own forward.

    The call goes through ``model`` itself (so DDP / accelerate / FSDP hooks run) and a forward
    hook on the decoder captures its output. Unless ``full_logits``, ``logits_to_keep=1`` keeps the
    output layer to one position and ``logits`` is None.
    """
    _, decoder, _ = causal_lm_parts(model)
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook)
    try:
        if full_logits:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            try:
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            except TypeError as err:  # architectures without logits_to_keep
                if "logits_to_keep" not in str(err):
                    raise
                captured.clear()
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the decoder's forward hook did not fire: is get_decoder() part of the forward pass?")
    return captured[-1], (out.logits if full_logits else None)


def stats_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, logz)`` [B, L] from final hidden states, on policy tokens only (0 elsewhere).

    Position t holds the statistics of generating ``input_ids[t]`` from the state after t-1
    tokens; position 0 is always 0 (no state before the first token).
    """
    _, _, head = causal_lm_parts(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    mask = action_mask[:, 1:].bool()
    h = hidden[:, :-1]
    if h.dtype != weight.dtype:  # autocast gives low-precision hidden states next to fp32 weights
        h = h.to(weight.dtype)
    with torch.autocast(device_type=h.device.type, enabled=False):
        logp, logz = chunked_token_logprobs(h, weight, input_ids[:, 1:], bias=bias, mask=mask, chunk_size=chunk_size)
    pad = torch.zeros(logp.shape[0], 1, dtype=logp.dtype, device=logp.device)
    return torch.cat([pad, logp], 1), torch.cat([pad, logz], 1)


def _stats_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = action_mask[:, 1:].bool()
    sel_logp, sel_logz = token_logprobs(logits[:, :-1][mask][None], input_ids[:, 1:][mask][None])
    full_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
    logp = torch.zeros(input_ids.shape, dtype=sel_logp.dtype, device=input_ids.device).masked_scatter(full_mask, sel_logp[0])
    logz = torch.zeros(input_ids.shape, dtype=sel_logz.dtype, device=input_ids.device).masked_scatter(full_mask, sel_logz[0])
    return logp, logz


def token_stats(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    return_hidden: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``(logp, logz)`` [B, L] fp32 of a causal LM, aligned to ``input_ids``, 0 off ``action_mask``.

    ``logits_mode`` (see :func:`resolve_logits_mode`): ``"chunked"`` never builds [B, T, V] logits;
    ``"full"`` uses the model's logits (selected rows only are converted to fp32). With
    ``return_hidden=True`` also returns the final hidden states [B, L, H].
    """
    mode = resolve_logits_mode(model, logits_mode)
    hidden, logits = forward_hidden(model, input_ids, attention_mask, full_logits=mode == "full")
    if mode == "full":
        logp, logz = _stats_from_logits(logits, input_ids, action_mask)
    else:
        logp, logz = stats_from_hidden(model, hidden, input_ids, action_mask, chunk_size=chunk_size)
    return (logp, logz, hidden) if return_hidden else (logp, logz)


# ---------------------------------------------------------------------------------------------
# cache keys
# ---------------------------------------------------------------------------------------------


def _flat_indices(ds: Dataset) -> Dataset:
    return ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 of every row's ``input_ids`` and ``action_mask`` (content, order and lengths).

    Computed from the data itself, not from ``datasets``' fingerprint (random for in-memory
    datasets), so the same tokens always give the same key and any changed token gives another.
    """
    missing = [c for c in ("input_ids", "action_mask") if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset_fingerprint needs a tokenised dataset (missing {missing}): run tokenize_dataset first")
    table = _flat_indices(ds).data.table
    h = hashlib.sha256(f"rows={len(ds)}".encode())
    for col, dtype in (("input_ids", np.int64), ("action_mask", np.int8)):
        column = table.column(col).combine_chunks()
        lengths = np.diff(column.offsets.to_numpy())
        h.update(col.encode())
        h.update(lengths.astype(np.int64).tobytes())
        h.update(column.flatten().to_numpy(zero_copy_only=False).astype(dtype).tobytes())
    return h.hexdigest()


def _base_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters of the model without adapters, named as in the plain model."""
    core, _, _ = causal_lm_parts(model)
    for name, p in core.named_parameters():
        if "lora_" in name or "modules_to_save" in name or "shiq_value_head" in name:
            continue
        yield name.replace(".base_layer", ""), p


def reference_identity(model: torch.nn.Module, reference_id: str | None = None,
                       autocast_dtype: torch.dtype | None = None) -> dict[str, str]:
    """What identifies the reference: class, architecture config and a weights hash (or ``reference_id``).

    The weights hash covers every base parameter (bytes, dtype, shape, name as in the plain model),
    so a PEFT model with adapters disabled and its base model share an identity. Passing
    ``reference_id`` (e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct@<revision>"``) skips the hash.
    Statistics computed under mixed precision (``autocast_dtype``) are another identity.
    """
    core, _, _ = causal_lm_parts(model)
    cfg = {k: v for k, v in core.config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    ident = {"class": type(core).__name__,
             "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    if autocast_dtype is not None:
        ident["autocast"] = str(autocast_dtype).replace("torch.", "")
    if reference_id is not None:
        ident["reference_id"] = str(reference_id)
        return ident
    h = hashlib.sha256()
    for name, p in sorted(_base_named_tensors(model), key=lambda kv: kv[0]):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    ident["weights"] = h.hexdigest()[:32]
    return ident


def default_cache_dir() -> Path:
    """``<models cache>/ref_stats`` (``$SHIQ_LAB_CACHE`` or ``.cache/`` at the project root)."""
    from .models import cache_dir

    return cache_dir() / "ref_stats"


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ReferenceCache:
    """Reference statistics on disk, one folder per key: ``stats.safetensors`` + ``meta.json``.

    ``meta.json`` records the dataset fingerprint, the reference identity, the format version and
    the checksum of the statistics file; :meth:`load` checks all of them.
    """

    STATS_FILE = "stats.safetensors"
    META_FILE = "meta.json"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    @staticmethod
    def key(fingerprint: str, identity: dict[str, str]) -> str:
        blob = json.dumps({"dataset": fingerprint, "reference": identity, "version": STATS_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def write(folder: str | os.PathLike, logp: list[np.ndarray], logz: list[np.ndarray], *, fingerprint: str,
              identity: dict[str, str]) -> Path:
        """Write an entry atomically (temporary folder, then rename). An existing entry is replaced."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(x) for x in logp], dtype=np.int64)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
            staging = Path(tmp) / "entry"
            staging.mkdir()
            arrays = {"ref_logp": np.concatenate(logp).astype(np.float32) if len(logp) else np.zeros(0, np.float32),
                      "ref_logz": np.concatenate(logz).astype(np.float32) if len(logz) else np.zeros(0, np.float32),
                      "lengths": lengths}
            save_file(arrays, str(staging / ReferenceCache.STATS_FILE))
            meta = {"version": STATS_VERSION, "dataset_fingerprint": fingerprint, "reference": identity,
                    "rows": int(len(lengths)), "tokens": int(lengths.sum()),
                    "stats_sha256": _sha256_file(staging / ReferenceCache.STATS_FILE)}
            (staging / ReferenceCache.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            if folder.exists():
                old = Path(tmp) / "old"
                folder.rename(old)  # moved aside, deleted with the temporary folder
            staging.rename(folder)
        return folder

    @staticmethod
    def read(folder: str | os.PathLike, *, fingerprint: str, identity: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logp, logz, lengths)`` of an entry; :class:`StaleReferenceCacheError` when it does not match."""
        folder = Path(folder)
        meta_file, stats_file = folder / ReferenceCache.META_FILE, folder / ReferenceCache.STATS_FILE
        if not meta_file.exists() or not stats_file.exists():
            raise StaleReferenceCacheError(
                f"{folder} is not a reference-statistics entry (missing {ReferenceCache.META_FILE} or "
                f"{ReferenceCache.STATS_FILE}): run `shiq-lab precompute-ref` again")
        meta = json.loads(meta_file.read_text())
        problems = []
        if meta.get("version") != STATS_VERSION:
            problems.append(f"format version {meta.get('version')} != {STATS_VERSION}")
        if meta.get("dataset_fingerprint") != fingerprint:
            problems.append("it was computed for another dataset or tokenisation (dataset fingerprint differs)")
        if meta.get("reference") != identity:
            diff = sorted(k for k in set(identity) | set(meta.get("reference", {}))
                          if identity.get(k) != meta.get("reference", {}).get(k))
            problems.append(f"it was computed with another reference model ({', '.join(diff)} differ)")
        if not problems and _sha256_file(stats_file) != meta.get("stats_sha256"):
            problems.append("its statistics file is corrupted (checksum mismatch)")
        if problems:
            raise StaleReferenceCacheError(
                f"stale reference statistics in {folder}: " + "; ".join(problems) +
                ". Delete that folder or recompute (`shiq-lab precompute-ref`, or drop ref_stats_path to use the cache)")
        arrays = load_file(str(stats_file))
        return arrays["ref_logp"], arrays["ref_logz"], arrays["lengths"]

    def load(self, fingerprint: str, identity: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The cached entry, or ``None`` on a miss. A damaged entry is reported and treated as a miss."""
        folder = self.path(self.key(fingerprint, identity))
        if not folder.exists():
            return None
        try:
            return self.read(folder, fingerprint=fingerprint, identity=identity)
        except StaleReferenceCacheError as err:
            warnings.warn(f"ignoring a damaged reference cache entry, it will be recomputed: {err}", stacklevel=2)
            return None

    def save(self, fingerprint: str, identity: dict[str, str], logp: list[np.ndarray], logz: list[np.ndarray]) -> Path:
        return self.write(self.path(self.key(fingerprint, identity)), logp, logz, fingerprint=fingerprint, identity=identity)


# ---------------------------------------------------------------------------------------------
# precompute
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no grad, and adapters disabled for a PEFT model (the reference is its base)."""
    was_training = model.training
    model.eval()
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") \
        else contextlib.nullcontext()
    try:
        with torch.no_grad(), adapters:
            yield
    finally:
        model.train(was_training)


def compute_reference_stats(
    model: torch.nn.Module,
    ds: Dataset,
    *,
    batch_size: int = 8,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-row ``ref_logp`` and ``ref_logz`` arrays (aligned to ``input_ids``) of ``model`` as the reference.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward passes under the mixed precision
    training will use, so at theta = ref the policy's statistics equal these.
    """
    from .data import ShiQCollator

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    collate = ShiQCollator(pad_token_id=0)
    logp_rows: list[np.ndarray] = []
    logz_rows: list[np.ndarray] = []
    cols = _flat_indices(ds).select_columns(["input_ids", "action_mask", "token_rewards"])
    with _reference_mode(model):
        for start in range(0, len(cols), batch_size):
            rows = cols[start:start + batch_size]
            feats = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
            batch = collate(feats)
            ids, am, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "action_mask"))
            with autocast:
                logp, logz = token_stats(model, ids, am, mask, chunk_size=chunk_size, logits_mode=logits_mode)
            lengths = batch["attention_mask"].sum(1).tolist()
            for b, n in enumerate(lengths):
                logp_rows.append(logp[b, :n].float().cpu().numpy())
                logz_rows.append(logz[b, :n].float().cpu().numpy())
    return logp_rows, logz_rows


def attach_reference_stats(ds: Dataset, logp: list[np.ndarray] | np.ndarray, logz: list[np.ndarray] | np.ndarray,
                           lengths: np.ndarray | None = None) -> Dataset:
    """Add (or replace) the ``ref_logp`` / ``ref_logz`` columns; flat arrays are split by ``lengths``."""
    if lengths is not None:
        cuts = np.cumsum(lengths)[:-1]
        logp, logz = np.split(logp, cuts), np.split(logz, cuts)
    want = [len(x) for x in ds["input_ids"]]
    got = [len(x) for x in logp]
    if want != got:
        raise StaleReferenceCacheError(
            "reference statistics do not match the dataset's token lengths: they belong to another dataset; recompute them")
    ds = ds.remove_columns([c for c in ("ref_logp", "ref_logz") if c in ds.column_names])
    ds = ds.add_column("ref_logp", [x.tolist() for x in logp])
    return ds.add_column("ref_logz", [x.tolist() for x in logz])


def precompute_reference(
    model: torch.nn.Module,
    ds: Dataset,
    *,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    stats_path: str | os.PathLike | None = None,
    reference_id: str | None = None,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Dataset:
    """Add ``ref_logp`` / ``ref_logz`` (the reference's statistics, aligned to ``input_ids``) to ``ds``.

    ``model`` is the reference (a PEFT model counts as its base, adapters disabled). With
    ``stats_path`` the statistics are read from that entry (written by ``shiq-lab precompute-ref
    --output``) and must match this dataset and model, else :class:`StaleReferenceCacheError`.
    Otherwise the keyed cache in ``cache_dir`` is used (``use_cache=False`` bypasses it): a hit
    runs no forward pass; a miss computes and stores the entry.
    """
    fingerprint = dataset_fingerprint(ds)
    identity = reference_identity(model, reference_id, autocast_dtype)
    if stats_path is not None:
        logp, logz, lengths = ReferenceCache.read(stats_path, fingerprint=fingerprint, identity=identity)
        return attach_reference_stats(ds, logp, logz, lengths)
    cache = ReferenceCache(cache_dir) if use_cache else None
    hit = cache.load(fingerprint, identity) if cache is not None else None
    if hit is not None:
        logger.info("reference statistics: cache hit %s", cache.path(cache.key(fingerprint, identity)))
        return attach_reference_stats(ds, *hit)
    logp_rows, logz_rows = compute_reference_stats(model, ds, batch_size=batch_size, chunk_size=chunk_size,
                                                   logits_mode=logits_mode, device=device, autocast_dtype=autocast_dtype)
    if cache is not None:
        where = cache.save(fingerprint, identity, logp_rows, logz_rows)
        logger.info("reference statistics: computed and cached in %s", where)
    return attach_reference_stats(ds, logp_rows, logz_rows)


def write_reference_stats(folder: str | os.PathLike, model: torch.nn.Module, ds: Dataset, *,
                          reference_id: str | None = None, **kwargs: Any) -> Path:
    """Compute the reference statistics of ``ds`` and write them as an entry at ``folder`` (atomically)."""
    logp, logz = compute_reference_stats(model, ds, **kwargs)
    return ReferenceCache.write(folder, logp, logz, fingerprint=dataset_fingerprint(ds),
                                identity=reference_identity(model, reference_id, kwargs.get("autocast_dtype")))

