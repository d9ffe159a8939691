"""What the benchmark scripts share: timing, memory, results, the command line, and the fixtures.

No script imports another script: whatever two of them use lives here (measurement, the model
presets, the word tokenizer, the random triples), in :mod:`benchmarks.lockstep` (trainers stepped
in lockstep processes) or in :mod:`benchmarks.kernel_cases` (the loss-kernel cases).

- Timing interleaves the compared cases round by round (a, b, c, a, b, c, ...) after a warm-up,
  so a load change on a shared machine hits every case alike; ratios are taken per round and
  summarised by their median and quartiles. Two clocks: wall time, and the CPU time of this
  process (all its threads). With one torch thread on a CPU, CPU time is what wall time would be
  on an idle machine, minus the time other processes took the core: the steadier clock there.
- Memory is the peak of bytes allocated by torch during one call, above what was allocated when
  the call started. On CUDA this is ``torch.cuda.max_memory_allocated``; on CPU, where torch keeps
  no allocator statistics, it is replayed from the allocation events of ``torch.profiler``
  (``profile_memory=True``), which see every tensor torch allocates (``tracemalloc`` sees none).
- Results go to ``benchmarks/results/<name>.json`` (every number, plus the machine) and ``.md``;
  smoke runs (``--quick``) go to ``runs/bench-quick/`` (ignored by git) unless ``--out-dir`` says
  where, and never into ``benchmarks/results/``: committed measurements are only ever rewritten by
  full runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from shiq_lab.infra.notebooks import OFFLINE_ENV as _HUB_OFFLINE

__all__ = [
    "BOS_ID",
    "CLOCKS",
    "EOS_ID",
    "OFFLINE_ENV",
    "PAD_ID",
    "PEAK_TFLOPS_BF16",
    "PRESETS",
    "QUICK_DIR",
    "RESULTS_DIR",
    "UNK_ID",
    "add_common_args",
    "check_common_args",
    "fmt_bytes",
    "ids_to_text",
    "import_error",
    "importable",
    "interleaved_times",
    "iqr_text",
    "repeat_summary",
    "lm_head_flop_share",
    "machine_info",
    "make_triples",
    "markdown_table",
    "measure_memory",
    "model_config",
    "offline_env",
    "peak_tflops",
    "profile_table",
    "publish",
    "ratio_summary",
    "resolve_out_dir",
    "save_model",
    "start_run",
    "synchronize",
    "time_summary",
    "versions",
    "word_tokenizer",
    "write_results",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: where ``--quick`` runs write by default: ignored by git (``runs/``), so a smoke run leaves the tree clean
QUICK_DIR = ROOT / "runs" / "bench-quick"

#: the environment of every benchmark process: the library's offline variables (no hub access), no tokenizer
#: threads, no progress bars
OFFLINE_ENV: dict[str, str] = {**_HUB_OFFLINE, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def offline_env(base: Mapping[str, str] | None = None, *, apply: bool = False, **extra: str) -> dict[str, str]:
    """``base`` (default: ``os.environ``) with :data:`OFFLINE_ENV` filled in where unset, plus ``extra``.

    With ``apply=True`` the missing variables are also set in this process's ``os.environ``
    (a worker process, before it imports transformers).
    """
    env = dict(os.environ if base is None else base)
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    env.update(extra)
    if apply:
        for k, v in env.items():
            if k in OFFLINE_ENV or k in extra:
                os.environ[k] = v
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What produced the numbers: CPU/GPU, threads, versions and the load average (shared machines)."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA), so that wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall_s", "cpu_s")


def interleaved_times(
    cases: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int,
    device: torch.device,
    reset: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each case, ``rounds`` times, the cases interleaved within each round.

    Returns ``{case: {"wall_s": [...], "cpu_s": [...]}}`` (wall clock, and process CPU time).
    ``reset`` runs after every call, outside the timed region (e.g. to drop accumulated ``.grad``).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")

    def once(fn: Callable[[], Any]) -> tuple[float, float]:
        synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if reset is not None:
            reset()
        return wall, cpu

    for _ in range(warmup):
        for fn in cases.values():
            once(fn)
    times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in CLOCKS} for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            wall, cpu = once(fn)
            times[name]["wall_s"].append(wall)
            times[name]["cpu_s"].append(cpu)
    return times


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def time_summary(times: list[float]) -> dict[str, float]:
    """Median, min, quartiles (the spread) and count of a list of seconds."""
    q1, q3 = _quartiles(times)
    return {"median": statistics.median(times), "min": min(times), "q1": q1, "q3": q3, "n": len(times)}


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-round ratios numerator[i] / denominator[i]: median and quartiles."""
    if len(numerator) != len(denominator):
        raise ValueError("ratio_summary needs the same number of rounds on both sides")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q1, q3 = _quartiles(ratios)
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "n": len(ratios)}


