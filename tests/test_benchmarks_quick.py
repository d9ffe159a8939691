"""Smoke runs of the benchmark scripts (``--quick``): they run, write their results, and report the
ratios the goals are stated in. No timing is asserted (timings are the benchmark's job); memory,
which is deterministic, is."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_quick(module: str, out_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--threads", "1", "--out-dir", str(out_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_loss_kernel_quick(tmp_path):
    _run_quick("benchmarks.bench_loss_kernel", tmp_path)
    payload = json.loads((tmp_path / "loss_kernel.json").read_text())
    markdown = (tmp_path / "loss_kernel.md").read_text()
    assert payload["quick"] is True
    head = payload["headline"]
    for key in ("time_fused_over_sft", "peak_memory_fused_over_naive", "working_memory_fused_over_naive"):
        assert math.isfinite(head[key]) and head[key] > 0, key
    assert isinstance(head["meets_time_goal"], bool) and isinstance(head["meets_memory_goal"], bool)
    assert f"{head['time_fused_over_sft']:.3f}" in markdown
    assert payload["machine"]["torch_threads"] == 1

    rows = payload["main"]
    assert [r["frozen_head"] for r in rows] == [False, True]
    for row in rows:
        assert set(row["times"]) == {"sft_ce", "shiq_naive", "shiq_fused"}
        # the fused kernel's result is the naive one's
        assert all(v < 1e-5 for v in row["check"].values()), row["check"]
        mem = row["memory"]
        # the naive implementation holds [B, T, V] fp32 temporaries, the fused one only tiles
        assert mem["shiq_naive"]["largest_temp_bytes"] >= row["full_logits_fp32_bytes"]
        assert mem["shiq_fused"]["largest_temp_bytes"] < row["full_logits_fp32_bytes"]
        assert row["ratios"]["working_memory_fused_over_naive"] < 0.5

    for key in ("seq_len", "vocab"):
        sweep = payload["scaling"][key]
        assert len(sweep) == 3
        sizes = [r[key] for r in sweep]
        assert sizes == sorted(sizes)
        # memory of the naive path grows with T*V; the fused path's largest temporary is one tile
        naive = [r["memory"]["shiq_naive"]["largest_temp_bytes"] for r in sweep]
        assert naive == sorted(naive) and naive[-1] > naive[0]
        assert all(r["memory"]["shiq_fused"]["largest_temp_bytes"] < r["full_logits_fp32_bytes"] for r in sweep)
