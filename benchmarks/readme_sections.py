"""The README's performance blocks, generated from the committed results in ``benchmarks/results/``.

Each function takes the repository root and returns the markdown of one block (README_GEN contract:
``<!-- BEGIN generated: NAME -->`` ... ``<!-- END generated: NAME -->``, rewritten by
``python -m shiq_lab.infra.readme --write``). They read only committed results files and format
numbers with fixed precision, so the output is byte-deterministic. :data:`SECTIONS` maps block names
to ``module:function`` for ``shiq_lab/infra/readme.py``.

A goal is stated with its spread: the median of the per-round ratios within one run (each round
times every compared case once, interleaved, so a ratio is taken against a baseline measured in the
same round) and its quartiles. "met" needs the median and the unfavourable quartile on the right side
of the bound; where only the median is, the status says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "cpu_goals", "cpu_loss_kernel", "cpu_train_step", "cpu_precompute_scaling", "gpu_receipt"]

RESULTS = Path("benchmarks") / "results"
SECTIONS: dict[str, str] = {
    "performance-cpu-goals": "benchmarks.readme_sections:cpu_goals",
    "performance-cpu-loss-kernel": "benchmarks.readme_sections:cpu_loss_kernel",
    "performance-cpu-train-step": "benchmarks.readme_sections:cpu_train_step",
    "performance-cpu-precompute-scaling": "benchmarks.readme_sections:cpu_precompute_scaling",
    "performance-gpu": "benchmarks.readme_sections:gpu_receipt",
}


def _load(root: Path, name: str) -> dict[str, Any]:
    path = Path(root) / RESULTS / f"{name}.json"
    data = json.loads(path.read_text())
    if data.get("quick") or data.get("dry_run"):
        raise ValueError(f"{path}: a --quick / --dry-run result is committed; the README quotes full runs only")
    return data


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _iqr(r: dict[str, float], digits: int = 2) -> str:
    return f"**{r['median']:.{digits}f}** [{r['q1']:.{digits}f}, {r['q3']:.{digits}f}]"


def _status(r: dict[str, float], op: str, bound: float) -> str:
    """met / NOT met from the median; whether the unfavourable quartile also clears the bound."""
    ok = (lambda x: x >= bound) if op == ">=" else (lambda x: x <= bound)
    worst = r["q1"] if op == ">=" else r["q3"]
    if ok(r["median"]):
        return "met" if ok(worst) else "met at the median (a quartile is past the bound)"
    return "NOT met"


def _machine(mi: dict[str, Any]) -> str:
    load = mi.get("loadavg_1m_5m_15m") or ["?"]
    end = mi.get("loadavg_end") or ["?"]
    return (f"{mi['cpu']}, {mi['cpu_count']} cores, torch {mi['torch']}, {mi['torch_threads']} torch thread(s), "
            f"load average {load[0]} at the start, {end[0]} at the end")


def _clock(head: dict[str, Any]) -> str:
    return "process CPU time" if head.get("clock") == "cpu_s" else "wall-clock time"


def cpu_goals(root: Path) -> str:
    """The CPU goals of issue 6 with their spread, one row per goal."""
    lk, ts = _load(root, "loss_kernel"), _load(root, "train_step")
    rp, sc = _load(root, "reference_precompute"), _load(root, "scaling")
    clock = lk["headline"]["clock"]
    first = lk["main"][0]
    sp = ts["results"]["shiq_speedup"]
    tc = ts["headline"]["clock"]
    # across runs where the results have repeats (median of the runs' medians), else within the one run
    kernel = lk["headline"].get("time_fused_over_sft_repeats") or first["ratios"]["time_fused_over_sft"][clock]
    rows = [
        ("fused ShiQ loss time ≤ 1.1 × PyTorch cross-entropy (B = 1, T = 512, V = 49,152, trained output layer)",
         kernel, "<=", lk["goals"]["time_fused_over_sft_max"]),
        ("ShiQTrainer tokens/s ≥ 0.95 × SFT (`transformers.Trainer`, same model, batch and tokens)",
         sp["sft"][tc], ">=", ts["goals"]["shiq_over_sft_min"]),
        ("ShiQTrainer tokens/s ≥ 1.25 × TRL `DPOTrainer` (defaults: reference forward every step)",
         sp["dpo"][tc], ">=", ts["goals"]["shiq_over_dpo_min"]),
    ]
    lines = ["| goal (CPU) | measured: median [quartiles] | status |", "|---|---|---|"]
    for text, r, op, bound in rows:
        over = f"{r['n']} runs of {lk['settings']['rounds']} rounds" if "values" in r else f"{r['n']} rounds"
        lines.append(f"| {text} | {_iqr(r, 3)} ({over}) | {_status(r, op, bound)} |")
    mem = first["ratios"]["peak_memory_fused_over_naive"]
    lines.append(f"| fused ShiQ extra peak memory ≤ 0.25 × the naive full-logits ShiQ (same case) | **{mem:.3f}** "
                 f"(deterministic; temporaries only: {first['ratios']['working_memory_fused_over_naive']:.3f}) | "
                 f"{'met' if mem <= lk['goals']['peak_memory_fused_over_naive_max'] else 'NOT met'} |")
    r = sp["dpo_precompute"][tc]
    lines.append(f"| ShiQTrainer vs `DPOTrainer(precompute_ref_log_probs=True)` | {_iqr(r, 3)} | (no goal) |")
    r = rp["results"]["ratios_over_forward"]["precompute"][rp["headline"]["clock"]]
    lines.append(f"| reference precompute tokens/s vs a plain `model(input_ids)` forward | {_iqr(r, 3)} | (reported) |")
    h = sc["headline"]
    linear = h["fused_kernel_never_full_logits"] and h["shiq_step_never_full_logits"] and h["sft_step_holds_full_logits"]
    lines.append(f"| loss and step grow linearly in T and V, with no `[B, T, V]` fp32 tensor | kernel time slopes "
                 f"{h['fused_kernel_time_slope_T']:.2f} (T), {h['fused_kernel_time_slope_V']:.2f} (V); step "
                 f"{h['shiq_step_time_slope_T']:.2f} (T); largest-tensor checks "
                 f"{'all pass' if linear else 'FAIL'} | {'met' if linear else 'NOT met'} |")
    lines += ["", "Each ratio is the median of per-round ratios within a run, quartiles in brackets; where the loss kernel "
              "was run several times, the median and quartiles of those runs' medians (the spread across runs). "
              f"{_clock(lk['headline'])} "
              f"with one torch thread (steadier than wall time on a shared machine). Loss kernel: "
              f"{_machine(lk['machine'])}. Training step: {_machine(ts['machine'])}."]
    return "\n".join(lines)


def cpu_loss_kernel(root: Path) -> str:
    """The loss-kernel table (fp32, CPU) and its scaling over T."""
    lk = _load(root, "loss_kernel")
    clock = lk["headline"]["clock"]
    lines = ["| B × T | output layer | SFT cross-entropy | naive ShiQ | fused ShiQ | fused / SFT time | "
             "fused / naive extra peak memory |", "|---|---|---|---|---|---|---|"]
    for r in lk["main"]:
        t, m, q = r["times"], r["memory"], r["ratios"]
        cell = {k: f"{t[k][clock]['median']:.2f} s, {_mib(m[k]['peak_bytes'])}" for k in ("sft_ce", "shiq_naive", "shiq_fused")}
        lines.append(f"| {r['batch']} × {r['seq_len']} | {'frozen' if r['frozen_head'] else 'trained'} | {cell['sft_ce']} | "
                     f"{cell['shiq_naive']} | {cell['shiq_fused']} | {_iqr(q['time_fused_over_sft'][clock])} | "
                     f"**{q['peak_memory_fused_over_naive']:.3f}** (temporaries only: "
                     f"{q['working_memory_fused_over_naive']:.3f}) |")
    check = lk["main"][0].get("check", {})
    seq = lk["scaling"]["seq_len"]
    lines += ["", f"Times: medians of {lk['settings']['rounds']} interleaved rounds ({_clock(lk['headline'])}); ratios: "
              f"medians of per-round ratios [quartiles]. Memory: torch's peak allocation during one step above the "
              f"inputs (it includes the {_mib(lk['main'][0]['memory']['shiq_fused']['retained_bytes'])} output-layer "
              f"gradient every method returns). Fused vs naive on the same inputs: "
              + ", ".join(f"{k.replace('_rel_diff', '')} {v:.0e}" for k, v in check.items()) + " (largest relative "
              f"difference). {_machine(lk['machine'])}.", "",
              f"Scaling (B = 1, V = {seq[0]['vocab']:,}, T = " + " / ".join(str(r["seq_len"]) for r in seq) + "): fused "
              "time " + " / ".join(f"{r['times']['shiq_fused'][clock]['median']:.2f}" for r in seq) + " s; fused peak "
              + " / ".join(_mib(r["memory"]["shiq_fused"]["peak_bytes"]) for r in seq) + "; naive peak "
              + " / ".join(_mib(r["memory"]["shiq_naive"]["peak_bytes"]) for r in seq) + "; fused largest temporary "
              + " / ".join(_mib(r["memory"]["shiq_fused"]["largest_temp_bytes"]) for r in seq) + "."]
    compiled = [r for r in lk["main"] if "time_compiled_over_fused" in r["ratios"]]
    if compiled:  # a run with --compiled: the same kernel through torch.compile, against the plain path
        lines += ["", f"Compiled kernel (`logits_mode: chunked-compiled`, {lk['settings'].get('dtype', 'float32')}): "
                  "compiled / plain fused time " + "; ".join(
                      f"{r['batch']} × {r['seq_len']} {'frozen' if r['frozen_head'] else 'trained'} "
                      f"{_iqr(r['ratios']['time_compiled_over_fused'][clock])}" for r in compiled)
                  + "; compiled / naive extra peak memory " + " / ".join(
                      f"{r['ratios']['peak_memory_compiled_over_naive']:.3f}" for r in compiled) + "."]
    return "\n".join(lines)


def _profile_ms(profile: dict[str, Any], op: str) -> float:
    for o in profile["top_ops"]:
        if o["op"] == op:
            return o.get("ms", o.get("self_cpu_ms", 0.0))
    return 0.0


def cpu_train_step(root: Path) -> str:
    """The training-step table (CPU), its all-response variant and the profile figures the prose explains."""
    ts, ar = _load(root, "train_step"), _load(root, "train_step_all_response")
    clock = ts["headline"]["clock"]
    res, s, m = ts["results"], ts["settings"], ts["settings"]["model"]
    names = {"sft": "SFT (`transformers.Trainer`, causal-LM loss)", "shiq": "**ShiQTrainer**",
             "dpo": "TRL DPOTrainer (reference model)", "dpo_precompute": "TRL DPOTrainer, `precompute_ref_log_probs=True`"}
    lines = ["| trainer | step (s) | tokens/s | ShiQ speed-up: median [quartiles] | peak RSS above the loaded model | "
             "torch peak in a step | largest tensor |", "|---|---|---|---|---|---|---|"]
    for name, c in res["configs"].items():
        sp = res["shiq_speedup"].get(name)
        lines.append(f"| {names.get(name, name)} | {c['times'][clock]['median']:.2f} | {c['tokens_per_s']:.0f} | "
                     f"{_iqr(sp[clock]) if sp else '1'} | {_mib(c['train_peak_rss_over_model_bytes'])} | "
                     f"{_mib(c['step_memory']['peak_bytes'])} | {_mib(c['step_memory']['largest_alloc_bytes'])} |")
    r = ar["results"]["shiq_speedup"]["sft"][ar["headline"]["clock"]]
    prof = ts.get("profiles") or {}
    lines += ["", f"Model: Llama-shaped preset `{s['preset']}` ({m['n_params'] / 1e6:.1f} M parameters, hidden "
              f"{m['hidden_size']}, {m['num_hidden_layers']} layers, vocabulary {m['vocab_size']:,}; the output layer is "
              f"{100 * m['lm_head_flop_share']:.0f}% of a forward pass's FLOPs). {s['batch']} sequences of "
              f"{s['prompt_len']} prompt + {s['completion_len']} response tokens per step for every trainer; "
              f"{s['dtype']}; {s['rounds']} rounds after {s['warmup']} warm-up, {_clock(ts['headline'])}; "
              f"TRL {ts['versions'].get('trl')}, transformers {ts['versions'].get('transformers')}. "
              f"{_machine(ts['machine'])}.", "",
              f"All tokens in the response ({ar['settings']['prompt_len']} prompt + {ar['settings']['completion_len']} "
              f"response tokens, the case least favourable to ShiQ): ShiQ / SFT = {_iqr(r, 3)}."]
    if "sft" in prof and "shiq" in prof:
        lines += ["", f"Profile of one step (self CPU time): SFT spends {_profile_ms(prof['sft'], 'aten::mm') / 1e3:.2f} s "
                  f"in `aten::mm` and {(_profile_ms(prof['sft'], 'aten::_log_softmax') + _profile_ms(prof['sft'], 'aten::_log_softmax_backward_data')) / 1e3:.2f} s "
                  f"in log-softmax forward and backward over the full logits; ShiQ "
                  f"{_profile_ms(prof['shiq'], 'aten::mm') / 1e3:.2f} s in `aten::mm`."]
    return "\n".join(lines)


def cpu_precompute_scaling(root: Path) -> str:
    """Reference precompute vs a plain forward, and the scaling sweeps (CPU)."""
    rp, sc = _load(root, "reference_precompute"), _load(root, "scaling")
    res, s = rp["results"], rp["settings"]
    c = rp["headline"]["clock"]
    ratio = res["ratios_over_forward"]
    step_t, step_v = sc["step"]["seq_len"], sc["step"]["vocab"]
    cl = sc["clock"]

    def peak(r: dict[str, Any], k: str) -> str:
        return _mib(r["configs"][k]["step_memory"]["peak_bytes"])

    lines = [
        f"- **Reference precompute** ({s['rows']} sequences × {s['prompt_len'] + s['completion_len']} tokens, batch "
        f"{s['batch']}, {s['dtype']}): `compute_reference_stats` at {res['precompute']['tokens_per_s']:.0f} tokens/s, "
        f"a plain no-grad forward at {res['forward']['tokens_per_s']:.0f} (ratio {_iqr(ratio['precompute'][c], 3)}); "
        f"torch peak {_mib(res['precompute']['memory']['peak_bytes'])} against "
        f"{_mib(res['forward']['memory']['peak_bytes'])}. The whole cached path on a miss: "
        f"{_iqr(ratio['precompute_cached'][c], 3)}; a cache hit: {res['cache_hit_s']:.2f} s for the dataset; the simple "
        f"way (forward, then fp32 log-softmax over full logits): {_iqr(ratio['forward_logprobs'][c], 3)}, peak "
        f"{_mib(res['forward_logprobs']['memory']['peak_bytes'])}. Log-probs match the full-logit ones to "
        f"{res['check_max_abs_diff']:.0e}. {_machine(rp['machine'])}.",
        f"- **Scaling** (log-log slope 1 = linear; kernel B = 1, H = {sc['settings']['hidden']}; step B = "
        f"{sc['settings']['step_batch']}): fused kernel time slope {sc['headline']['fused_kernel_time_slope_T']:.2f} in "
        f"T and {sc['headline']['fused_kernel_time_slope_V']:.2f} in V; ShiQ step time slope "
        f"{sc['headline']['shiq_step_time_slope_T']:.2f} in T and {sc['headline']['shiq_step_time_slope_V']:.2f} in V "
        f"(the decoder's cost does not change with V). ShiQ / SFT torch peak in a step: {peak(step_t[0], 'shiq')} / "
        f"{peak(step_t[0], 'sft')} at T = {step_t[0]['seq_len']}, {peak(step_t[-1], 'shiq')} / {peak(step_t[-1], 'sft')} "
        f"at T = {step_t[-1]['seq_len']}. SFT / ShiQ step time over V = "
        + ", ".join(f"{r['vocab']:,}: {r['configs']['sft']['times'][cl]['median'] / r['configs']['shiq']['times'][cl]['median']:.2f}"
                    for r in step_v)
        + f" ({sc['settings']['step_rounds']} rounds per point: indicative). {_machine(sc['machine'])}.",
    ]
    return "\n".join(lines)


def gpu_receipt(root: Path) -> str:
    """The GPU goals of issue 14 from the committed receipt, or that none has been measured yet."""
    path = Path(root) / RESULTS / "gpu_check.json"
    from benchmarks.gpu_check import GOALS  # the one list of GPU goals

    if not path.exists():
        lines = ["**Not yet measured.** No GPU run has been committed: `make gpu-check` on one GPU "
                 "writes `benchmarks/results/gpu_check.{json,md}` (the receipt), and this block then quotes it.", "",
                 "| goal (GPU, one run, ratios within it) | bound | status |", "|---|---|---|"]
        lines += [f"| {text} | {op} {bound} | not measured |" for _, text, op, bound in GOALS]
        return "\n".join(lines)
    receipt = _load(root, "gpu_check")
    env = receipt["stages"]["environment"]["result"]
    ver = env["versions"]
    lines = [f"Receipt of {receipt['started_utc']}: {env.get('gpu')}, driver {(env.get('driver') or {}).get('driver', 'n/a')}, "
             f"CUDA {env.get('cuda')}, torch {ver.get('torch')}, transformers {ver.get('transformers')}, triton "
             f"{ver.get('triton')}, trl {ver.get('trl')}, liger-kernel {ver.get('liger_kernel')}; "
             f"{receipt['elapsed_s']:.0f} s.", "",
             "| goal (GPU, one run, ratios within it) | bound | measured: median [quartiles] | status | note |",
             "|---|---|---|---|---|"]
    for g in receipt["goals"]:
        v = "-" if g["value"] is None else f"{g['value']:.3f}" + (
            f" [{g['spread'][0]:.3f}, {g['spread'][1]:.3f}]" if g["spread"] else "")
        lines.append(f"| {g['what']} | {g['bound']} | {v} | {g['status']} | {g['note']} |")
    lines += ["", "Stages: " + ", ".join(f"{n} {s['status']}" for n, s in receipt["stages"].items()) + "."]
    return "\n".join(lines)
