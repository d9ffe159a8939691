"""Fault injection and bad inputs (issue 12): nothing written before a fault is lost, every error names its cause.

Faults are real where they can be: SIGKILL (the process kills itself in the middle of a checkpoint
save or a cache write, at a chosen point, so the test is deterministic), two processes writing one
cache key, read-only folders. Read-only folders are a read-only bind mount when the test can mount
(root with CAP_SYS_ADMIN: root ignores chmod, but not a read-only mount); elsewhere os-level writes
under the folder are patched to raise ``OSError(EROFS)`` (``READ_ONLY_HOW`` records which;
``SHIQ_LAB_TEST_NO_MOUNT=1`` forces the patch).
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shiq_lab import cli
from shiq_lab.data.encode import tokenize_dataset
from shiq_lab.data.formats import DataValidationError
from shiq_lab.data.toy import synthetic_dataset
from shiq_lab.errors import ConfigError, ModelNotFoundError, RunDirectoryError, ShiQLabError
from shiq_lab.infra import models
from shiq_lab.reference import cache as ref_mod
from shiq_lab.reference.cache import ReferenceCache, StaleReferenceCacheError, precompute_reference
from shiq_lab.train import runs

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny_cpu.yaml")
FORK = multiprocessing.get_context("fork")
READ_ONLY_HOW: list[str] = []


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny")


@pytest.fixture(scope="module")
def data(tiny):
    return tokenize_dataset(synthetic_dataset(6, seed=3), tiny[1], max_length=48)


def quick(tmp_path, *extra, out="run", steps=3):
    return ["--config", CONFIG, "--output_dir", str(tmp_path / out), "--max_steps", str(steps), "--report_to", "none",
            "--eval_strategy", "no", "--save_strategy", "no", "--ref_cache_dir", str(tmp_path / "cache"),
            "--disable_tqdm", "true", "--per_device_train_batch_size", "4", *extra]


def in_child(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked process; its exit code (-9 when it was SIGKILLed)."""
    proc = FORK.Process(target=_child_main, args=(fn, *args))
    proc.start()
    proc.join(120)
    return proc.exitcode


