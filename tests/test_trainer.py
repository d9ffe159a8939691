"""ShiQTrainer: exact losses at initialisation, hand-computed losses, learning, accumulation, resume, LoRA, DRO."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from shiq_lab.data.batch import ShiQCollator
from shiq_lab.infra.models import load_model
from shiq_lab.losses import shiq_loss, token_logprobs
from shiq_lab.reference import cache as ref_mod
from shiq_lab.train.trainer import VALUE_HEAD_FILE, ShiQConfig, ShiQTrainer

ROWS = [
    {"prompt": "the movie", "completion": " was great.", "reward": 1.0},
    {"prompt": "the movie", "completion": " was bad and boring.", "reward": -2.0},
    {"prompt": "the film", "completion": " good.", "reward": 0.5},
    {"prompt": "the film", "completion": " awful music.", "reward": -0.5},
    {"prompt": "a story", "completion": " the best.", "reward": 2.0},
    {"prompt": "a story", "completion": " dull.", "reward": 0.0},
    {"prompt": "the actor", "completion": " really fun.", "reward": 1.5},
    {"prompt": "the actor", "completion": " so poor.", "reward": -1.0},
]




def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=1,
                ref_cache_dir=str(tmp_path / "cache"), beta=0.5, max_length=32, seed=0, lr_scheduler_type="constant")
    base.update(kw)
    return ShiQConfig(**base)


def trainer_for(tmp_path, rows=ROWS, model=None, **kw):
    m, tok = load_model("tiny") if model is None else model
    return ShiQTrainer(model=m, args=config(tmp_path, **kw), train_dataset=list(rows), processing_class=tok)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def returns_and_lengths(trainer):
    ds = trainer.train_dataset
    return ([sum(r) for r in ds["token_rewards"]], [sum(m[1:]) for m in ds["action_mask"]])


def test_calibrated_initialisation_every_shiq_residual_is_zero(tmp_path):
    zero = [dict(r, reward=0.0) for r in ROWS]
    tr = trainer_for(tmp_path, zero, per_device_train_batch_size=8, ref_batch_size=8)
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(8)]))
    out, count, _ = tr._loss_terms(tr.model, batch)
    assert count == int(batch["action_mask"][:, 1:].sum())
    assert out.residuals.abs().max().item() == 0.0 and out.loss.item() == 0.0
    tr.train()
    assert losses(tr) == [0.0]


@pytest.mark.parametrize("loss_type", ["shiq", "shiq-h1", "dpo", "copg", "dro"])
def test_loss_at_initialisation_equals_its_closed_form(tmp_path, loss_type):
    """At theta = ref every log-ratio is 0, so each loss is a function of the rewards alone."""
    kw = {"horizon": 1, "loss_type": "shiq"} if loss_type == "shiq-h1" else {"loss_type": loss_type}
    batch = 4 if loss_type in ("dpo", "copg") else 8  # pairwise: batch size counts prompts
    tr = trainer_for(tmp_path, per_device_train_batch_size=batch, **kw)
    tr.train()
    (got,) = losses(tr)
    R = [r["reward"] for r in ROWS]
    n = [len(tr.processing_class(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS]
    if loss_type == "shiq":  # delta_t = -(sum of future rewards) = -R on each of the n tokens
        want = sum(ni * ri**2 for ni, ri in zip(n, R)) / sum(n)
    elif loss_type == "shiq-h1":  # one-step residual: -r_t, non-zero on the last token only
        want = sum(ri**2 for ri in R) / sum(n)
    elif loss_type == "dpo":
        want = math.log(2.0)
    elif loss_type == "copg":  # one pair per prompt: (R_i - R_j)^2
        want = sum((R[i] - R[i + 1]) ** 2 for i in range(0, 8, 2)) / 4
    else:  # dro with V_phi = 0 at start
        want = 0.5 * sum(ri**2 for ri in R) / 8
    assert got == pytest.approx(want, rel=1e-6)


def test_trainer_loss_equals_shiq_loss_computed_by_hand(tmp_path):
    model, tok = load_model("tiny")
    reference = copy.deepcopy(model)
    tr = trainer_for(tmp_path, model=(model, tok), max_steps=2, horizon=None)
    tr.train()  # move theta away from the reference
    rows = [tr.train_dataset[i] for i in range(5)]
    batch = ShiQCollator(tok.pad_token_id)(rows)
    tr.model.eval()
    got = tr.compute_loss(tr.model, batch)
    with torch.no_grad():
        ids, am = batch["input_ids"], batch["attention_mask"]
        logp, logz = token_logprobs(tr.model(input_ids=ids, attention_mask=am).logits[:, :-1], ids[:, 1:])
        ref_logp, ref_logz = token_logprobs(reference(input_ids=ids, attention_mask=am).logits[:, :-1], ids[:, 1:])
    want = shiq_loss(logp, logz, ref_logp, ref_logz, batch["token_rewards"][:, 1:], batch["action_mask"][:, 1:], beta=0.5)
    assert got.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert want.loss.item() > 0.01 and abs(float(want.metrics["logratio_seq_mean"])) > 1e-3


@pytest.mark.parametrize("loss_type", ["shiq", "dpo", "copg", "dro"])
def test_each_loss_decreases_on_a_fixed_batch_and_parameters_change(tmp_path, loss_type):
    batch = 4 if loss_type in ("dpo", "copg") else 8
    model, tok = load_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = trainer_for(tmp_path, model=(model, tok), loss_type=loss_type, per_device_train_batch_size=batch, max_steps=12,
                     learning_rate=3e-3, value_head_learning_rate=0.01)
    tr.train()
    curve = losses(tr)
    assert len(curve) == 12 and curve[-1] < 0.5 * curve[0], curve
    changed = [k for k, v in tr.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all({"kl", "logratio", "tokens_per_second", "grad_norm"} <= set(h) for h in logs[1:])
    assert logs[0]["kl"] == 0.0 and logs[-1]["kl"] > 0.0  # theta = ref at the first step only


def test_gradient_accumulation_gives_the_same_losses_as_a_big_batch(tmp_path):
    # plain SGD: Adam's normalisation would magnify rounding differences of near-zero gradients
    big = trainer_for(tmp_path / "a", per_device_train_batch_size=4, max_steps=3, optim="sgd", learning_rate=0.5)
    big.train()
    small = trainer_for(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                        optim="sgd", learning_rate=0.5)
    small.train()
    assert losses(big)[-1] < losses(big)[0]  # the parameters moved
    assert losses(small) == pytest.approx(losses(big), rel=1e-5, abs=1e-7)
    for (k, a), b in zip(big.model.state_dict().items(), small.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


@pytest.mark.parametrize("loss_type", ["shiq", "dro"])
def test_resume_from_checkpoint_gives_identical_losses(tmp_path, loss_type):
    kw = dict(loss_type=loss_type, per_device_train_batch_size=2, max_steps=6, save_strategy="steps", save_steps=3,
              learning_rate=3e-3, value_head_learning_rate=0.05)
    full = trainer_for(tmp_path / "full", **kw)
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-3"
    if loss_type == "dro":
        head = load_file(str(ckpt / VALUE_HEAD_FILE))
        assert head["linear.weight"].abs().sum() > 0
        assert not any("shiq_value_head" in k for k in load_file(str(ckpt / "model.safetensors")))
    resumed = trainer_for(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert len(losses(full)) == 6 and losses(resumed)[3:] == pytest.approx(losses(full)[3:], rel=1e-6)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_reference_cache_is_reused_across_trainers(tmp_path, monkeypatch):
    calls = []
    original = ref_mod.compute_reference_stats
    monkeypatch.setattr(ref_mod, "compute_reference_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = trainer_for(tmp_path)
    second = trainer_for(tmp_path)
    assert len(calls) == 1
    assert first.train_dataset["ref_logz"] == second.train_dataset["ref_logz"]
    trainer_for(tmp_path, rows=ROWS[:6])  # another dataset: computed again
    assert len(calls) == 2


def test_lora_trains_adapters_only_and_starts_calibrated(tmp_path):
    from peft import LoraConfig

    model, tok = load_model("tiny")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    zero = [dict(r, reward=0.0) for r in ROWS]
    tr = ShiQTrainer(model=model, args=config(tmp_path, per_device_train_batch_size=8, max_steps=1), train_dataset=zero,
                     processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tr.train()
    assert losses(tr) == [0.0]  # LoRA starts at B = 0: theta = ref exactly
    tr2 = ShiQTrainer(model=tr.model, args=config(tmp_path / "2", max_steps=4), train_dataset=list(ROWS),
                      processing_class=tok)
    tr2.train()
    state = tr2.model.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)
    for k, v in base.items():  # base weights untouched
        peft_key = next(p for p in state if p.endswith(k.replace("q_proj.weight", "q_proj.base_layer.weight")
                                                        .replace("v_proj.weight", "v_proj.base_layer.weight")))
        assert torch.equal(state[peft_key], v), k


def test_evaluate_reports_loss_and_kl(tmp_path):
    model, tok = load_model("tiny")
    tr = ShiQTrainer(model=model, args=config(tmp_path, per_device_eval_batch_size=8, max_steps=3),
                     train_dataset=list(ROWS), eval_dataset=list(ROWS), processing_class=tok)
    at_start = tr.evaluate()
    R = [r["reward"] for r in ROWS]
    n = [sum(m[1:]) for m in tr.eval_dataset["action_mask"]]
    assert at_start["eval_loss"] == pytest.approx(sum(ni * ri**2 for ni, ri in zip(n, R)) / sum(n), rel=1e-6)
    assert at_start["eval_kl"] == 0.0
    tr.train()
    after = tr.evaluate()
    assert after["eval_loss"] < at_start["eval_loss"] and after["eval_kl"] > 0


def test_tensorboard_logs_are_written(tmp_path):
    tr = trainer_for(tmp_path, max_steps=2, report_to=["tensorboard"])
    tr.train()
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


@pytest.mark.parametrize("kw, match", [
    ({"loss_type": "ppo"}, "loss_type='ppo'"),
    ({"beta": 0.0}, "beta=0.0"),
    ({"horizon": 2, "loss_type": "dpo"}, "only for loss_type='shiq'"),
    ({"remove_unused_columns": True}, "leave it False"),
    ({"truncation": "left"}, "truncation='left'"),
])
def test_bad_config_values_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_trainer_requires_a_tokenizer_and_a_shiq_config(tmp_path):
    model, tok = load_model("tiny")
    with pytest.raises(ValueError, match="processing_class=tokenizer"):
        ShiQTrainer(model=model, args=config(tmp_path), train_dataset=ROWS)
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="must be a ShiQConfig"):
        ShiQTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=ROWS,
                    processing_class=tok)


@pytest.mark.parametrize("fp32_head", [False, True])
def test_mixed_precision_starts_calibrated_because_the_reference_runs_under_the_same_autocast(tmp_path, monkeypatch,
                                                                                             fp32_head):
    """bf16: the policy's output layer runs in bf16 in the step (accelerate autocasts only the model's forward;
    the trainer puts the kernel under the same autocast) or, with cast_lm_head_to_fp32, in fp32; the reference
    precompute does the same, so the first loss is the closed form at theta = ref either way."""
    import shiq_lab.lm.stats as stats

    seen, kernel = [], stats.chunked_token_logprobs
    monkeypatch.setattr(stats, "chunked_token_logprobs", lambda h, w, *a, **k: seen.append((h.dtype, w.dtype))
                        or kernel(h, w, *a, **k))
    tr = trainer_for(tmp_path, per_device_train_batch_size=8, ref_batch_size=8, bf16=True,
                     cast_lm_head_to_fp32=fp32_head)
    tr.train()
    want = torch.float32 if fp32_head else torch.bfloat16
    assert len(seen) >= 2 and set(seen) == {(want, want)}  # the precompute's and the step's
    R = [r["reward"] for r in ROWS]
    n = [sum(m[1:]) for m in tr.train_dataset["action_mask"]]
    assert losses(tr)[0] == pytest.approx(sum(ni * ri**2 for ni, ri in zip(n, R)) / sum(n), rel=1e-6)
    # the bf16 statistics are not the fp32 ones: computing the reference in fp32 would not be calibrated
    fp32 = ref_mod.precompute_reference(load_model("tiny")[0], tr.train_dataset.remove_columns(["ref_logp", "ref_logz"]),
                                        use_cache=False)
    gap = max(abs(a - b) for ra, rb in zip(fp32["ref_logz"], tr.train_dataset["ref_logz"]) for a, b in zip(ra, rb))
    assert gap > 1e-6  # enough to break the 1e-6 closed form above (residual ~ beta * gap)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = trainer_for(tmp_path / "a", max_steps=3, optim="sgd", learning_rate=0.5)
    plain.train()
    ckpt = trainer_for(tmp_path / "b", max_steps=3, optim="sgd", learning_rate=0.5, gradient_checkpointing=True)
    ckpt.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.model.modules())
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)


def test_logged_metrics_are_weighted_by_their_declared_unit_across_micro_batches(tmp_path):
    """At theta = ref every full-path residual of row i is -R_i: a token mean weights rows by their lengths,
    a sequence mean does not. Two micro-batches of different lengths must give the global batch's means."""
    rows = ROWS[:4]
    tr = trainer_for(tmp_path, rows, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    tr.train()
    (log,) = [h for h in tr.state.log_history if "loss" in h]
    R, n = returns_and_lengths(tr)
    assert len(set(n)) > 1  # rows of different lengths: the two weightings differ
    assert log["residual_abs_mean"] == pytest.approx(sum(ni * abs(ri) for ni, ri in zip(n, R)) / sum(n), rel=1e-6)
    assert log["first_residual_abs_mean"] == pytest.approx(sum(abs(ri) for ri in R) / len(R), rel=1e-6)
    assert log["reward_seq_mean"] == pytest.approx(sum(R) / len(R), rel=1e-6)


def test_evaluate_uses_its_metric_key_prefix(tmp_path):
    tr = trainer_for(tmp_path, per_device_eval_batch_size=4)
    out = tr.evaluate(eval_dataset=tr.prepare_dataset(list(ROWS[:4]), tr.model, tr.args, tr.processing_class,
                                                      split="eval"), metric_key_prefix="held")
    assert {"held_loss", "held_kl", "held_residual_abs_mean"} <= set(out)
    assert out["held_kl"] == 0.0 and not any(k.startswith("eval_") for k in out)


def test_dro_value_head_goes_through_public_hooks_only(tmp_path):
    assert "_save" not in ShiQTrainer.__dict__ and "_load_from_checkpoint" not in ShiQTrainer.__dict__
    kw = dict(loss_type="dro", per_device_train_batch_size=4, max_steps=2, save_strategy="steps", save_steps=1,
              learning_rate=3e-3, value_head_learning_rate=0.05)
    tr = trainer_for(tmp_path, **kw)
    tr.train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert (ckpt / VALUE_HEAD_FILE).is_file()
    assert not any("shiq_value_head" in k for k in load_file(str(ckpt / "model.safetensors")))
    resumed = trainer_for(tmp_path / "again", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    head = load_file(str(tmp_path / "out" / "checkpoint-2" / VALUE_HEAD_FILE))
    got = resumed.model.shiq_value_head.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in head.items())


def test_training_rows_are_validated_once_with_the_row_named(tmp_path):
    from datasets import Dataset

    m, tok = load_model("tiny")
    good = {"input_ids": [5, 6, 7, 8], "action_mask": [0, 0, 1, 1], "token_rewards": [0.0, 0.0, 0.0, 1.0]}
    bad_id = dict(good, input_ids=[5, 6, 7, len(tok) + 1000])
    with pytest.raises(ValueError, match=r"train dataset, row 1, position 3: a token id is not in \[0, 512\)"):
        ShiQTrainer(model=m, args=config(tmp_path), train_dataset=Dataset.from_list([good, bad_id]), processing_class=tok)
    bad_reward = dict(good, token_rewards=[0.0, 0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"row 0, position 2: token_rewards are not finite"):
        ShiQTrainer(model=m, args=config(tmp_path), train_dataset=Dataset.from_list([bad_reward]), processing_class=tok)


def test_cast_lm_head_to_fp32_without_effect_in_the_full_mode_is_said(tmp_path, caplog):
    """In logits_mode='full' (explicit, or auto under FSDP / ZeRO-3) the model's own lm_head runs as autocast says:
    asking for an fp32 output layer there must not pass in silence."""
    import logging

    with caplog.at_level(logging.WARNING, logger="shiq_lab.train.trainer"):
        trainer_for(tmp_path, bf16=True, cast_lm_head_to_fp32=True, logits_mode="full")
    assert any("cast_lm_head_to_fp32" in r.getMessage() and "full" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shiq_lab.train.trainer"):
        trainer_for(tmp_path, bf16=True, cast_lm_head_to_fp32=True, logits_mode="chunked")
    assert not any("cast_lm_head_to_fp32" in r.getMessage() for r in caplog.records)


_LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


@pytest.mark.parametrize("env, want", [({}, "chunked"), ({"ACCELERATE_USE_FSDP": "true"}, "full")])
def test_reference_precompute_uses_the_steps_logits_mode_where_the_output_layer_is_sharded(tmp_path, monkeypatch,
                                                                                          env, want):
    """logits_mode='auto' under FSDP (as accelerate launch announces it in the environment): the step uses the
    model's own logits, so the reference precompute must too (else theta = ref is not calibrated)."""
    import shiq_lab.reference.cache as cache
    from shiq_lab.lm.stats import resolve_logits_mode

    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen, stats = [], cache.token_stats
    monkeypatch.setattr(cache, "token_stats", lambda *a, **k: seen.append(k["logits_mode"]) or stats(*a, **k))
    tr = trainer_for(tmp_path, max_steps=1, use_ref_cache=False)
    assert seen and {resolve_logits_mode(tr.model, m) for m in seen} == {want}
    assert tr._logits_mode == want  # one process: accelerate itself wraps nothing, the environment decides


def test_output_layer_sharded_reads_fsdp_and_zero3_from_the_arguments_and_the_launch_environment(monkeypatch):
    from types import SimpleNamespace

    from shiq_lab.train.trainer import output_layer_sharded

    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)

    def args(**kw):
        return SimpleNamespace(**{"fsdp": [], "deepspeed": None, "hf_deepspeed_config": None, **kw})

    zero = lambda stage: SimpleNamespace(config={"zero_optimization": {"stage": stage}})  # noqa: E731
    assert not output_layer_sharded(args())
    assert output_layer_sharded(args(fsdp=["full_shard"]))
    assert output_layer_sharded(args(deepspeed="ds.json", hf_deepspeed_config=zero(3)))
    assert not output_layer_sharded(args(deepspeed="ds.json", hf_deepspeed_config=zero(2)))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert output_layer_sharded(args())
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not output_layer_sharded(args())
