"""Benchmark one training step: ShiQTrainer vs plain SFT vs TRL's DPOTrainer, on equal tokens (issue 6).

With precomputed reference statistics a ShiQ step is one forward and backward of the policy, the
work of supervised fine-tuning (SFT) on the same tokens. This script measures how close it gets:

- ``sft``: a plain ``transformers.Trainer`` on the same model and batch, the causal-LM loss
  (labels = the tokens, prompt masked with -100; the model computes its full logits).
- ``shiq``: :class:`shiq_lab.train.trainer.ShiQTrainer` (``loss_type="shiq"``), reference statistics
  computed once at construction (not in the timed steps).
- ``dpo``: TRL's ``DPOTrainer`` with its defaults (sigmoid loss, a reference model run at every step).
- ``dpo_precompute``: the same with ``precompute_ref_log_probs=True`` (reference pass at construction).

Equal work: the data are prompt / chosen / rejected triples of random token ids of fixed lengths.
SFT and ShiQ get one row per response (``--batch`` rows a step), DPO ``--batch / 2`` pairs a step,
i.e. the same ``--batch`` sequences of ``prompt + completion`` tokens. Same optimizer (AdamW,
constant learning rate, gradient clipping at 1), same sequence length, fp32 (``--bf16`` on a GPU),
no gradient checkpointing (TRL's ``DPOConfig`` turns it on by default; here it is off for every
trainer so that all do the same work), ``logging_steps=1`` for every trainer.

How it is measured: each configuration runs in its own process (``multiprocessing`` spawn), all
set up side by side; then the steps run in lockstep: a callback stops every trainer after each
optimizer step, and the parent lets one process at a time run its next step, round by round
(sft, shiq, dpo, ..., then the next round, starting one further along), so load drift from other
processes on a shared machine hits every configuration alike. A step's time runs from the go to
the end of the optimizer step: it covers logging of the previous step, fetching and collating the
batch, forward, backward, clipping and the optimizer. The first ``--warmup`` steps are dropped.
Memory: the process's resident-set high-water mark (``VmHWM``, reset just before training) above
its RSS with only the model loaded -- it includes optimizer state, gradients, activations and, for
DPO, the reference model copy --; and the peak bytes torch allocates during one more step
(``benchmarks.common.measure_memory``), with the largest single allocation, to show which [B, T, V]
tensors exist. ``--profile`` adds a ``torch.profiler`` table of one step per configuration.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_train_step --threads 1        # full run, a few minutes on CPU
    .venv/bin/python -m benchmarks.bench_train_step --quick            # smoke run (tests), seconds
    .venv/bin/python -m benchmarks.bench_train_step --device cuda --preset smollm2-135m --bf16 \
        --batch 16 --prompt-len 128 --completion-len 384                # GPU: tokens/s and MFU

MFU = 6 * parameters * tokens/s / peak FLOP/s (``--peak-tflops``, or a table of bf16 dense peaks
for known GPUs). It writes ``benchmarks/results/train_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and ``shiq_lab`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    CLOCKS,
    fmt_bytes,
    markdown_table,
    publish,
    ratio_summary,
    start_run,
    time_summary,
)

CONFIGS = ("sft", "shiq", "dpo", "dpo_precompute")
#: ShiQ tokens/s over each peer's: the goals of issue 6 (ShiQ >= 0.95 x SFT, >= 1.25 x DPO)
GOALS = {"shiq_over_sft": 0.95, "shiq_over_dpo": 1.25}
BETA = 0.1

#: Llama-shaped model sizes. "small" (the CPU default) has SmolLM2's proportions scaled down: the
#: output layer is ~40% of the forward FLOPs, as in small real LLMs (SmolLM2-135M ~20%, Qwen2.5-0.5B
#: ~25%). "smollm2-135m" is SmolLM2-135M's architecture (random weights: timing does not depend on them).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=1024),
    "small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=768, vocab_size=16384),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rope_theta=100000.0),
}

#: dense bf16 tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name()
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A6000", 155.0),
)

# token ids of the word-level tokenizer below; the data draws the other ids uniformly
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


# ---------------------------------------------------------------------------------------------
# model, tokenizer and data (identical in every process: built from seeds)
# ---------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int):
    """A tokenizer whose tokens are the words ``w<id>``: text ``"w5 w17"`` encodes to exactly [5, 17].

    It lets TRL's DPOTrainer, which tokenises text itself, see the same token ids as the
    pre-tokenised rows given to the other trainers.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(_SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def ids_to_text(ids: Iterable[int]) -> str:
    """Text that :func:`word_tokenizer` encodes back to ``ids`` (special ids as their token strings)."""
    return " ".join(_SPECIALS[i] if i < len(_SPECIALS) else f"w{i}" for i in ids)


def make_triples(n_pairs: int, prompt_len: int, completion_len: int, vocab_size: int, seed: int) -> list[dict[str, list[int]]]:
    """``n_pairs`` rows of random ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions end with EOS)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(len(_SPECIALS), vocab_size, (n,), generator=g).tolist()

    return [{"prompt_ids": draw(prompt_len), "chosen_ids": draw(completion_len - 1) + [EOS_ID],
             "rejected_ids": draw(completion_len - 1) + [EOS_ID]} for _ in range(n_pairs)]


def model_config(preset: str | dict[str, Any], max_positions: int):
    """The ``LlamaConfig`` of a preset name (or of a dict of LlamaConfig fields)."""
    from transformers import LlamaConfig

    fields = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    fields.setdefault("tie_word_embeddings", True)
    return LlamaConfig(max_position_embeddings=max(max_positions, 64), pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                       bos_token_id=BOS_ID, **fields)


def save_model(preset: str | dict[str, Any], folder: str | os.PathLike, *, max_positions: int, seed: int = 0) -> int:
    """Write a randomly initialised Llama checkpoint (fp32) to ``folder``; returns its parameter count.

    Every trainer loads this folder (TRL builds its reference model from the policy's path).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(preset, max_positions))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def lm_head_flop_share(preset: str | dict[str, Any], seq_len: int) -> float:
    """Fraction of a forward pass's matmul FLOPs spent in the output layer (attention scores included)."""
    c = PRESETS[preset] if isinstance(preset, str) else preset
    h, i, v, n_layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i) + 4 * seq_len * h
    head = 2 * h * v
    return head / (head + n_layers * per_layer)


# ---------------------------------------------------------------------------------------------
# process memory (Linux /proc)
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
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


def _profile_table(fn, rows: int = 15) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from shiq_lab.infra.runtime import quiet_native_stderr

    # quiet: the CPU profiler prints 'USDT: ... profiler_start / profiler_stop' to stderr around every block
    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {"self_cpu_total_ms": total / 1e3,
            "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                         "calls": e.count} for e in top]}


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Entry point of a configuration's process: build, report ready, train in lockstep, report."""
    try:
        for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}.items():
            os.environ.setdefault(k, v)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        import logging

        import transformers
        from transformers import AutoModelForCausalLM, PrinterCallback

        transformers.utils.logging.set_verbosity_error()
        logging.getLogger("shiq_lab").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
        from benchmarks.common import measure_memory

        device = torch.device(spec["device"])
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
                report["profile"] = _profile_table(step)
        conn.send({"report": report})
    except BaseException:  # noqa: BLE001 -- the parent must hear about any failure, then re-raises it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


#: imported once by the fork server, so that every worker starts with them loaded (seconds each otherwise)
PRELOAD = ("torch", "transformers.trainer", "datasets", "trl.trainer.dpo_trainer", "shiq_lab.train.trainer",
           "benchmarks.common", "benchmarks.bench_train_step")


def _context() -> mp.context.BaseContext:
    """A fork server (Linux) that has the heavy modules imported, else spawn.

    The server only imports (no torch thread pool has started), so forking it is safe, and each
    worker is still a fresh process for memory measurement.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
        return ctx
    return mp.get_context("spawn")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LockstepWorkers:
    """One process per configuration, set up side by side, then stepped one at a time by :meth:`step`."""

    def __init__(self, specs: dict[str, dict[str, Any]], *, timeout_s: float = 1800.0):
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
                self.ready[name] = self._recv(name)
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
        for name, proc in self.procs.items():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)


def run_lockstep(specs: dict[str, dict[str, Any]], *, rounds: int, warmup: int, rotate: bool = True,
                 log: bool = True) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """Step the configurations of ``specs`` (each with ``steps = warmup + rounds``) interleaved.

    Returns ``(times, reports)``: per configuration, the post-warm-up seconds on each clock, and
    the process's final report (memory, losses, profile).
    """
    names = list(specs)
    for name, spec in specs.items():
        if spec["steps"] != warmup + rounds:
            raise ValueError(f"{name}: steps={spec['steps']} must equal warmup + rounds = {warmup + rounds}")
    workers = LockstepWorkers(specs)
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


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float | None, str]:
    """Peak dense TFLOP/s for MFU and where it came from (flag, table, or unknown)."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS_BF16:
            if key in name:
                return value, f"table: {key} bf16 dense"
        return None, f"unknown GPU {name!r}: pass --peak-tflops"
    return None, "not reported: pass --peak-tflops (no peak table for CPUs or fp32)"


def summarise(times: dict[str, dict[str, list[float]]], reports: dict[str, dict[str, Any]], clock: str,
              peak: float | None) -> dict[str, Any]:
    """Per configuration: step time, tokens/s, memory and MFU; and ShiQ's speed over each peer."""
    out: dict[str, Any] = {"configs": {}, "shiq_speedup": {}}
    for name, rep in reports.items():
        t = {c: time_summary(times[name][c]) for c in CLOCKS}
        tps = rep["tokens_per_step"] / t[clock]["median"]
        model_tflops = 6 * rep["n_params"] * tps / 1e12
        out["configs"][name] = {
            "times": t, "tokens_per_step": rep["tokens_per_step"], "tokens_per_s": tps,
            "tokens_per_s_iqr": [rep["tokens_per_step"] / t[clock]["q3"], rep["tokens_per_step"] / t[clock]["q1"]],
            "model_tflops_per_s": model_tflops, "mfu": model_tflops / peak if peak else None,
            "train_peak_rss_over_model_bytes": rep["train_peak_rss_over_model_bytes"],
            "step_memory": rep.get("step_memory"), "cuda_max_allocated_bytes": rep["cuda_max_allocated_bytes"],
            "final_loss": rep["losses"][-1] if rep["losses"] else None, "setup_s": rep["setup_s"],
        }
    if "shiq" in times:
        for name in times:
            if name != "shiq":
                # time(peer) / time(shiq) per round = tokens/s(shiq) / tokens/s(peer)
                out["shiq_speedup"][name] = {c: ratio_summary(times[name][c], times["shiq"][c]) for c in CLOCKS}
    return out


def _iqr(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def build_markdown(payload: dict[str, Any]) -> str:
    mi, s, head, res = payload["machine"], payload["settings"], payload["headline"], payload["results"]
    clock = head["clock"]
    other = "wall_s" if clock == "cpu_s" else "cpu_s"
    clock_words = ("process CPU time (one torch thread: the step's time on an idle core, robust to other processes "
                   "sharing the machine)" if clock == "cpu_s" else "wall-clock time")
    m = s["model"]
    lines = [
        "# Training step: ShiQTrainer vs SFT (transformers.Trainer) vs TRL DPOTrainer",
        "",
        *(["**Quick smoke run (--quick): tiny sizes, not a measurement.**", ""] if payload["quick"] else []),
        f"Model: Llama-shaped, preset `{s['preset']}` ({m['n_params'] / 1e6:.1f} M parameters, hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, "
        f"MLP {m['intermediate_size']}, vocabulary {m['vocab_size']}, tied embeddings; the output layer is "
        f"{100 * m['lm_head_flop_share']:.0f}% of a forward pass's FLOPs). Batch: {s['batch']} sequences of "
        f"{s['prompt_len']} prompt + {s['completion_len']} response tokens per step for every trainer (DPO: "
        f"{s['batch'] // 2} pairs); AdamW, constant lr, clipping 1.0, {s['dtype']}, no gradient checkpointing, "
        f"TRL {payload['versions'].get('trl')}, transformers {payload['versions'].get('transformers')}.",
        "",
        f"Machine: {mi['cpu']} ({mi['cpu_count']} cores), device {mi['device']}"
        + (f" ({mi['gpu']})" if mi.get("gpu") else "")
        + f", torch {mi['torch']}, {s['threads']} torch thread(s) per process, load average "
        f"{mi.get('loadavg_1m_5m_15m')} at the start, {mi.get('loadavg_end')} at the end. Each configuration in its own "
        f"process, steps interleaved round by round; {s['rounds']} rounds after {s['warmup']} warm-up. Times: "
        f"{clock_words}, median [quartiles]; ratios: medians of per-round ratios [quartiles].",
        "",
    ]
    sp = res["shiq_speedup"]
    goal_lines = []
    for peer, key in (("sft", "shiq_over_sft"), ("dpo", "shiq_over_dpo")):
        if peer in sp:
            v = head[key]
            goal_lines.append(f"ShiQ / {peer.upper()} tokens/s = **{v:.3f}** (goal >= {GOALS[key]}: "
                              f"{'met' if v >= GOALS[key] else 'NOT met'})")
    if "dpo_precompute" in sp:
        goal_lines.append(f"ShiQ / DPO with precomputed reference = **{head['shiq_over_dpo_precompute']:.3f}**")
    lines += ["Headline: " + "; ".join(goal_lines) + ".", ""]
    table = []
    for name, c in res["configs"].items():
        mem = c.get("step_memory") or {}
        row = {
            "trainer": name,
            "step time (s)": f"{c['times'][clock]['median']:.3f} [{c['times'][clock]['q1']:.3f}, {c['times'][clock]['q3']:.3f}]",
            f"step ({other[:-2]} clock)": f"{c['times'][other]['median']:.3f}",
            "tokens/s": f"{c['tokens_per_s']:.0f}",
            "ShiQ speed-up over it": _iqr(sp[name][clock]) if name in sp else "1",
            f"({other[:-2]} clock)": f"{sp[name][other]['median']:.3f}" if name in sp else "1",
            "peak RSS above model": fmt_bytes(c["train_peak_rss_over_model_bytes"]),
            "torch peak in a step": fmt_bytes(mem.get("peak_bytes", -1)),
            "largest tensor in a step": fmt_bytes(mem.get("largest_alloc_bytes", -1)),
        }
        if c.get("cuda_max_allocated_bytes", -1) >= 0:
            row["CUDA max allocated"] = fmt_bytes(c["cuda_max_allocated_bytes"])
        row["model TFLOP/s (6N)"] = f"{c['model_tflops_per_s']:.3f}"
        row["MFU"] = f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "n/a"
        table.append(row)
    lines += [markdown_table(table, list(table[0])), ""]
    lines += [
        f"Tokens per step: {next(iter(res['configs'].values()))['tokens_per_step']} for every trainer "
        f"(checked in each process). [B, T, V] fp32 logits of one step: {fmt_bytes(s['full_logits_fp32_bytes'])}. "
        f"Peak RSS above model: resident-set high-water mark during training minus the RSS with the model loaded "
        f"(optimizer state, gradients, activations, DPO's reference copy). Torch peak / largest tensor: allocations "
        f"during one more optimizer step (torch.profiler replay on CPU). MFU: 6 x parameters x tokens/s over the peak "
        f"({payload['peak_source']}).",
    ]
    prof = payload.get("profiles") or {}
    if prof:
        lines += ["", "## Profile of one step (self CPU time, top operators)", ""]
        for name, p in prof.items():
            lines += [f"**{name}** (total {p['self_cpu_total_ms']:.0f} ms)", ""]
            lines.append(markdown_table(
                [{"op": o["op"], "self ms": f"{o['self_cpu_ms']:.1f}", "share": f"{100 * o['share']:.1f}%",
                  "calls": o["calls"]} for o in p["top_ops"][:10]], ["op", "self ms", "share", "calls"]))
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, two rounds: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every process (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="mixed precision (GPUs)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size (see PRESETS)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (DPO: batch/2 pairs)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--no-memory", action="store_true", help="skip the torch allocation measurement")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table of one step per trainer")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: GPU table, bf16)")
    ap.add_argument("--clock", choices=CLOCKS, default=None,
                    help="clock of the headline (default: cpu_s with one thread on a CPU, else wall_s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results")
    ap.add_argument("--name", default="train_step", help="stem of the result files")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.prompt_len, args.completion_len = "quick", 4, 8, 24
        args.rounds, args.warmup = 2, 1
    if args.batch < 2 or args.batch % 2:
        ap.error(f"--batch {args.batch}: must be even (DPO takes batch/2 pairs of chosen/rejected responses)")
    if "shiq" not in args.configs:
        ap.error("--configs must include shiq (the ratios are ShiQ's speed over each peer)")
    return args


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("transformers", "trl", "accelerate", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, clock, machine = start_run(args.threads, args.device, args.clock)
    seq_len = args.prompt_len + args.completion_len
    configs = list(args.configs)
    if any(c.startswith("dpo") for c in configs) and not _importable("trl"):
        print("trl is not installed (pip install '.[peers]'): skipping the DPO configurations", flush=True)
        configs = [c for c in configs if not c.startswith("dpo")]
    with tempfile.TemporaryDirectory(prefix="bench-train-model-") as model_dir:
        n_params = save_model(args.preset, model_dir, max_positions=seq_len, seed=args.seed)
        base = dict(model_dir=model_dir, batch=args.batch, prompt_len=args.prompt_len,
                    completion_len=args.completion_len, steps=args.warmup + args.rounds, device=args.device,
                    bf16=args.bf16, threads=args.threads, seed=args.seed, measure_memory=not args.no_memory,
                    profile=args.profile)
        specs = {c: {**base, "config": c} for c in configs}
        times, reports = run_lockstep(specs, rounds=args.rounds, warmup=args.warmup)
    tokens = {c: r["tokens_per_step"] for c, r in reports.items()}
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the trainers did not process equal tokens per step: {tokens}")
    peak, peak_source = peak_tflops(device, args.bf16, args.peak_tflops)
    results = summarise(times, reports, clock, peak)
    sp = results["shiq_speedup"]
    headline: dict[str, Any] = {"clock": clock}
    for peer in ("sft", "dpo", "dpo_precompute"):
        if peer in sp:
            headline[f"shiq_over_{peer}"] = sp[peer][clock]["median"]
    for key, goal in GOALS.items():
        if key in headline:
            headline[f"meets_{key}_goal"] = bool(headline[key] >= goal)
    headline["tokens_per_s"] = {c: v["tokens_per_s"] for c, v in results["configs"].items()}
    headline["train_peak_rss_over_model_bytes"] = {c: v["train_peak_rss_over_model_bytes"]
                                                   for c, v in results["configs"].items()}
    model = {**PRESETS[args.preset], "n_params": n_params, "lm_head_flop_share": lm_head_flop_share(args.preset, seq_len)}
    model.setdefault("tie_word_embeddings", True)
    payload = {
        "benchmark": "train_step",
        "quick": args.quick,
        "goals": {f"{k}_min": v for k, v in GOALS.items()},
        "machine": machine,
        "versions": _versions(),
        "settings": {"preset": args.preset, "model": model, "batch": args.batch, "prompt_len": args.prompt_len,
                     "completion_len": args.completion_len, "rounds": args.rounds, "warmup": args.warmup,
                     "threads": args.threads, "dtype": "bf16 autocast" if args.bf16 else "float32", "beta": BETA,
                     "configs": configs,
                     "full_logits_fp32_bytes": args.batch * seq_len * PRESETS[args.preset]["vocab_size"] * 4},
        "peak_tflops": peak, "peak_source": peak_source,
        "headline": headline,
        "results": results,
        "raw_times": times,
        "profiles": {c: r["profile"] for c, r in reports.items() if "profile" in r},
    }
    return publish(args.name, payload, build_markdown, device, args.out_dir)


if __name__ == "__main__":
    main()
