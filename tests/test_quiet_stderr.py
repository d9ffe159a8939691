"""Benchmark output without the CPU profiler's native 'USDT: profiler_start / profiler_stop' lines."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import sys, torch
from torch.profiler import ProfilerActivity, profile
from shiq_lab.infra.runtime import quiet_native_stderr
x = torch.randn(8, 8, requires_grad=True)
def step():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        (x @ x).sum().backward()
if sys.argv[1] == "quiet":
    with quiet_native_stderr():
        step()
        print("hidden", file=sys.stderr)
else:
    step()
print("after", file=sys.stderr)
"""


def _stderr(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_native_profiler_lines_are_silenced_and_stderr_comes_back():
    quiet = _stderr("quiet")
    assert "profiler_start" not in quiet and "hidden" not in quiet
    assert quiet.strip().endswith("after")  # stderr is restored after the block
    loud = _stderr("loud")
    assert loud.strip().endswith("after")
    # (the control: this torch build does print them without the context; if a later one stops, the test stays true)
    assert "profiler_start" in loud or "USDT" not in loud
