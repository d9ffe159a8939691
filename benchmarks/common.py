"""Timing and memory utilities shared by the benchmark scripts (no benchmark logic here).

- Timing interleaves the compared cases round by round (a, b, c, a, b, c, ...) after a warm-up,
  so a load change on a shared machine hits every case alike; ratios are taken per round and
  summarised by their median and quartiles. Two clocks: wall time, and the CPU time of this
  process (all its threads). With one torch thread on a CPU, CPU time is what wall time would be
  on an idle machine, minus the time other processes took the core: the steadier clock there.
- Memory is the peak of bytes allocated by torch during one call, above what was allocated when
  the call started. On CUDA this is ``torch.cuda.max_memory_allocated``; on CPU, where torch keeps
  no allocator statistics, it is replayed from the allocation events of ``torch.profiler``
  (``profile_memory=True``), which see every tensor torch allocates (``tracemalloc`` sees none).
- Results go to ``benchmarks/results/<name>.json`` (every number, plus the machine) and ``.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS_DIR",
    "machine_info",
    "synchronize",
    "CLOCKS",
    "interleaved_times",
    "time_summary",
    "ratio_summary",
    "measure_memory",
    "write_results",
    "markdown_table",
    "fmt_bytes",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


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

