"""Trainers stepped in lockstep, one process each (shared by ``bench_train_step``, ``bench_scaling`` and the GPU check).

Each configuration (``sft``, ``shiq``, ``dpo``, ``dpo_precompute``, see :func:`build_trainer`) runs
in its own process (a fork server with the heavy modules imported, else spawn), all set up side by
side; then the steps run in lockstep: a callback stops every trainer after each optimizer step, and
the parent lets one process at a time run its next step, round by round (starting one further
along each round), so load drift from other processes on a shared machine hits every
configuration alike. A step's time runs from the go to the end of the optimizer step.

Memory per process: the resident-set high-water mark (``VmHWM``, reset just before training)
above its RSS with only the model loaded, and the peak bytes torch allocates during one more step
(:func:`benchmarks.common.measure_memory`); on CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    CLOCKS,
    ids_to_text,
    importable,
    make_triples,
    measure_memory,
    offline_env,
    profile_table,
    word_tokenizer,
)

__all__ = [
    "BETA",
    "CONFIGS",
    "LockstepWorkers",
    "build_trainer",
    "hwm_bytes",
    "reset_hwm",
    "rss_bytes",
    "run_lockstep",
    "worker_main",
]

CONFIGS = ("sft", "shiq", "dpo", "dpo_precompute")
BETA = 0.1


# ---------------------------------------------------------------------------------------------
# process memory (Linux /proc)
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def rss_bytes() -> int:
    """Resident set size of this process now (-1 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib >= 0 else -1


def hwm_bytes() -> int:
    """Resident-set high-water mark of this process since start or the last :func:`reset_hwm`."""
    kib = _status_kib("VmHWM")
    if kib >= 0:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the trainers
# ---------------------------------------------------------------------------------------------


def common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments fields shared by every configuration (optimizer, schedule, precision, logging)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=spec["device"] == "cpu", bf16=spec["bf16"], dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
    )


class _SFTCollator:
    """Fixed-length rows -> input_ids, attention_mask and labels (prompt positions -100)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_trainer(config: str, spec: dict[str, Any], model, tokenizer, triples: list[dict], output_dir: str, callbacks: list):
    """The trainer of one configuration, on the same model, data, batch and optimizer settings."""
    from datasets import Dataset

    args = common_args(spec, output_dir)
    responses = [(t["prompt_ids"], t[k], float(k == "chosen_ids"), g)
                 for g, t in enumerate(triples) for k in ("chosen_ids", "rejected_ids")]
    if config == "sft":
        from transformers import Trainer, TrainingArguments

        rows = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c, _, _ in responses]
        return Trainer(model=model, args=TrainingArguments(**args), train_dataset=Dataset.from_list(rows),
                       data_collator=_SFTCollator(), processing_class=tokenizer, callbacks=callbacks)
    if config == "shiq":
        from shiq_lab.train.trainer import ShiQConfig, ShiQTrainer

        rows = [{"prompt_ids": p, "completion_ids": c, "reward": r, "group": g} for p, c, r, g in responses]
        cfg = ShiQConfig(**args, loss_type="shiq", beta=BETA, max_length=spec["prompt_len"] + spec["completion_len"],
                         use_ref_cache=False, ref_batch_size=spec["batch"])
        return ShiQTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           callbacks=callbacks)
    if config in ("dpo", "dpo_precompute"):
        from trl import DPOConfig, DPOTrainer

        rows = [{"prompt": ids_to_text(t["prompt_ids"]), "chosen": " " + ids_to_text(t["chosen_ids"]),
                 "rejected": " " + ids_to_text(t["rejected_ids"])} for t in triples]
        args["per_device_train_batch_size"] = spec["batch"] // 2
        # DPOConfig turns gradient checkpointing on by default; off, as for the others, so that all do the same work
        cfg = DPOConfig(**args, gradient_checkpointing=False, beta=BETA,
                        max_length=spec["prompt_len"] + spec["completion_len"],
                        precompute_ref_log_probs=config == "dpo_precompute",
                        precompute_ref_batch_size=spec["batch"] // 2)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=callbacks)
        # TRL tokenised the text itself: it must have found exactly our token ids
        first = trainer.train_dataset[0]
        if [first["prompt_ids"], first["chosen_ids"]] != [triples[0]["prompt_ids"], triples[0]["chosen_ids"]]:
            raise RuntimeError("TRL's tokenisation of the DPO text does not give the benchmark's token ids")
        return trainer
    raise ValueError(f"unknown configuration {config!r}: choose from {CONFIGS}")


# ---------------------------------------------------------------------------------------------
# the worker process: one configuration, stepped in lockstep by the parent
# ---------------------------------------------------------------------------------------------


def _lockstep_callback(conn, device: torch.device):
    from transformers import TrainerCallback

    class Lockstep(TrainerCallback):
        """Blocks after every optimizer step until the parent says "step"; reports each step's time."""

        def _wait(self) -> None:
            msg = conn.recv()
            if msg != "step":
                raise RuntimeError(f"worker expected 'step', got {msg!r}")
            self.w0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            self._wait()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            conn.send({"wall_s": time.perf_counter() - self.w0, "cpu_s": time.process_time() - self.c0})
            if state.global_step < state.max_steps:
                self._wait()
            elif conn.recv() != "finish":  # hold the last step's end until the parent collects every process
                raise RuntimeError("worker expected 'finish'")

    return Lockstep()


