"""The training-step, reference-precompute and scaling benchmarks (issue 6).

Fast tests check the pieces the measurements rest on (the tokenizer that gives TRL our token ids,
the FLOP share, the memory probes, the ratio direction, the MFU peak table). The ``--quick`` runs
(marked slow: they start several processes that import transformers and TRL) check that each
script runs end to end and reports its ratios as finite positive numbers. No timing is asserted.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_train_step as bts
from benchmarks import common, lockstep
from benchmarks.bench_scaling import loglog_slope

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# fast: the pieces
# ---------------------------------------------------------------------------------------------


def test_word_tokenizer_round_trips_token_ids():
    tok = common.word_tokenizer(50)
    triples = common.make_triples(3, prompt_len=4, completion_len=5, vocab_size=50, seed=1)
    for t in triples:
        assert len(t["prompt_ids"]) == 4 and len(t["chosen_ids"]) == 5 and t["chosen_ids"][-1] == common.EOS_ID
        assert min(t["prompt_ids"] + t["chosen_ids"][:-1]) >= 4  # special ids never drawn
        # TRL tokenises prompt + " " + completion text; it must get exactly prompt_ids + chosen_ids
        text = common.ids_to_text(t["prompt_ids"]) + " " + common.ids_to_text(t["chosen_ids"])
        assert tok(text, add_special_tokens=True)["input_ids"] == t["prompt_ids"] + t["chosen_ids"]
    assert tok.pad_token_id == common.PAD_ID and tok.eos_token_id == common.EOS_ID


def test_triples_are_deterministic_and_seeded():
    a = common.make_triples(2, 3, 4, 100, seed=0)
    assert a == common.make_triples(2, 3, 4, 100, seed=0)
    assert a != common.make_triples(2, 3, 4, 100, seed=1)


def test_lm_head_flop_share_by_hand():
    # h=4, heads=2, kv heads=1 -> kv width 2; per layer 2*(2*16 + 2*8 + 3*4*8) + 4*T*h = 2*144 + 16*T
    arch = dict(hidden_size=4, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=8, vocab_size=10)
    head = 2 * 4 * 10
    per_layer = 2 * 144 + 4 * 5 * 4
    assert common.lm_head_flop_share(arch, seq_len=5) == pytest.approx(head / (head + 3 * per_layer))
    # the CPU preset is the "output layer matters" regime of small real LLMs (SmolLM2-135M: ~20%)
    assert 0.2 < common.lm_head_flop_share("small", 256) < 0.5
    assert 0.1 < common.lm_head_flop_share("smollm2-135m", 512) < 0.3


def test_high_water_mark_sees_a_freed_allocation_and_resets():
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    assert lockstep.reset_hwm()
    before = lockstep.hwm_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert lockstep.hwm_bytes() - before >= 60 * 2**20
    assert lockstep.reset_hwm()
    assert lockstep.hwm_bytes() - lockstep.rss_bytes() < 8 * 2**20


def test_summarise_speedup_is_peer_time_over_shiq_time():
    times = {"shiq": {"wall_s": [1.0, 1.0, 2.0], "cpu_s": [1.0, 1.0, 1.0]},
             "sft": {"wall_s": [2.0, 3.0, 2.0], "cpu_s": [1.5, 1.5, 1.5]}}
    rep = {"tokens_per_step": 100, "n_params": 1000, "train_peak_rss_over_model_bytes": 5, "cuda_max_allocated_bytes": -1,
           "losses": [0.5], "setup_s": 1.0}
    out = bts.summarise(times, {"shiq": rep, "sft": rep}, "cpu_s", peak=1e-9)
    assert out["shiq_speedup"]["sft"]["cpu_s"]["median"] == pytest.approx(1.5)
    assert out["shiq_speedup"]["sft"]["wall_s"]["median"] == pytest.approx(2.0)  # per-round ratios 2, 3, 1
    assert out["configs"]["shiq"]["tokens_per_s"] == pytest.approx(100.0)
    assert out["configs"]["sft"]["tokens_per_s"] == pytest.approx(100 / 1.5)
    # MFU = 6 * N * tokens/s / peak; peak given in TFLOP/s
    assert out["configs"]["shiq"]["mfu"] == pytest.approx(6 * 1000 * 100 / 1e12 / 1e-9)


def test_peak_table_and_flag():
    assert common.peak_tflops(torch.device("cpu"), False, 3.5) == (3.5, "--peak-tflops")
    assert common.peak_tflops(torch.device("cpu"), True, None)[0] is None
    names = [k for k, _ in common.PEAK_TFLOPS_BF16]
    assert names.index("H100 PCIe") < names.index("H100")  # the PCIe card is matched before the SXM one


def test_loglog_slope_recovers_powers():
    sizes = [1, 2, 4, 8]
    assert loglog_slope(sizes, [3 * s for s in sizes]) == pytest.approx(1.0)
    assert loglog_slope(sizes, [s * s for s in sizes]) == pytest.approx(2.0)
    assert loglog_slope([1], [1]) is None


def test_bad_batch_is_refused():
    with pytest.raises(SystemExit):
        bts.parse_args(["--batch", "3"])


# ---------------------------------------------------------------------------------------------
# slow: the scripts end to end (--quick)
# ---------------------------------------------------------------------------------------------


def _run_quick(module: str, out_dir: Path) -> dict:
    env = common.offline_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--threads", "1", "--out-dir", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    name = module.rsplit(".", 1)[1].removeprefix("bench_")
    assert (out_dir / f"{name}.md").read_text().startswith("# ")
    return json.loads((out_dir / f"{name}.json").read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_train_step_quick(tmp_path):
    payload = _run_quick("benchmarks.bench_train_step", tmp_path)
    head = payload["headline"]
    assert payload["quick"] is True and payload["machine"]["torch_threads"] == 1
    for key in ("shiq_over_sft", "shiq_over_dpo", "shiq_over_dpo_precompute"):
        assert _positive(head[key]), key
    assert isinstance(head["meets_shiq_over_sft_goal"], bool) and isinstance(head["meets_shiq_over_dpo_goal"], bool)
    configs = payload["results"]["configs"]
    assert set(configs) == set(lockstep.CONFIGS)
    tokens = {c["tokens_per_step"] for c in configs.values()}
    s = payload["settings"]
    assert tokens == {s["batch"] * (s["prompt_len"] + s["completion_len"])}  # equal tokens for every trainer
    for name, c in configs.items():
        assert _positive(c["tokens_per_s"]) and _positive(c["model_tflops_per_s"]), name
        assert _positive(c["train_peak_rss_over_model_bytes"]), name
        assert _positive(c["step_memory"]["peak_bytes"]), name
        assert math.isfinite(c["final_loss"]), name
        assert len(payload["raw_times"][name]["cpu_s"]) == s["rounds"]
    # the SFT step (transformers' causal-LM loss) holds the [B, T, V] fp32 logits; the memory probe must see them
    assert configs["sft"]["step_memory"]["largest_alloc_bytes"] >= s["full_logits_fp32_bytes"]


@pytest.mark.slow
def test_reference_precompute_quick(tmp_path):
    payload = _run_quick("benchmarks.bench_reference_precompute", tmp_path)
    head = payload["headline"]
    for key in ("precompute_over_forward", "precompute_cached_over_forward", "precompute_tokens_per_s",
                "forward_tokens_per_s", "cache_hit_s"):
        assert _positive(head[key]), key
    # the precompute's statistics are the full-logit log-probabilities
    assert payload["results"]["check_max_abs_diff"] < 1e-4
    # the plain forward holds [B, T, V] logits; the precompute's largest tensor is smaller
    res, full = payload["results"], payload["settings"]["batch_logits_fp32_bytes"]
    assert res["forward"]["memory"]["largest_alloc_bytes"] >= full
    assert res["precompute"]["memory"]["largest_alloc_bytes"] < full


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    payload = _run_quick("benchmarks.bench_scaling", tmp_path)
    head = payload["headline"]
    assert head["fused_kernel_never_full_logits"] and head["naive_kernel_holds_full_logits"]
    assert head["sft_step_holds_full_logits"]
    for key in ("seq_len", "vocab"):
        kernel, step = payload["kernel"][key], payload["step"][key]
        assert len(kernel) == 3 and len(step) == 2
        assert [r[key] for r in kernel] == sorted(r[key] for r in kernel)
        for r in step:
            for c in ("sft", "shiq"):
                assert _positive(r["configs"][c]["times"]["cpu_s"]["median"])
                assert _positive(r["configs"][c]["step_memory"]["peak_bytes"])
        # the naive kernel's memory grows in proportion to T*V (slope 1 in T and in V)
        assert payload["slopes"]["kernel"][key]["shiq_naive"]["peak_memory"] == pytest.approx(1.0, abs=0.1)


def test_a_peer_that_does_not_import_is_named_not_fatal():
    assert common.import_error("json", "dumps") is None
    assert common.import_error("no_such_module_xyz").startswith("ModuleNotFoundError")
    assert common.import_error("json", "no_such_name").startswith("AttributeError")


@pytest.mark.slow
def test_a_configuration_that_fails_its_setup_is_left_out(tmp_path):
    model_dir = tmp_path / "model"
    common.save_model("quick", model_dir, max_positions=32)
    base = {"model_dir": str(model_dir), "batch": 2, "prompt_len": 4, "completion_len": 8, "steps": 2, "device": "cpu",
            "bf16": False, "threads": 1, "seed": 0, "measure_memory": False, "profile": False}
    specs = {"shiq": {**base, "config": "shiq"}, "broken": {**base, "config": "no-such-trainer"}}
    failed: dict[str, str] = {}
    times, reports = lockstep.run_lockstep(specs, rounds=1, warmup=1, log=False, failed=failed)
    assert set(reports) == {"shiq"} and len(times["shiq"]["cpu_s"]) == 1
    assert set(failed) == {"broken"} and "unknown configuration 'no-such-trainer'" in failed["broken"]
    with pytest.raises(RuntimeError, match="no-such-trainer"):  # without ``failed``: strict
        lockstep.run_lockstep({"broken": specs["broken"]}, rounds=1, warmup=1, log=False)
