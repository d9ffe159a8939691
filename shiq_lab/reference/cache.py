"""Per-token statistics of a causal LM, and the reference's, computed once and cached on disk.

ShiQ needs the reference only through two numbers per response token: ``ref_logp`` (log-prob of
the action) and ``ref_logz`` (log-partition of the state). For an offline dataset they are computed
once (:func:`precompute_reference`), stored next to nothing else, and reused by every run: the
reference model is never in memory during training.

Public API:

- :func:`token_stats`: ``(logp, logz)`` [B, L] of a causal LM on a batch, aligned to ``input_ids``
  (value at t = statistics of generating token t; 0 off the action mask). It runs the model's
  decoder, then :func:`shiq_lab.lm.kernel.chunked_token_logprobs` on the final hidden states
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.numpy import load_file, save_file

from shiq_lab.lm.stats import causal_lm_parts, token_stats

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
    from shiq_lab.infra.models import cache_dir

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
                    "rows": len(lengths), "tokens": int(lengths.sum()),
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
    from shiq_lab.data.batch import ShiQCollator

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