def _probe_step(trainer):
    """One more optimizer step outside the training loop, on the first batch (for memory and profiles)."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tokens = int(batch["attention_mask"].sum())
    model = trainer.model

    def step() -> None:
        model.train()
        trainer.training_step(model, batch, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return step, tokens


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Entry point of a configuration's process: build, report ready, train in lockstep, report."""
    try:
        offline_env(apply=True)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        import logging

        import transformers
        from transformers import AutoModelForCausalLM, PrinterCallback

        transformers.utils.logging.set_verbosity_error()
        logging.getLogger("shiq_lab").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()

        device = torch.device(spec["device"])
        if device.type == "cuda" and spec.get("tf32"):  # fp32 matmuls on tensor cores, for every trainer alike
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(spec["seed"])
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        rss_model = rss_bytes()
        tokenizer = word_tokenizer(model.config.vocab_size)
        n_pairs = spec["batch"] // 2 * spec["steps"]  # one epoch covers every step, for every trainer
        triples = make_triples(n_pairs, spec["prompt_len"], spec["completion_len"], model.config.vocab_size,
                               spec["seed"])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"bench-{spec['config']}-") as out:
            trainer = build_trainer(spec["config"], spec, model, tokenizer, triples, out,
                                    [_lockstep_callback(conn, device)])
            trainer.remove_callback(PrinterCallback)  # per-step log lines: noise here, the losses stay in log_history
            setup_s = time.perf_counter() - t0
            rss_setup, hwm_setup = rss_bytes(), hwm_bytes()
            hwm_reset = reset_hwm()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            conn.send({"ready": True, "n_params": n_params, "setup_s": setup_s})
            trainer.train()
            hwm_train = hwm_bytes()
            cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            step, tokens = _probe_step(trainer)
            report: dict[str, Any] = {
                "n_params": n_params, "tokens_per_step": tokens, "setup_s": setup_s,
                "rss_model_bytes": rss_model, "rss_after_setup_bytes": rss_setup, "hwm_setup_bytes": hwm_setup,
                "hwm_train_bytes": hwm_train if hwm_reset else -1,
                # what training holds and allocates above the loaded model (RSS-based, -1 if not measurable)
                "train_peak_rss_over_model_bytes": hwm_train - rss_model if hwm_reset else -1,
                "cuda_max_allocated_bytes": cuda_peak,
                "losses": losses,
            }
            if spec["measure_memory"]:
                report["step_memory"] = measure_memory(step, device)
            if spec["profile"]:
                report["profile"] = profile_table(step, device)
        conn.send({"report": report})
    except BaseException:  # noqa: BLE001 -- the parent must hear about any failure, then re-raises it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


#: imported once by the fork server, so that every worker starts with them loaded (seconds each otherwise)
PRELOAD = ("torch", "transformers.trainer", "datasets", "trl.trainer.dpo_trainer", "shiq_lab.train.trainer",
           "benchmarks.common", "benchmarks.lockstep")