def _child_main(fn, *args):
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - report through the exit code, never run pytest's teardown here
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def _suicide():
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` read-only: a read-only bind mount when possible, else os-level writes under it fail with EROFS."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("SHIQ_LAB_TEST_NO_MOUNT"):
        ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
        if ok:
            mounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode == 0
            if not mounted:
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    if mounted:
        READ_ONLY_HOW.append("mount")
        try:
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    READ_ONLY_HOW.append("monkeypatch")
    root = str(folder.resolve())

    def under(p) -> bool:
        try:
            return os.path.abspath(os.fspath(p)).startswith(root)
        except TypeError:
            return False

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    real_mkdir, real_open, real_rename, real_replace = os.mkdir, os.open, os.rename, os.replace
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: refuse(p) if under(p) else real_mkdir(p, *a, **k))
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: refuse(p) if under(p) and flags & writes
                        else real_open(p, flags, *a, **k))
    monkeypatch.setattr(os, "rename", lambda a, b, **k: refuse(b) if under(a) or under(b) else real_rename(a, b, **k))
    monkeypatch.setattr(os, "replace", lambda a, b, **k: refuse(b) if under(a) or under(b) else real_replace(a, b, **k))
    yield


# ---------------------------------------------------------------------------------------------
# runs are never lost or mixed
# ---------------------------------------------------------------------------------------------


def test_a_second_run_into_an_output_dir_is_refused_before_the_model_load(tmp_path, capsys, monkeypatch):
    assert cli.main(["train", *quick(tmp_path, "--save_strategy", "steps", "--save_steps", "2", steps=2)]) == 0
    first = (tmp_path / "run" / "model.safetensors").read_bytes()
    loads = []
    real_build = cli.build_run
    monkeypatch.setattr(cli, "build_run", lambda *a, **k: loads.append(1) or real_build(*a, **k))
    capsys.readouterr()
    assert cli.main(["train", *quick(tmp_path, "--beta", "0.2", steps=2)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {tmp_path / 'run'} holds the outputs of another run" in err and "checkpoint-2" in err
    assert "--resume_from_checkpoint last" in err and "--overwrite_output_dir true" in err and "new --output_dir" in err
    assert "Traceback" not in err and loads == []  # refused before any model load
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == first  # the first run is untouched
    # the explicit overwrite replaces the run and deletes its checkpoints (no mixing)
    assert cli.main(["train", *quick(tmp_path, "--beta", "0.2", "--overwrite_output_dir", "true", steps=2)]) == 0
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    assert runs.read_record(tmp_path / "run")["fields"]["beta"] == 0.2


def _fake_checkpoint(folder: Path, step: int, *, state: str | None = "ok", weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    if weights:
        (folder / "model.safetensors").write_bytes(b"x")
    if state == "ok":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    elif state == "cut":
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}, "log_hist')
    return folder


def test_resume_takes_the_newest_valid_checkpoint_and_names_the_broken_ones(tmp_path, caplog):
    out = tmp_path / "out"
    _fake_checkpoint(out / "checkpoint-2", 2)
    good = _fake_checkpoint(out / "checkpoint-4", 4)
    _fake_checkpoint(out / "checkpoint-6", 6, state="cut")
    _fake_checkpoint(out / "checkpoint-8", 8, state=None)
    (out / "checkpoint-10").mkdir()  # SIGKILL right after the folder was made
    with caplog.at_level("WARNING"):
        assert runs.resolve_resume("last", out) == str(good)
    text = caplog.text
    assert f"skipping {out / 'checkpoint-10'}: it is empty" in text
    assert f"{out / 'checkpoint-8'}: it has no trainer_state.json" in text
    assert f"{out / 'checkpoint-6'}: it has a damaged trainer_state.json" in text
    assert runs.checkpoint_problem(_fake_checkpoint(tmp_path / "nw" / "checkpoint-1", 1, weights=False)) \
        == "has no model weights"
    with pytest.raises(RunDirectoryError, match=r"checkpoint-6: that checkpoint has a damaged trainer_state\.json .*; the "
                       r"newest valid one there is .*checkpoint-4"):
        runs.resolve_resume(str(out / "checkpoint-6"), out)
    shutil.rmtree(out / "checkpoint-2"), shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(RunDirectoryError, match=r"no checkpoint to resume in .*unusable: checkpoint-10 is empty .*; checkpoint-8 has no trainer_state"):
        runs.resolve_resume(True, out)


def _kill_during_checkpoint_save(argv, step):
    from transformers.trainer_callback import TrainerState

    real = TrainerState.save_to_json

    def save_to_json(self, path):
        if self.global_step == step:  # weights, optimizer and RNG are written; the state file is cut
            Path(path).write_text(f'{{"global_step": {step}, "log_hi')
            _suicide()
        return real(self, path)

    TrainerState.save_to_json = save_to_json
    cli.main(argv)


def test_sigkill_during_a_checkpoint_save_then_resume_equals_the_uninterrupted_run(tmp_path, caplog, capsys):
    args = ["--save_strategy", "steps", "--save_steps", "2"]
    assert cli.main(["train", *quick(tmp_path, *args, steps=4, out="full")]) == 0
    assert in_child(_kill_during_checkpoint_save, ["train", *quick(tmp_path, *args, steps=4, out="part")], 4) \
        == -signal.SIGKILL
    assert runs.checkpoint_problem(tmp_path / "part" / "checkpoint-4") is not None
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert cli.main(["train", *quick(tmp_path, *args, "--resume_from_checkpoint", "last", steps=4, out="part")]) == 0
    printed = re.findall(r"final train loss ([-+0-9.e]+)", capsys.readouterr().out)
    assert f"skipping {tmp_path / 'part' / 'checkpoint-4'}" in caplog.text
    full, part = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.allclose(full[k], part[k], atol=1e-6) for k in full)
    assert runs.checkpoint_problem(tmp_path / "part" / "checkpoint-4") is None  # saved again, whole
    # the reported final loss is the whole run's (Trainer alone averages the resumed segment)
    final = [json.loads((tmp_path / d / "log_history.json").read_text())[-1]["train_loss"] for d in ("full", "part")]
    assert final[1] == pytest.approx(final[0], rel=1e-6)
    assert all(float(x) == pytest.approx(final[0], rel=1e-4) for x in printed)  # what the CLI prints, if it does
    segment = [h["loss"] for h in json.loads((tmp_path / "part" / "log_history.json").read_text()) if "loss" in h][2:]
    assert abs(final[1] - sum(segment) / 2) > 1e-4  # the segment's mean is another number


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_fields(tmp_path, capsys):
    args = ["--save_strategy", "steps", "--save_steps", "2"]
    assert cli.main(["train", *quick(tmp_path, *args, steps=2)]) == 0
    capsys.readouterr()
    resume = ["--resume_from_checkpoint", "last"]
    assert cli.main(["train", *quick(tmp_path, *args, *resume, "--beta", "0.2", "--learning_rate", "0.01", steps=4)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / 'checkpoint-2'} belongs to another run: beta: 0.5 there, 0.2 now; learning_rate: " \
           "0.001 there, 0.01 now" in err
    # a copied checkpoint carries its record; one past max_steps belongs to a longer run
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "other" / "checkpoint-2")
    assert cli.main(["train", *quick(tmp_path, *args, *resume, "--dataset_kwargs", '{"n": 32, "seed": 0}',
                                     out="other", steps=4)]) == 2
    assert "dataset_kwargs: {'n': 64, 'seed': 0} there, {'n': 32, 'seed': 0} now" in capsys.readouterr().err
    assert cli.main(["train", *quick(tmp_path, *args, *resume, steps=1)]) == 2
    assert "checkpoint-2 is at step 2, past max_steps=1" in capsys.readouterr().err


def test_whole_run_loss_after_a_resume_hand_computed():
    from transformers.trainer_utils import TrainOutput

    history = [{"loss": 4.0, "step": 2}, {"loss": 2.0, "step": 4}, {"loss": 1.0, "step": 6}, {"train_loss": 1.0}]
    out = runs.whole_run_loss(TrainOutput(6, 1.0, {"train_loss": 1.0}), history, start_step=4)
    # steps 1-2 mean 4, 3-4 mean 2 (from the checkpoint's log), 5-6 mean 1 (the segment): (8 + 4 + 2) / 6
    assert out.training_loss == pytest.approx(14 / 6) and out.metrics["train_loss"] == pytest.approx(14 / 6)
    assert history[-1]["train_loss"] == pytest.approx(14 / 6)
    assert runs.whole_run_loss(TrainOutput(6, 1.0, {}), history, start_step=0).training_loss == 1.0


def test_resume_without_a_checkpoint_is_refused_before_the_model_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_run", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["train", *quick(tmp_path, "--resume_from_checkpoint", "last", steps=1)]) == 2
    assert f"no checkpoint to resume in {tmp_path / 'run'} (no checkpoint-* folder)" in capsys.readouterr().err


def test_a_read_only_output_dir_is_refused_before_the_model_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_run", lambda *a, **k: pytest.fail("the model was loaded"))
    with read_only(tmp_path / "ro", monkeypatch):
        assert cli.main(["train", *quick(tmp_path / "ro", steps=1)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {tmp_path / 'ro' / 'run'} is not writable" in err and "choose a writable --output_dir" in err


# ---------------------------------------------------------------------------------------------
# config validated before any expensive work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--beta", "inf"], "beta=inf: must be a finite number > 0"),
    (["--beta", "nan"], "beta=nan: must be a finite number > 0"),
    (["--learning_rate", "0"], "learning_rate=0.0: must be a finite number > 0"),
    (["--learning_rate=-1e-3"], "learning_rate=-0.001: must be a finite number > 0"),
    (["--max_length", "0"], "max_length=0: must be an integer >= 1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0: must be an integer >= 1"),
    (["--eval_fraction", "1.0"], "eval_fraction=1.0: must be a finite number >= 0 and < 1"),
    (["--lora_dropout", "1.5"], "lora_dropout=1.5: must be a finite number >= 0 and < 1"),
    (["--dataset_kwargs", "{n: 3}"], "dataset_kwargs='{n: 3}': not JSON"),
])
def test_out_of_range_flags_are_refused_naming_the_field(flags, message, capsys):
    assert cli.main(["train", "--config", CONFIG, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_python_config_refuses_what_the_flags_refuse():
    from shiq_lab.train.trainer import ShiQConfig

    for kw, message in [(dict(horizon=2.5), "horizon=2.5: must be an integer >= 1"),
                        (dict(max_steps=2.5), "max_steps=2.5: must be a whole number of steps"),
                        (dict(beta=float("inf")), "beta=inf"), (dict(learning_rate=0), "learning_rate=0:"),
                        (dict(horizon=True), "horizon=True"), (dict(logging_steps=2.5), "logging_steps=2.5")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            ShiQConfig(output_dir="unused", **kw)


@pytest.mark.parametrize("text, message", [
    ("model: tiny\nmax_steps: 2.5\n", "argument --max_steps/--max-steps: invalid int value: '2.5'"),
    ("model: tiny\nbeta: abc\n", "argument --beta: invalid float value: 'abc'"),
    ("model: tiny\nbeta: .inf\n", "beta=inf: must be a finite number > 0"),
    ("model: tiny\nhorizon: 2.5\n", "argument --horizon: invalid int value: '2.5'"),
    ("model: tiny\nbeta: 0.5\n  max_steps: 3\n", ":3:12: YAML syntax error"),
    ("model: [tiny\n", "YAML syntax error"),
    ("- model\n- tiny\n", "must be a YAML mapping"),
])
def test_bad_yaml_names_the_file_and_what_is_wrong(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "Traceback" not in err


def test_yaml_values_are_converted_as_the_flags_are_then_range_checked(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model: tiny\nlearning_rate: 1e-3\nmax_steps: '7'\nuse_lora: 'true'\n")
    run, cfg, _ = cli.parse_config(["--config", str(path), "--output_dir", str(tmp_path / "o")])
    assert (cfg.learning_rate, cfg.max_steps, run.use_lora) == (1e-3, 7, True)
    path.write_text("model: tiny\nlearning_rate: 0\n")
    with pytest.raises(ConfigError, match=f"{path}: learning_rate=0.0: must be a finite number > 0"):
        cli.parse_config(["--config", str(path), "--output_dir", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------
# caches that heal
# ---------------------------------------------------------------------------------------------


def _arrays(n=3):
    rng = np.random.default_rng(0)
    logp = [rng.standard_normal(4 + i).astype(np.float32) for i in range(n)]
    return logp, [x + 1 for x in logp]


IDENT = {"class": "X", "config": "c", "weights": "w"}


def test_cache_keys_are_unchanged():
    # the value the cache had before issue 12: existing entries stay hits
    assert ReferenceCache.key("f" * 64, IDENT) == "80231cb46b5ab455c36743e9"


@pytest.mark.parametrize("damage, message", [
    (lambda e: (e / "meta.json").write_text(""), "meta.json: empty"),
    (lambda e: (e / "meta.json").write_text((e / "meta.json").read_text()[:40]), "meta.json: not valid JSON"),
    (lambda e: (e / "meta.json").write_text("[1, 2]"), "meta.json: a JSON list where an object"),
    (lambda e: (e / "meta.json").write_bytes(b"\xff\xfe"), "meta.json: not valid JSON"),
    (lambda e: (e / "meta.json").write_text('{"reference": [1]}'), "another reference model"),
    (lambda e: (e / "stats.safetensors").write_bytes((e / "stats.safetensors").read_bytes()[:50]),
     "stats.safetensors is corrupted (checksum mismatch)"),
    (lambda e: (e / "stats.safetensors").unlink(), "missing meta.json or stats.safetensors"),
])
def test_a_damaged_entry_is_reported_with_its_path_and_recomputed(tmp_path, tiny, data, damage, message):
    model = tiny[0]
    want = precompute_reference(model, data, cache_dir=tmp_path)  # writes the entry
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    damage(entry)
    with pytest.warns(UserWarning, match="damaged reference cache entry") as caught:
        got = precompute_reference(model, data, cache_dir=tmp_path)
    assert message in str(caught[0].message) and str(entry) in str(caught[0].message)
    assert got["ref_logp"] == want["ref_logp"] and got["ref_logz"] == want["ref_logz"]
    calls = []
    real = ref_mod.compute_reference_stats
    ref_mod.compute_reference_stats = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            precompute_reference(model, data, cache_dir=tmp_path)  # healed: a clean hit
    finally:
        ref_mod.compute_reference_stats = real
    assert calls == []


def test_a_damaged_explicit_stats_path_is_an_error_naming_the_file(tmp_path, tiny, data, capsys):
    from shiq_lab.reference.cache import write_reference_stats

    entry = write_reference_stats(tmp_path / "stats", tiny[0], data)
    (entry / "meta.json").write_text("")
    with pytest.raises(StaleReferenceCacheError, match=f"damaged reference-statistics metadata {entry / 'meta.json'}: "
                       "empty; delete that folder or recompute"):
        precompute_reference(tiny[0], data, stats_path=entry)
    args = quick(tmp_path, "--eval_fraction", "0", "--ref_stats_path", str(entry), steps=1)
    assert cli.main(["train", *args]) == 2
    assert f"{entry / 'meta.json'}: empty" in capsys.readouterr().err


def _kill_during_cache_write(model, data, root):
    real = ref_mod.save_file

    def save_file(arrays, path):
        Path(path).write_bytes(b"half")  # the staging entry is half written when the process dies
        _suicide()

    ref_mod.save_file = save_file
    try:
        precompute_reference(model, data, cache_dir=root)
    finally:
        ref_mod.save_file = real


def test_sigkill_during_a_cache_write_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny, data, caplog):
    model = tiny[0]
    assert in_child(_kill_during_cache_write, model, data, tmp_path / "cache") == -signal.SIGKILL
    (staging,) = list((tmp_path / "cache").iterdir())
    assert staging.name.startswith(".") and (staging / "entry" / "stats.safetensors").read_bytes() == b"half"
    with caplog.at_level("WARNING"):
        got = precompute_reference(model, data, cache_dir=tmp_path / "cache")
    assert f"removed {staging}, left by a writer that was killed" in caplog.text and not staging.exists()
    want = precompute_reference(model, data, use_cache=False)
    assert got["ref_logp"] == want["ref_logp"] and got["ref_logz"] == want["ref_logz"]
    assert [p.name.startswith(".") for p in (tmp_path / "cache").iterdir()] == [False]


def test_staging_folders_are_removed_only_when_their_writer_is_gone(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {"dead": f".k-w{dead.pid}@{host}-abcdefgh", "alive": f".k-w{os.getppid()}@{host}-abcdefgh",
             "other_host_new": ".k-w1@elsewhere-abcdefgh", "other_host_old": ".k-w1@elsewhere-bbcdefgh",
             "old_style_old": ".k-cbcdefgh", "not_staging": ".git"}
    for name in names.values():
        (tmp_path / name).mkdir()
    old = time.time() - ref_mod.STAGING_MAX_AGE_S - 10
    for key in ("other_host_old", "old_style_old"):
        os.utime(tmp_path / names[key], (old, old))
    removed = {p.name for p in ref_mod.clean_staging(tmp_path)}
    assert removed == {names["dead"], names["other_host_old"], names["old_style_old"]}
    assert ref_mod.clean_staging(tmp_path, name="other") == []


def _hammer(root, rounds, failures):
    logp, logz = _arrays()
    cache = ReferenceCache(root)
    for _ in range(rounds):
        cache.save("fp", IDENT, logp, logz)
        hit = cache.load("fp", IDENT)
        if hit is not None and not np.array_equal(hit[0], np.concatenate(logp)):
            Path(failures).write_text("wrong statistics")
            os._exit(4)


def test_two_processes_writing_and_reading_one_key_are_safe(tmp_path, recwarn):
    procs = [FORK.Process(target=_child_main, args=(_hammer, tmp_path / "c", 40, tmp_path / f"fail{i}")) for i in range(2)]
    for p in procs:
        p.start()
    logp, _ = _arrays()
    cache = ReferenceCache(tmp_path / "c")
    while any(p.is_alive() for p in procs):  # a third reader while they write
        hit = cache.load("fp", IDENT)
        assert hit is None or np.array_equal(hit[0], np.concatenate(logp))
    assert [p.exitcode for p in procs] == [0, 0]
    assert not [w for w in recwarn if "damaged" in str(w.message)]  # a replaced entry is a miss, not damage
    assert cache.load("fp", IDENT) is not None and [p.name for p in (tmp_path / "c").iterdir()] == [cache.key("fp", IDENT)]


def test_an_entry_that_vanishes_while_it_is_read_is_a_miss(tmp_path, monkeypatch, recwarn):
    cache = ReferenceCache(tmp_path)
    folder = cache.save("fp", IDENT, *_arrays())
    real = ref_mod._sha256_file
    monkeypatch.setattr(ref_mod, "_sha256_file", lambda p: shutil.rmtree(folder) or real(p))
    assert cache.load("fp", IDENT) is None and not recwarn.list


def test_a_read_only_cache_computes_in_memory_with_a_warning(tmp_path, tiny, data, monkeypatch):
    model = tiny[0]
    want = precompute_reference(model, data, use_cache=False)
    with read_only(tmp_path / "empty", monkeypatch):
        with pytest.warns(UserWarning, match=f"reference cache folder {tmp_path / 'empty'} cannot be written .*"
                          "use_ref_cache false"):
            got = precompute_reference(model, data, cache_dir=tmp_path / "empty")
    assert got["ref_logp"] == want["ref_logp"]
    precompute_reference(model, data, cache_dir=tmp_path / "full")
    monkeypatch.setattr(ref_mod, "compute_reference_stats", lambda *a, **k: pytest.fail("recomputed"))
    with read_only(tmp_path / "full", monkeypatch):  # a read-only cache that has the entry: a plain hit
        assert precompute_reference(model, data, cache_dir=tmp_path / "full")["ref_logz"] == want["ref_logz"]
    assert READ_ONLY_HOW[-1] in ("mount", "monkeypatch")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def test_a_missing_local_folder_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"no such local folder \\({tmp_path / 'nope'} does not exist\\)"):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no such local folder"):
        models.load_model("runs/x/checkpoint-3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=f"model folder {tmp_path / 'empty'} holds no config.json"):
        models.load_model(tmp_path / "empty")


def test_a_mistyped_registered_name_gets_did_you_mean(capsys):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'smollm2-135' \(did you mean 'smollm2-135m'\?\); "
                       r"registered: tiny, smollm2-135m"):
        models.load_model("smollm2-135")
    with pytest.raises(ModelNotFoundError, match=r"'tinny' \(did you mean 'tiny'\?\)"):
        models.model_folder("tinny")
    assert cli.main(["train", "--config", CONFIG, "--model", "tinyy", "--output_dir", "/tmp/unused-shiq"]) == 2
    assert "did you mean 'tiny'?" in capsys.readouterr().err


@pytest.fixture
def online(monkeypatch):
    """The offline variables unset (as outside `make`), the hub status not yet probed."""
    from huggingface_hub import constants

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_HUB_STATUS", {})
    monkeypatch.setattr(models, "_LOCAL_ONLY", set())
    calls = []
    return calls


def test_an_unreachable_hub_fails_fast_when_the_offline_variables_are_unset(online, monkeypatch, capsys):
    def unreachable(request, timeout):
        online.append(timeout)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", unreachable)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("hub retries"))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"'someorg/somemodel' is not a registered name, not a local folder, "
                       r"and not in the local hub cache, and the Hugging Face hub .* cannot be reached .*name resolution"):
        models.load_model("someorg/somemodel")
    assert cli.main(["train", "--config", CONFIG, "--model", "someorg/other", "--output_dir", "/tmp/unused-shiq"]) == 2
    assert time.perf_counter() - start < 5 and online == [3.0]  # one short probe for the whole process
    assert "cannot be reached" in capsys.readouterr().err


def test_the_hub_path_still_works_with_a_network_and_from_the_hub_cache(online, monkeypatch):
    tiny_folder = str(models.model_folder("tiny"))
    seen = []

    def from_hub(loader):
        real = loader.from_pretrained

        def load(name, **kwargs):
            seen.append((name, kwargs.get("local_files_only", False)))
            return real(tiny_folder if name == "someorg/tiny" else name, **{k: v for k, v in kwargs.items()
                                                                            if k != "local_files_only"})
        return load

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_hub(models.AutoModelForCausalLM))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", from_hub(models.AutoTokenizer))
    class Answer:
        def close(self):
            pass

    monkeypatch.setattr("urllib.request.urlopen", lambda request, timeout: Answer())
    model, _ = models.load_model("someorg/tiny")
    want = load_file(str(Path(tiny_folder) / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    assert seen == [("someorg/tiny", False), ("someorg/tiny", False)]
    # hub unreachable, files in the hub cache: loaded from it, without the hub's retries
    monkeypatch.setattr(models, "_HUB_STATUS", {})
    monkeypatch.setattr("urllib.request.urlopen", lambda r, timeout: (_ for _ in ()).throw(urllib.error.URLError("x")))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    seen.clear()
    models.load_model("someorg/tiny")
    assert seen == [("someorg/tiny", True), ("someorg/tiny", True)]


# ---------------------------------------------------------------------------------------------
# how errors look
# ---------------------------------------------------------------------------------------------


def test_project_errors_share_a_base_and_print_as_one_message_with_exit_code_2(tmp_path, capsys, monkeypatch):
    for cls in (DataValidationError, StaleReferenceCacheError, ConfigError, ModelNotFoundError, RunDirectoryError):
        assert issubclass(cls, ShiQLabError)
    assert issubclass(DataValidationError, ValueError) and issubclass(StaleReferenceCacheError, RuntimeError)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n')  # no reward
    args = ["train", *quick(tmp_path, "--dataset", str(bad), "--eval_fraction", "0", steps=1)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "no reward" in line and "Traceback" not in err
    assert "--debug" in err  # says how to see the traceback
    with pytest.raises(DataValidationError):
        cli.main([*args, "--debug"])
    monkeypatch.setenv("SHIQ_LAB_DEBUG", "1")
    with pytest.raises(DataValidationError):
        cli.main(args)


def test_precompute_ref_into_a_read_only_cache_says_nothing_was_cached(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    with read_only(cache, monkeypatch), pytest.warns(UserWarning, match="cannot be written"):
        assert cli.main(["precompute-ref", *quick(tmp_path, "--eval_fraction", "0", "--ref_cache_dir", str(cache))]) == 0
    out = capsys.readouterr().out
    assert "computed but NOT cached" in out and str(cache) in out
    assert not any(cache.iterdir())


@pytest.mark.parametrize("bf16", [True, False])
def test_a_record_from_before_cast_lm_head_to_fp32_resumes_only_at_its_precision(bf16):
    """Records written before the field existed ran the output layer in fp32 under bf16/fp16: resuming one with
    the new default (the output layer in bf16) would change the precision mid-run without a word."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(loss_type="shiq", beta=0.1, bf16=bf16, fp16=False, cast_lm_head_to_fp32=False)
    current = runs.run_record(cfg)
    legacy = runs.run_record(cfg)
    del legacy["fields"]["cast_lm_head_to_fp32"]  # what an older shiq_lab wrote
    diff = runs.record_diff(legacy, current)
    if bf16:
        assert diff == ["cast_lm_head_to_fp32: True there, False now"]
        assert runs.record_diff(legacy, runs.run_record(SimpleNamespace(**{**vars(cfg),
                                                                           "cast_lm_head_to_fp32": True}))) == []
    else:  # in full precision the flag changes nothing: no refusal
        assert diff == []