def repeat_summary(values: list[float]) -> dict[str, Any]:
    """Median, quartiles and the values of one ratio measured in several repeats (the spread across runs)."""
    q1, q3 = _quartiles(values)
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "n": len(values), "values": values}


def iqr_text(r: Mapping[str, float]) -> str:
    """``median [q1, q3]`` of a :func:`ratio_summary` or :func:`time_summary`, three decimals."""
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def _cpu_memory(fn: Callable[[], Any]) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    from shiq_lab.infra.runtime import quiet_native_stderr

    # quiet: the CPU profiler prints 'USDT: ... profiler_start / profiler_stop' to stderr around every block
    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw allocation events (the aggregated event list folds them into operators)
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError as err:  # private API: fail loudly rather than report a wrong number
        raise RuntimeError("this torch version does not expose profiler memory events; measure on CUDA") from err
    events = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    current = peak = largest = largest_freed = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
        largest = max(largest, nbytes)
        largest_freed = max(largest_freed, -nbytes)
    return {"peak_bytes": peak, "retained_bytes": current, "largest_alloc_bytes": largest, "largest_temp_bytes": largest_freed}


def _cuda_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    retained = torch.cuda.memory_allocated(device) - start
    # CUDA keeps no largest-allocation statistic; -1 marks it unknown
    return {"peak_bytes": peak, "retained_bytes": retained, "largest_alloc_bytes": -1, "largest_temp_bytes": -1}


def measure_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Bytes torch allocates during one call of ``fn``, above what was allocated before it.

    Returns ``peak_bytes`` (highest point), ``retained_bytes`` (still held when ``fn`` returns,
    e.g. the ``.grad`` it leaves behind), ``working_bytes = peak - retained`` (the temporary
    memory), ``largest_alloc_bytes`` (the biggest single tensor) and ``largest_temp_bytes`` (the
    biggest tensor freed before ``fn`` returned, i.e. the biggest temporary); the last two on CPU
    only, -1 on CUDA.
    """
    out = _cuda_memory(fn, device) if device.type == "cuda" else _cpu_memory(fn)
    out["working_bytes"] = out["peak_bytes"] - out["retained_bytes"]
    return out


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> dict[str, Any]:
    """The operators that take the time of one call of ``fn``, by torch.profiler: self CPU time, or on CUDA
    self device (kernel) time. Returns ``{"clock", "total_ms", "top_ops": [{"op", "ms", "share", "calls"}]}``."""
    from torch.profiler import ProfilerActivity, profile

    from shiq_lab.infra.runtime import quiet_native_stderr

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    # quiet: the CPU profiler prints 'USDT: ... profiler_start / profiler_stop' to stderr around every block
    with quiet_native_stderr(), profile(activities=activities) as prof:
        fn()
        synchronize(device)

    def self_us(e: Any) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = prof.key_averages()
    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:rows]
    return {"clock": "self CUDA time" if cuda else "self CPU time", "total_ms": total / 1e3,
            "top_ops": [{"op": e.key, "ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
                        for e in top]}


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (MiB above 1 MiB)."""
    if n < 0:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (in that order)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths.

    ``out_dir`` defaults to :data:`RESULTS_DIR` for a full run and :data:`QUICK_DIR` for a payload
    with ``"quick": true``; a quick payload aimed at :data:`RESULTS_DIR` is refused.
    """
    out_dir = resolve_out_dir(out_dir, bool(payload.get("quick")))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def resolve_out_dir(out_dir: str | os.PathLike | None, quick: bool) -> Path:
    """Where a run writes: ``out_dir`` if given, else the committed results (full) or :data:`QUICK_DIR` (quick).

    A smoke run must never overwrite a measurement, so ``quick`` with ``out_dir`` inside
    :data:`RESULTS_DIR` raises ``ValueError``.
    """
    if out_dir is None:
        return QUICK_DIR if quick else RESULTS_DIR
    out = Path(out_dir).resolve()
    if quick and (out == RESULTS_DIR or RESULTS_DIR in out.parents):
        raise ValueError(f"--out-dir {out_dir}: a --quick run would overwrite the committed results in {RESULTS_DIR}; "
                         f"leave --out-dir unset (default {QUICK_DIR}) or give a folder outside benchmarks/results")
    return out


def add_common_args(ap: argparse.ArgumentParser, *, name: str, threads: int | None = 1) -> None:
    """The flags every benchmark takes: --quick, --threads, --device, --clock, --seed, --out-dir, --name."""
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one or two rounds: a smoke test, not a measurement")
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch threads (0 or unset: torch's default)" + (f"; default {threads}" if threads else ""))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--clock", choices=CLOCKS, default=None,
                    help="clock of the headline (default: cpu_s with one thread on a CPU, else wall_s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help=f"default: benchmarks/results (full runs) or {QUICK_DIR.relative_to(ROOT)} (--quick)")
    ap.add_argument("--name", default=name, help="stem of the result files (default: %(default)s)")


def check_common_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Resolve ``args.out_dir`` (see :func:`resolve_out_dir`) before any work, as a usage error if refused."""
    try:
        args.out_dir = resolve_out_dir(args.out_dir, args.quick)
    except ValueError as err:
        ap.error(str(err))
    return args