def _context() -> mp.context.BaseContext:
    """A fork server (Linux) that has the heavy modules imported, else spawn.

    The server only imports (no torch thread pool has started), so forking it is safe, and each
    worker is still a fresh process for memory measurement.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([m for m in PRELOAD if importable(m)])
        return ctx
    return mp.get_context("spawn")


class LockstepWorkers:
    """One process per configuration, set up side by side, then stepped one at a time by :meth:`step`."""

    def __init__(self, specs: dict[str, dict[str, Any]], *, timeout_s: float = 1800.0,
                 failed: dict[str, str] | None = None):
        """``failed``: where given, a configuration that fails its set-up is dropped and its error recorded
        there (the others go on); otherwise any failure raises."""
        ctx = _context()
        self.timeout_s = timeout_s
        self.conns: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        self.ready: dict[str, dict[str, Any]] = {}
        for name, spec in specs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, spec), name=f"bench-{name}", daemon=True)
            proc.start()
            child.close()
            self.conns[name], self.procs[name] = parent, proc
        try:
            for name in specs:
                try:
                    self.ready[name] = self._recv(name)
                except (RuntimeError, TimeoutError) as err:
                    if failed is None:
                        raise
                    failed[name] = str(err)[-2000:]
                    self.conns.pop(name).close()
                    self.procs.pop(name).terminate()
        except BaseException:
            self.close()
            raise

    def _recv(self, name: str) -> dict[str, Any]:
        conn, proc = self.conns[name], self.procs[name]
        deadline = time.monotonic() + self.timeout_s
        while not conn.poll(0.5):
            if not proc.is_alive():
                raise RuntimeError(f"benchmark process {name!r} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"benchmark process {name!r} did not answer in {self.timeout_s:.0f} s")
        msg = conn.recv()
        if "error" in msg:
            raise RuntimeError(f"benchmark process {name!r} failed:\n{msg['error']}")
        return msg

    def step(self, name: str) -> dict[str, float]:
        """Let ``name`` run one optimizer step; returns its seconds on each clock."""
        self.conns[name].send("step")
        return self._recv(name)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Let every process leave training, one at a time; returns their final reports."""
        reports = {}
        for name, conn in self.conns.items():
            conn.send("finish")
            reports[name] = self._recv(name)["report"]
        self.close()
        return reports

    def close(self) -> None:
        for conn in self.conns.values():  # a worker waiting for a command gets EOF and exits
            conn.close()
        for proc in self.procs.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


def run_lockstep(specs: dict[str, dict[str, Any]], *, rounds: int, warmup: int, rotate: bool = True,
                 log: bool = True, failed: dict[str, str] | None = None
                 ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """Step the configurations of ``specs`` (each with ``steps = warmup + rounds``) interleaved.

    Returns ``(times, reports)``: per configuration, the post-warm-up seconds on each clock, and
    the process's final report (memory, losses, profile). With ``failed`` (a dict), configurations
    whose set-up fails are left out and their errors recorded there.
    """
    for name, spec in specs.items():
        if spec["steps"] != warmup + rounds:
            raise ValueError(f"{name}: steps={spec['steps']} must equal warmup + rounds = {warmup + rounds}")
    workers = LockstepWorkers(specs, failed=failed)
    names = list(workers.conns)
    if not names:
        raise RuntimeError(f"every configuration failed its set-up: {failed}")
    times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CLOCKS} for n in names}
    try:
        for r in range(warmup + rounds):
            order = names[r % len(names):] + names[:r % len(names)] if rotate else names
            for name in order:
                t = workers.step(name)
                if r >= warmup:
                    for c in CLOCKS:
                        times[name][c].append(t[c])
            if log:
                print(f"round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else "") + ": "
                      + ", ".join(f"{n} {times[n]['wall_s'][-1]:.2f}s" if r >= warmup else n for n in names), flush=True)
        reports = workers.finish()
    except BaseException:
        workers.close()
        raise
    for name in names:
        reports[name]["setup"] = workers.ready[name]
    return times, reports
