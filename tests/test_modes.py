"""lm.modes and the caller's state: no function leaves a model in another mode or on another device, nor
changes the thread count or the process environment."""

import copy
import os

import pytest
import torch
from helpers.fake_lm import FakeLM, constant_table

from shiq_lab.evaluation.generations import evaluate_policy
from shiq_lab.evaluation.sampling import sample_completions
from shiq_lab.infra.models import load_model, load_tokenizer
from shiq_lab.lm.modes import as_reference, device_of, eval_mode, is_peft, on_device, unwrap


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _mixed() -> torch.nn.Module:
    """A training model with one submodule frozen in eval mode, as a caller may leave it."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2)).train()
    model[1].eval()
    return model


def test_eval_mode_restores_every_submodules_mode_even_on_error():
    model, other = _mixed(), torch.nn.Linear(2, 2).eval()
    before = _modes(model)
    with eval_mode(model, None, other):
        assert not any(_modes(model)) and not other.training
    assert _modes(model) == before and not other.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert _modes(model) == before


def test_unwrap_and_device_of():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):  # DDP / accelerate style
        def __init__(self):
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner and device_of(Wrapper()) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")  # no parameter: the CPU


def test_as_reference_has_one_rule():
    from peft import LoraConfig, get_peft_model

    model, _ = load_model("tiny")
    ref = copy.deepcopy(model).train()
    with as_reference(model, ref) as got:
        assert got is ref and not ref.training
    assert ref.training
    with pytest.raises(ValueError, match="peft"):
        with as_reference(model):
            pass
    with as_reference(model.train(), plain_is_reference=True) as got:  # the reference cache's rule
        assert got is model and not model.training
    assert model.training
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert is_peft(lora) and not is_peft(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits
        with as_reference(lora) as base:
            plain = base(input_ids=ids).logits
        again = lora(input_ids=ids).logits
    torch.testing.assert_close(plain, model.eval()(input_ids=ids).logits)  # adapters off: the base model
    assert not torch.allclose(adapted, plain) and torch.equal(adapted, again)  # and back on afterwards


def test_on_device_is_a_no_op_where_the_model_is():
    model = torch.nn.Linear(2, 2)
    with on_device(model, None) as where, on_device(model, "cpu") as same:
        assert where == same == torch.device("cpu")
    assert device_of(model) == torch.device("cpu")


def test_sampling_and_evaluation_give_the_models_back_in_their_modes_and_places(monkeypatch):
    tok = load_tokenizer("tiny")
    policy = FakeLM(constant_table({10: 0.5, tok.eos_token_id: 0.5}, len(tok))).train()
    reference = FakeLM(constant_table({10: 0.25, tok.eos_token_id: 0.75}, len(tok))).train()
    sample_completions(policy, tok, ["the movie"], samples_per_prompt=2, max_new_tokens=3)
    assert policy.training
    moved = []
    monkeypatch.setattr(reference, "to", lambda *a, **k: moved.append(a))
    result = evaluate_policy(policy, reference, tok, ["the movie", "a film"], lambda p, c: torch.zeros(len(c)),
                             samples_per_prompt=2, max_new_tokens=3)
    assert policy.training and reference.training and moved == []
    assert result.n == 4


def test_run_suite_gives_the_thread_count_back(monkeypatch):
    from shiq_lab.tasks.synthetic import suite

    inside = []
    monkeypatch.setattr(suite, "_run_suite", lambda cfg, log: inside.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(suite.SuiteConfig, "validate", lambda self: None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        suite.run_suite(suite.SuiteConfig())
        assert inside == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_configure_plotly_leaves_the_environment_alone(monkeypatch):
    pytest.importorskip("plotly")
    import plotly.io as pio

    from shiq_lab.views import figures

    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(figures, "chromium_path", lambda: "/usr/bin/some-chromium")
    renderer = pio.renderers.default
    try:
        before = dict(os.environ)
        figures.configure_plotly(png=True)
        assert dict(os.environ) == before
    finally:
        pio.renderers.default = renderer


def test_frontier_callback_evaluates_in_eval_mode_and_gives_every_submodule_its_mode_back():
    from types import SimpleNamespace

    from shiq_lab.train.sweep import FrontierCallback

    model = _mixed()
    before, seen = _modes(model), []
    callback = FrontierCallback(2, lambda m: seen.append(_modes(m)) or len(seen))
    for step in (1, 2, 3):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
        assert _modes(model) == before  # the frozen dropout stays in eval mode, the rest trains
    callback.on_train_end(None, SimpleNamespace(global_step=3), None, model=model)
    callback.on_train_end(None, SimpleNamespace(global_step=3), None, model=model)  # a point per step, once
    assert seen == [[False] * 4, [False] * 4] and [s for s, _ in callback.points] == [2, 3]