def start_run(threads: int | None, device_name: str, clock: str | None) -> tuple[torch.device, str, dict[str, Any]]:
    """Set the thread count; return the device, the clock to time with and the machine's description.

    With one torch thread on a CPU the clock is process CPU time (immune to other processes sharing
    the cores); otherwise wall time. An explicit ``clock`` wins.
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    clock = clock or ("cpu_s" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall_s")
    return device, clock, machine_info(device)


def publish(name: str, payload: dict[str, Any], build_markdown: Callable[[dict[str, Any]], str],
            device: torch.device, out_dir: Path | None = None) -> dict[str, Any]:
    """Record the end-of-run load, write JSON + markdown, print the markdown; returns the payload."""
    payload["machine"]["loadavg_end"] = machine_info(device).get("loadavg_1m_5m_15m")
    markdown = build_markdown(payload)
    json_path, md_path = write_results(name, payload, markdown, out_dir)
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def importable(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def import_error(module: str, *names: str) -> str | None:
    """None when ``module`` (and ``names`` from it) imports here, else why not (missing, or broken against this
    environment, e.g. a peer built for another transformers): peers are checked before a benchmark relies on them."""
    import importlib

    try:
        mod = importlib.import_module(module)
        for name in names:
            getattr(mod, name)
    except Exception as err:  # noqa: BLE001 -- any failure means: skip this peer, say why
        return f"{type(err).__name__}: {err}"[:300]
    return None


def versions(modules: Iterable[str] = ("torch", "transformers", "trl", "accelerate", "datasets")) -> dict[str, str]:
    """Installed versions of ``modules`` (``"not installed"`` where missing), from package metadata."""
    from importlib import metadata

    out = {}
    for mod in modules:
        try:
            out[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            out[mod] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# fixtures: model shapes, tokenizer and data, identical in every process (built from seeds)
# ---------------------------------------------------------------------------------------------

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

# token ids of the word-level tokenizer below; the data draws the other ids uniformly
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


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


#: dense bf16 tensor-core peaks (TFLOP/s), matched in order against torch.cuda.get_device_name(): NVIDIA's
#: datasheets give the Hopper figures "with sparsity", dense is half: H100 / H200 SXM 1,979 -> 989.5,
#: H100 PCIe 1,513 -> 756.5, H100 / H200 NVL 1,671 -> 835.5 (H200 datasheet, nvidia.com/en-us/data-center/h200;
#: H100 datasheet). The NVL and PCIe cards are matched before the SXM names they contain.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.5), ("H200", 989.5),
    ("GH200", 989.5), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A6000", 155.0),
)


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

