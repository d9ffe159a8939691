"""Smoke runs of the benchmark scripts (``--quick``): they run, write their results, and report the
ratios the goals are stated in. No timing is asserted (timings are the benchmark's job); memory,
which is deterministic, is."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import QUICK_DIR, RESULTS_DIR, offline_env, resolve_out_dir

ROOT = Path(__file__).resolve().parent.parent


def _run_quick(module: str, out_dir: Path | None, *extra: str) -> subprocess.CompletedProcess:
    args = ["--out-dir", str(out_dir)] if out_dir is not None else []
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--threads", "1", *args, *extra],
        cwd=ROOT, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def results_digest() -> dict[str, str]:
    """sha256 of every file under benchmarks/results/ (the committed measurements)."""
    return {str(p.relative_to(RESULTS_DIR)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(RESULTS_DIR.rglob("*")) if p.is_file()}


def test_quick_runs_never_write_the_committed_results(tmp_path):
    # the default folder of a smoke run is the ignored runs/bench-quick/, and aiming one at results/ is refused
    assert resolve_out_dir(None, quick=True) == QUICK_DIR and resolve_out_dir(None, quick=False) == RESULTS_DIR
    with pytest.raises(ValueError, match="overwrite the committed results"):
        resolve_out_dir(RESULTS_DIR, quick=True)
    with pytest.raises(ValueError, match="overwrite the committed results"):
        resolve_out_dir(RESULTS_DIR / "sub", quick=True)
    assert resolve_out_dir(tmp_path, quick=True) == tmp_path.resolve()
    before = results_digest()
    proc = _run_quick("benchmarks.bench_loss_kernel", None, "--no-scaling")  # no --out-dir: the default folder
    assert f"wrote {QUICK_DIR / 'loss_kernel.json'}" in proc.stdout
    assert json.loads((QUICK_DIR / "loss_kernel.json").read_text())["quick"] is True
    refused = subprocess.run([sys.executable, "-m", "benchmarks.bench_loss_kernel", "--quick", "--no-scaling",
                              "--out-dir", str(RESULTS_DIR)], cwd=ROOT, env=offline_env(OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "overwrite the committed results" in refused.stderr
    assert results_digest() == before  # byte-identical


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


def test_loss_kernel_quick_compiled_row(tmp_path):
    # --compiled adds the torch.compile'd kernel: its own row, ratios and headline, and its result is the plain one's
    _run_quick("benchmarks.bench_loss_kernel", tmp_path, "--no-scaling", "--no-frozen", "--compiled")
    payload = json.loads((tmp_path / "loss_kernel.json").read_text())
    head, (row,) = payload["headline"], payload["main"]
    assert payload["settings"]["compiled"] is True
    assert set(row["times"]) == {"sft_ce", "shiq_naive", "shiq_fused", "shiq_compiled"}
    for key in ("time_compiled_over_sft", "time_compiled_over_fused", "peak_memory_compiled_over_naive"):
        assert math.isfinite(head[key]) and head[key] > 0, key
    assert head["time_compiled_over_sft_repeats"]["n"] == payload["settings"]["repeats"]
    diffs = {k: v for k, v in row["check"].items() if k.startswith("compiled_")}
    assert len(diffs) == 3 and all(v < 1e-5 for v in diffs.values()), row["check"]
    assert row["memory"]["shiq_compiled"]["largest_temp_bytes"] < row["full_logits_fp32_bytes"]
    assert f"{head['time_compiled_over_sft']:.3f}" in (tmp_path / "loss_kernel.md").read_text()


def test_synthetic_quick_writes_outside_the_committed_results():
    from shiq_lab.tasks.synthetic.__main__ import main as bench_main
    from shiq_lab.tasks.synthetic.__main__ import out_dir

    assert out_dir(None, quick=True) == Path("runs/bench-quick")
    assert out_dir(None, quick=False) == Path("benchmarks/results")
    assert out_dir("benchmarks/results", quick=True) is None and out_dir("elsewhere", quick=True) == Path("elsewhere")
    before = results_digest()
    assert bench_main(["synthetic", "--quick", "--out", "benchmarks/results"]) == 2  # refused before any run
    assert results_digest() == before


def test_readme_performance_blocks_are_registered_with_the_one_generator():
    """The performance blocks are rendered by shiq_lab.infra.readme (tests/test_readme_generated.py checks them)."""
    from benchmarks.readme_sections import SECTIONS
    from shiq_lab.infra import readme

    assert SECTIONS.items() <= readme.SECTIONS.items()
    for name in SECTIONS:
        assert readme.render(name, ROOT).strip()


def test_goal_status_uses_the_spread():
    from benchmarks.readme_sections import _status

    assert _status({"median": 1.03, "q1": 0.98, "q3": 1.09}, "<=", 1.1) == "met"
    assert _status({"median": 1.03, "q1": 0.98, "q3": 1.108}, "<=", 1.1).startswith("met at the median")
    assert _status({"median": 1.12, "q1": 1.05, "q3": 1.2}, "<=", 1.1) == "NOT met"
    assert _status({"median": 1.2, "q1": 0.9, "q3": 1.3}, ">=", 0.95).startswith("met at the median")


@pytest.mark.parametrize("script", ["bench_loss_kernel", "bench_train_step", "bench_reference_precompute",
                                    "bench_scaling", "bench_bfcl_rollout"])
def test_every_benchmark_sends_quick_runs_outside_the_results(script):
    import importlib

    parse = importlib.import_module(f"benchmarks.{script}").parse_args
    assert parse(["--quick"]).out_dir == QUICK_DIR
    assert parse([]).out_dir == RESULTS_DIR
    with pytest.raises(SystemExit):  # refused before any work
        parse(["--quick", "--out-dir", str(RESULTS_DIR)])


def test_bfcl_rollout_quick_plays_the_same_trajectories_at_every_batch_size(tmp_path):
    from shiq_lab.infra import assets

    if not assets.is_fetched("bfcl"):
        pytest.skip("the BFCL-V3 asset is not fetched: run `python -m shiq_lab.infra.assets fetch bfcl`")
    _run_quick("benchmarks.bench_bfcl_rollout", tmp_path)
    payload = json.loads((tmp_path / "bfcl_rollout_tiny.json").read_text())
    assert payload["quick"] is True and payload["settings"]["trajectories"] == 4
    assert [r["batch_size"] for r in payload["results"].values()] == [1, 4]
    assert all(r["same_calls_as_single"] for r in payload["results"].values())
    assert f"{payload['results']['batch_4']['trajectories_per_s']:.3f}" in (tmp_path / "bfcl_rollout_tiny.md").read_text()
