"""Per-token statistics of a causal LM, and the reference's, computed once and cached on disk.

ShiQ needs the reference only through two numbers per response token: ``ref_logp`` (log-prob of
the action) and ``ref_logz`` (log-partition of the state). For an offline dataset they are computed
once (:func:`precompute_reference`), stored next to nothing else, and reused by every run: the
reference model is never in memory during training.

Public API:

- :func:`shiq_lab.lm.stats.token_stats` (re-exported by :mod:`shiq_lab.reference` for one release):
  ``(logp, logz)`` [B, L] of a causal LM on a batch, aligned to ``input_ids`` (value at t =
  statistics of generating token t; 0 off the action mask). The trainer uses the same function for
  the policy, and this module gathers the same response positions, so at theta = ref both sides
  are bit-identical.
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

The cache heals itself (issue 12): a damaged entry part (``meta.json`` empty, truncated, not a JSON
object; statistics file cut or unreadable) is reported with its path and recomputed; the staging
folder of a writer that was killed (``.<key>-w<pid>@<host>-*``) is removed by the next writer once
that process is gone (or after :data:`STAGING_MAX_AGE_S`); two processes writing or reading one key
are safe (an entry that vanishes while it is replaced is a miss; a rename race is retried); a cache
folder that cannot be written (read-only) leaves the statistics computed in memory, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.numpy import load_file, save_file

from shiq_lab.errors import ShiQLabError
from shiq_lab.lm.modes import as_reference, device_of
from shiq_lab.lm.stats import action_positions, causal_lm_parts, resolve_logits_mode, token_stats
from shiq_lab.lm.value_head import VALUE_HEAD_NAME

logger = logging.getLogger(__name__)

#: bump when the meaning, the layout or the numerics of stored statistics change: old entries are then
#: never read (a stale entry would break the exact zero at theta = ref). Still 1 after issue 9: token_stats
#: now gathers the response states by position instead of a boolean mask, and gives the same bits.
STATS_VERSION = 1
#: a staging folder older than this is removed even when its writer's pid cannot be checked (other host)
STAGING_MAX_AGE_S = 6 * 3600

_RUNTIME_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "_commit_hash", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "_experts_implementation", "architectures",
}


class StaleReferenceCacheError(ShiQLabError, RuntimeError):
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
        if "lora_" in name or "modules_to_save" in name or VALUE_HEAD_NAME in name:
            continue
        yield name.replace(".base_layer", ""), p


def reference_identity(model: torch.nn.Module, reference_id: str | None = None,
                       autocast_dtype: torch.dtype | None = None, *,
                       cast_lm_head_to_fp32: bool = False, logits_mode: str = "auto") -> dict[str, str]:
    """What identifies the reference: class, architecture config and a weights hash (or ``reference_id``).

    The weights hash covers every base parameter (bytes, dtype, shape, name as in the plain model),
    so a PEFT model with adapters disabled and its base model share an identity. Passing
    ``reference_id`` (e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct@<revision>"``) skips the hash.
    Statistics computed under mixed precision (``autocast_dtype``) are another identity, and so is the
    precision of their output layer under it (``cast_lm_head_to_fp32``; ignored in ``logits_mode="full"``, where
    the model's own lm_head follows autocast, so its entries are never taken for fp32-output-layer ones).
    """
    core, _, _ = causal_lm_parts(model)
    cfg = {k: v for k, v in core.config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    ident = {"class": type(core).__name__,
             "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    if autocast_dtype is not None:
        ident["autocast"] = str(autocast_dtype).replace("torch.", "")
        if not cast_lm_head_to_fp32 or resolve_logits_mode(model, logits_mode) == "full":
            # the chunked output layer now follows autocast; before cast_lm_head_to_fp32 existed it ran in fp32
            # (entries without this key are the fp32 ones)
            ident["output_layer"] = "autocast"
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
        """Write an entry atomically (staging folder, then rename). An existing entry is replaced.

        Safe against a concurrent writer of the same entry: whichever rename lands last wins, and
        both write the same statistics. A killed writer's staging folder is removed by a later one.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        clean_staging(folder.parent, name=folder.name)
        lengths = np.array([len(x) for x in logp], dtype=np.int64)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_staging_prefix(folder.name)))
        try:
            staging = tmp / "entry"
            staging.mkdir()
            arrays = {"ref_logp": np.concatenate(logp).astype(np.float32) if len(logp) else np.zeros(0, np.float32),
                      "ref_logz": np.concatenate(logz).astype(np.float32) if len(logz) else np.zeros(0, np.float32),
                      "lengths": lengths}
            save_file(arrays, str(staging / ReferenceCache.STATS_FILE))
            meta = {"version": STATS_VERSION, "dataset_fingerprint": fingerprint, "reference": identity,
                    "rows": len(lengths), "tokens": int(lengths.sum()),
                    "stats_sha256": _sha256_file(staging / ReferenceCache.STATS_FILE)}
            (staging / ReferenceCache.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            for attempt in range(8):
                if folder.exists():
                    with contextlib.suppress(FileNotFoundError):  # another writer moved it first
                        folder.rename(tmp / f"old{attempt}")  # moved aside, deleted with the staging folder
                try:
                    staging.rename(folder)
                    break
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    # another writer placed its entry between our two renames: move it aside, retry
            else:
                logger.info("reference cache: %s kept another writer's entry (same key, same statistics)", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @staticmethod
    def read(folder: str | os.PathLike, *, fingerprint: str, identity: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logp, logz, lengths)`` of an entry; :class:`StaleReferenceCacheError` when it does not match or is damaged.

        Every damaged part is named with its path: ``meta.json`` empty, not JSON (truncated), not a
        JSON object or missing fields; the statistics file cut (checksum), unreadable or inconsistent.
        A file that vanishes while it is read raises ``FileNotFoundError`` (:meth:`load`: a miss).
        """
        folder = Path(folder)
        meta_file, stats_file = folder / ReferenceCache.META_FILE, folder / ReferenceCache.STATS_FILE
        if not meta_file.exists() or not stats_file.exists():
            missing = [str(f) for f in (meta_file, stats_file) if not f.exists()]
            raise StaleReferenceCacheError(
                f"{folder} is not a reference-statistics entry (missing {ReferenceCache.META_FILE} or "
                f"{ReferenceCache.STATS_FILE}: {', '.join(missing)}): run `shiq-lab precompute-ref` again")
        fix = "; delete that folder or recompute it (`shiq-lab precompute-ref`)"
        raw = meta_file.read_bytes()
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            what = "empty" if not raw.strip() else "not valid JSON (truncated or overwritten)"
            raise StaleReferenceCacheError(f"damaged reference-statistics metadata {meta_file}: {what}{fix}") from None
        if not isinstance(meta, dict):
            raise StaleReferenceCacheError(f"damaged reference-statistics metadata {meta_file}: a JSON "
                                           f"{type(meta).__name__} where an object of fields is expected{fix}")
        reference = meta.get("reference")
        if not isinstance(reference, dict):
            reference = {}
        problems = []
        if meta.get("version") != STATS_VERSION:
            problems.append(f"format version {meta.get('version')} != {STATS_VERSION}")
        if meta.get("dataset_fingerprint") != fingerprint:
            problems.append("it was computed for another dataset or tokenisation (dataset fingerprint differs)")
        if reference != identity:
            diff = sorted(k for k in set(identity) | set(reference) if identity.get(k) != reference.get(k))
            problems.append(f"it was computed with another reference model ({', '.join(diff)} differ)")
        if not problems and _sha256_file(stats_file) != meta.get("stats_sha256"):
            problems.append(f"its statistics file {stats_file} is corrupted (checksum mismatch)")
        if problems:
            raise StaleReferenceCacheError(
                f"stale reference statistics in {folder}: " + "; ".join(problems) +
                ". Delete that folder or recompute (`shiq-lab precompute-ref`, or drop ref_stats_path to use the cache)")
        try:
            arrays = load_file(str(stats_file))
            logp, logz, lengths = arrays["ref_logp"], arrays["ref_logz"], arrays["lengths"]
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors' own error types differ across versions
            raise StaleReferenceCacheError(f"damaged reference statistics {stats_file}: {err}{fix}") from None
        if int(lengths.sum()) != len(logp) or len(logp) != len(logz) or meta.get("rows", len(lengths)) != len(lengths):
            raise StaleReferenceCacheError(f"damaged reference statistics {stats_file}: lengths and arrays disagree{fix}")
        return logp, logz, lengths

    def load(self, fingerprint: str, identity: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The cached entry, or ``None`` on a miss.

        A damaged entry is reported (with its path) and treated as a miss, so it is recomputed and
        replaced; an entry that vanishes while it is read (another process replacing it), or that
        cannot be read at all, is a miss too.
        """
        folder = self.path(self.key(fingerprint, identity))
        for _ in range(3):
            try:
                inode = folder.stat().st_ino
            except OSError:
                return None  # no entry (or it vanished): a miss
            try:
                return self.read(folder, fingerprint=fingerprint, identity=identity)
            except (FileNotFoundError, NotADirectoryError):
                return None  # replaced under our feet: a miss
            except StaleReferenceCacheError as err:
                try:
                    replaced = folder.stat().st_ino != inode
                except OSError:
                    return None
                if replaced:
                    continue  # another writer swapped the entry while we read it: read the new one
                warnings.warn(f"ignoring a damaged reference cache entry, it will be recomputed: {err}", stacklevel=2)
                return None
            except OSError as err:
                warnings.warn(f"cannot read the reference cache entry {folder} ({err.strerror or err}): recomputing",
                              stacklevel=2)
                return None
        return None

    def save(self, fingerprint: str, identity: dict[str, str], logp: list[np.ndarray], logz: list[np.ndarray]) -> Path:
        return self.write(self.path(self.key(fingerprint, identity)), logp, logz, fingerprint=fingerprint, identity=identity)


_STAGING_RE = re.compile(r"^\.(?P<name>.+?)-(?:w(?P<pid>\d+)@(?P<host>.*)-)?[A-Za-z0-9_]{8}$")


def _staging_prefix(name: str) -> str:
    # the writer's pid and host are in the name, so a later writer knows when it is gone
    return f".{name}-w{os.getpid()}@{socket.gethostname().replace('-', '_')}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(root: str | os.PathLike, *, name: str | None = None, max_age_s: float = STAGING_MAX_AGE_S) -> list[Path]:
    """Remove staging folders of killed writers in ``root`` (only those of entry ``name`` when given).

    A staging folder is stale when its writer (pid in its name) is no longer running on this host,
    or when it is older than ``max_age_s`` (a writer on another host, or an old-style name).
    Returns the folders removed; each removal is logged with its path.
    """
    root = Path(root)
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    host, now = socket.gethostname().replace("-", "_"), time.time()
    for child in children:
        m = _STAGING_RE.match(child.name)
        if m is None or (name is not None and m.group("name") != name):
            continue
        try:
            if not child.is_dir():
                continue
            age = now - child.stat().st_mtime
        except OSError:
            continue
        pid = m.group("pid")
        dead = pid is not None and m.group("host") == host and int(pid) != os.getpid() and not _pid_alive(int(pid))
        if dead or age > max_age_s:
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                logger.warning("reference cache: removed %s, left by a writer that was killed", child)
                removed.append(child)
    return removed


# ---------------------------------------------------------------------------------------------
# precompute
# ---------------------------------------------------------------------------------------------


def compute_reference_stats(
    model: torch.nn.Module,
    ds: Dataset,
    *,
    batch_size: int = 8,
    chunk_size: int | None = None,
    logits_mode: str = "auto",
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    cast_lm_head_to_fp32: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-row ``ref_logp`` and ``ref_logz`` arrays (aligned to ``input_ids``) of ``model`` as the reference.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward passes under the mixed precision
    training will use, so at theta = ref the policy's statistics equal these; ``cast_lm_head_to_fp32`` as in
    training (:func:`~shiq_lab.lm.stats.stats_from_hidden`).
    """
    from shiq_lab.data.batch import ShiQCollator

    if device is None:
        device = device_of(model)
    device = torch.device(device)
    autocast = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    collate = ShiQCollator(pad_token_id=0)
    logp_rows: list[np.ndarray] = []
    logz_rows: list[np.ndarray] = []
    cols = _flat_indices(ds).select_columns(["input_ids", "action_mask", "token_rewards"])
    # the reference of a PEFT model is its base (adapters disabled); any other model is its own
    with torch.no_grad(), as_reference(model, plain_is_reference=True) as reference:
        for start in range(0, len(cols), batch_size):
            rows = cols[start:start + batch_size]
            feats = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
            batch = collate(feats)
            positions = action_positions(batch["action_mask"]).to(device)  # on the host, as the trainer's collator
            ids, am, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "action_mask"))
            with autocast:
                logp, logz = token_stats(reference, ids, am, mask, chunk_size=chunk_size, logits_mode=logits_mode,
                                         positions=positions, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
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
    cast_lm_head_to_fp32: bool = False,
) -> Dataset:
    """Add ``ref_logp`` / ``ref_logz`` (the reference's statistics, aligned to ``input_ids``) to ``ds``.

    ``model`` is the reference (a PEFT model counts as its base, adapters disabled). With
    ``stats_path`` the statistics are read from that entry (written by ``shiq-lab precompute-ref
    --output``) and must match this dataset and model, else :class:`StaleReferenceCacheError`.
    Otherwise the keyed cache in ``cache_dir`` is used (``use_cache=False`` bypasses it): a hit
    runs no forward pass; a miss computes and stores the entry.
    """
    fingerprint = dataset_fingerprint(ds)
    identity = reference_identity(model, reference_id, autocast_dtype, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                  logits_mode=logits_mode)
    if stats_path is not None:
        logp, logz, lengths = ReferenceCache.read(stats_path, fingerprint=fingerprint, identity=identity)
        return attach_reference_stats(ds, logp, logz, lengths)
    cache = ReferenceCache(cache_dir) if use_cache else None
    hit = cache.load(fingerprint, identity) if cache is not None else None
    if hit is not None:
        logger.info("reference statistics: cache hit %s", cache.path(cache.key(fingerprint, identity)))
        return attach_reference_stats(ds, *hit)
    logp_rows, logz_rows = compute_reference_stats(model, ds, batch_size=batch_size, chunk_size=chunk_size,
                                                   logits_mode=logits_mode, device=device, autocast_dtype=autocast_dtype,
                                                   cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    if cache is not None:
        try:
            where = cache.save(fingerprint, identity, logp_rows, logz_rows)
            logger.info("reference statistics: computed and cached in %s", where)
        except OSError as err:  # read-only or full disk: the statistics are in memory, training goes on
            warnings.warn(f"reference cache folder {cache.root} cannot be written ({err.strerror or err}): the "
                          "statistics were computed in memory and not cached. Set ref_cache_dir to a writable folder, "
                          "or use_ref_cache false to skip the cache", stacklevel=2)
    return attach_reference_stats(ds, logp_rows, logz_rows)


def write_reference_stats(folder: str | os.PathLike, model: torch.nn.Module, ds: Dataset, *,
                          reference_id: str | None = None, **kwargs: Any) -> Path:
    """Compute the reference statistics of ``ds`` and write them as an entry at ``folder`` (atomically)."""
    logp, logz = compute_reference_stats(model, ds, **kwargs)
    return ReferenceCache.write(folder, logp, logz, fingerprint=dataset_fingerprint(ds),
                                identity=reference_identity(model, reference_id, kwargs.get("autocast_dtype"),
                                                            cast_lm_head_to_fp32=kwargs.get("cast_lm_head_to_fp32", False),
                                                            logits_mode=kwargs.get("logits_mode", "auto")))

