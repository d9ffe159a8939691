"""Per-token values: every column checked against an independent computation from full logits."""

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers.tiny_pair import tiny_policy_and_reference

from shiq_lab.data.batch import batch_responses
from shiq_lab.data.encode import encode_responses
from shiq_lab.data.rewards import word_reward
from shiq_lab.losses import shiq_loss, token_logprobs
from shiq_lab.views.token_values import ReferenceStats, reference_stats, token_values, with_beta

BETA = 0.3
PROMPT = "was the movie good?"
RESPONSES = ["the movie was great and the music was really good.", "it was boring.", "a great great film"]
CHAT_PROMPT = [{"role": "user", "content": PROMPT}]
MULTI_TURN = [
    {"role": "assistant", "content": "let me check the weather"},
    {"role": "tool", "content": "result great"},
    {"role": "assistant", "content": "the film was great."},
]
NUMERIC = ["logp", "ref_logp", "logz", "ref_logz", "q", "v", "advantage", "log_ratio", "kl", "residual", "reward"]


@pytest.fixture(scope="module")
def tiny():
    policy, ref, tok = tiny_policy_and_reference()
    return policy.eval(), ref.eval(), tok


def _full(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def test_q_v_advantage_kl_equal_their_definitions_on_full_logits(tiny) -> None:
    policy, ref, tok = tiny
    df = token_values(policy, tok, PROMPT, RESPONSES, reference=ref, beta=BETA, top_k=4)
    enc = encode_responses(tok, PROMPT, RESPONSES)
    assert len(df) == sum(e.n_rows for e in enc)
    for r, e in enumerate(enc):
        lt, lr = _full(policy, e.input_ids), _full(ref, e.input_ids)
        rows = df[df.response == r].sort_values("step")
        states = torch.arange(e.start - 1, len(e.input_ids) - 1)
        acts = torch.tensor(e.input_ids[e.start:])
        q = BETA * (lt[states, acts] - lr[states, acts])
        v = BETA * (torch.logsumexp(lt[states], -1) - torch.logsumexp(lr[states], -1))
        lpt, lpr = torch.log_softmax(lt[states], -1), torch.log_softmax(lr[states], -1)
        adv = BETA * (lpt - lpr)[torch.arange(len(acts)), acts]
        kl = (lpt.exp() * (lpt - lpr)).sum(-1)
        np.testing.assert_allclose(rows.q, q.numpy(), atol=2e-5)
        np.testing.assert_allclose(rows.v, v.numpy(), atol=2e-5)
        np.testing.assert_allclose(rows.advantage, adv.numpy(), atol=2e-5)
        np.testing.assert_allclose(rows.kl, kl.numpy(), atol=2e-5)
        np.testing.assert_allclose(rows.prob, lpt.exp()[torch.arange(len(acts)), acts].numpy(), atol=1e-6)
        assert rows.token_id.tolist() == acts.tolist()
        assert rows.position.tolist() == list(range(e.start, len(e.input_ids)))
        # top-k: the policy's k most likely tokens, with Q = beta*(l - l_ref) at each of them
        for i, (_, row) in enumerate(rows.iterrows()):
            top = torch.topk(lpt[i], 4).indices
            assert list(row.topk_ids) == top.tolist()
            np.testing.assert_allclose(row.topk_q, (BETA * (lt[states[i], top] - lr[states[i], top])).numpy(), atol=2e-5)
            np.testing.assert_allclose(row.topk_prob, lpt[i, top].exp().numpy(), atol=1e-6)
            np.testing.assert_allclose(row.topk_ref_prob, lpr[i, top].exp().numpy(), atol=1e-6)


def test_identities_between_columns(tiny) -> None:
    policy, ref, tok = tiny
    df = token_values(policy, tok, CHAT_PROMPT, RESPONSES, reference=ref, beta=BETA)
    np.testing.assert_allclose(df.q - df.v, df.advantage, atol=1e-9)
    np.testing.assert_allclose(df.advantage, BETA * df.log_ratio, atol=1e-9)
    assert (df.kl >= -1e-6).all()  # a KL divergence is never negative


@pytest.mark.parametrize("horizon", [None, 2])
def test_residuals_equal_shiq_loss_on_the_batch_layout(tiny, horizon) -> None:
    policy, ref, tok = tiny
    responses = RESPONSES + [MULTI_TURN]
    prompts = [CHAT_PROMPT] * len(responses)
    reward = word_reward(tok, "great", 0.7)
    df = token_values(policy, tok, prompts, responses, reference=ref, beta=BETA, rewards=reward, horizon=horizon)
    # independent: shiq_loss on the [B, T-1] layout of the whole padded batch, logits of full forwards
    enc = encode_responses(tok, prompts, responses)
    batch = batch_responses(enc, tok.pad_token_id)
    with torch.no_grad():
        lt = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        lr = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp, logz = token_logprobs(lt, batch.actions)
    ref_logp, ref_logz = token_logprobs(lr, batch.actions)
    rewards = torch.zeros(batch.mask.shape)
    for b, e in enumerate(enc):
        rewards[b, e.start - 1 : len(e.input_ids) - 1] = torch.tensor(reward(e.row_ids)) * torch.tensor(e.policy)
    expected = shiq_loss(logp, logz, ref_logp, ref_logz, rewards, batch.mask, beta=BETA, horizon=horizon).residuals
    for b, e in enumerate(enc):
        rows = df[df.response == b].sort_values("step")
        want = expected[b, e.start - 1 : len(e.input_ids) - 1].numpy()
        pol = rows.is_policy.to_numpy()
        np.testing.assert_allclose(rows.residual.to_numpy()[pol], want[pol], atol=3e-5)
        assert rows.residual[~pol].isna().all(), "environment tokens have no residual"
    assert df.reward.sum() == pytest.approx(0.7 * 4)  # 'great' completed 4 times by the policy (not the tool's)


def test_reference_against_itself_is_exactly_zero(tiny) -> None:
    _, ref, tok = tiny
    for reference in (ref, copy.deepcopy(ref)):
        df = token_values(ref, tok, CHAT_PROMPT, RESPONSES + [MULTI_TURN], reference=reference, beta=BETA)
        for col in ("q", "v", "advantage", "log_ratio", "kl", "residual"):
            assert np.nanmax(np.abs(df[col])) < 1e-6, col
        assert np.abs(np.stack(df.topk_q)).max() < 1e-6
    # the same object is short-cut: exact zeros, not just small numbers
    same = token_values(ref, tok, PROMPT, RESPONSES, reference=ref, beta=BETA)
    assert (same[["q", "v", "advantage", "kl"]].to_numpy() == 0).all()


def test_batching_padding_and_chunking_give_the_same_rows(tiny) -> None:
    policy, ref, tok = tiny
    responses = RESPONSES + [MULTI_TURN, "fun."]
    kw = dict(reference=ref, beta=BETA, rewards=word_reward(tok, "great"))
    together = token_values(policy, tok, CHAT_PROMPT, responses, batch_size=3, chunk_tokens=7, **kw)
    alone = [token_values(policy, tok, CHAT_PROMPT, [r], batch_size=1, chunk_tokens=4096, **kw) for r in responses]
    for r, single in enumerate(alone):
        rows = together[together.response == r].reset_index(drop=True)
        np.testing.assert_allclose(rows[NUMERIC].to_numpy(float), single[NUMERIC].to_numpy(float), atol=2e-5)
        assert rows.token.tolist() == single.token.tolist()
        assert [list(x) for x in rows.topk_ids] == [list(x) for x in single.topk_ids]


def test_multi_turn_masks_assistant_tokens_and_marks_environment(tiny) -> None:
    policy, ref, tok = tiny
    df = token_values(policy, tok, CHAT_PROMPT, [MULTI_TURN], reference=ref, beta=BETA)
    policy_text = "".join(df[df.is_policy].token)
    assert policy_text == "let me check the weather<|im_end|>the film was great.<|im_end|>"
    env = df[~df.is_policy]
    assert "result great" in "".join(env.token)
    assert set(env.role) == {"assistant", "tool"}  # template tokens of turns, and the tool turn
    assert df.segment.tolist() == sorted(df.segment.tolist()) and set(df.segment) == {0, 1, 2}
    assert df.is_policy.iloc[0] and df.is_policy.iloc[-1]  # rows run from the first to the last policy token


def test_precomputed_reference_stats_match_a_live_reference(tiny) -> None:
    policy, ref, tok = tiny
    stats = reference_stats(ref, tok, CHAT_PROMPT, RESPONSES, candidates=200)
    live = token_values(policy, tok, CHAT_PROMPT, RESPONSES, reference=ref, beta=BETA, top_k=5)
    pre = token_values(policy, tok, CHAT_PROMPT, RESPONSES, reference=stats, beta=BETA, top_k=5)
    cols = ["q", "v", "advantage", "log_ratio", "residual", "ref_logp", "ref_logz"]
    np.testing.assert_allclose(pre[cols].to_numpy(float), live[cols].to_numpy(float), atol=2e-5)
    assert pre.kl.isna().all(), "KL needs the full reference distribution"
    live_q, pre_q = np.stack(live.topk_q), np.stack(pre.topk_q)
    found = np.isfinite(pre_q)
    np.testing.assert_allclose(pre_q[found], live_q[found], atol=2e-5)
    # an alternative gets a Q-value exactly when the reference stored it among its candidates
    for (_, row), cand in zip(pre.iterrows(), np.concatenate(stats.cand_ids)):
        assert list(np.isfinite(row.topk_q)) == [i in set(cand) for i in row.topk_ids]
    assert found.mean() > 0.3


def test_stats_for_other_tokens_are_refused(tiny) -> None:
    policy, ref, tok = tiny
    stats = reference_stats(ref, tok, PROMPT, RESPONSES[:1])
    with pytest.raises(ValueError, match="reference_stats"):
        token_values(policy, tok, PROMPT, RESPONSES[1:2], reference=stats)


def test_peft_model_with_adapters_disabled_is_the_reference(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    _, ref, tok = tiny
    base = copy.deepcopy(ref)
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
    via_adapters = token_values(model, tok, CHAT_PROMPT, RESPONSES, reference=None, beta=BETA)
    via_copy = token_values(model, tok, CHAT_PROMPT, RESPONSES, reference=ref, beta=BETA)
    np.testing.assert_allclose(via_adapters[NUMERIC].to_numpy(float), via_copy[NUMERIC].to_numpy(float), atol=2e-5)
    assert np.abs(via_adapters.q).max() > 1e-3  # the adapters do change the model


def test_models_whose_logits_are_not_their_head_fall_back_to_full_logits(tiny) -> None:
    policy, ref, tok = tiny

    class Scaled(torch.nn.Module):
        """Logits post-processed after the head (like logit soft-capping)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.training = False

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = 2.0 * out.logits
            return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = token_values(Scaled(policy), tok, PROMPT, RESPONSES[:1], reference=Scaled(ref), beta=BETA)
    assert any("full logits" in str(w.message) for w in caught)
    plain = token_values(policy, tok, PROMPT, RESPONSES[:1], reference=ref, beta=BETA)
    np.testing.assert_allclose(df.q, 2 * plain.q, atol=4e-5)


def test_with_beta_rescales_without_a_model(tiny) -> None:
    policy, ref, tok = tiny
    kw = dict(reference=ref, rewards=word_reward(tok, "great"))
    a = token_values(policy, tok, PROMPT, RESPONSES, beta=BETA, **kw)
    b = token_values(policy, tok, PROMPT, RESPONSES, beta=2 * BETA, **kw)
    moved = with_beta(a, 2 * BETA)
    np.testing.assert_allclose(moved[NUMERIC].to_numpy(float), b[NUMERIC].to_numpy(float), atol=2e-5)
    np.testing.assert_allclose(moved.q, 2 * a.q, atol=1e-9)
    np.testing.assert_allclose(np.stack(moved.topk_q), 2 * np.stack(a.topk_q), atol=1e-9)
    assert moved.attrs["beta"] == 2 * BETA and a.attrs["beta"] == BETA


def test_sequence_scores_sit_on_the_last_policy_token(tiny) -> None:
    policy, ref, tok = tiny
    df = token_values(policy, tok, CHAT_PROMPT, [RESPONSES[1], MULTI_TURN], reference=ref, beta=BETA, rewards=[2.0, -1.0])
    last = df.groupby("response").tail(1)
    assert last.reward.tolist() == [2.0, -1.0]
    assert df.reward.abs().sum() == 3.0


def test_bad_inputs_are_named(tiny) -> None:
    policy, ref, tok = tiny
    with pytest.raises(ValueError, match="beta"):
        token_values(policy, tok, PROMPT, RESPONSES, reference=ref, beta=0)
    with pytest.raises(ValueError, match="reference"):
        token_values(policy, tok, PROMPT, RESPONSES, beta=BETA)
    with pytest.raises(ValueError, match="rewards for response 0"):
        token_values(policy, tok, PROMPT, RESPONSES[:1], reference=ref, rewards=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="one prompt, or one per response"):
        token_values(policy, tok, [PROMPT, PROMPT], RESPONSES, reference=ref)
    with pytest.raises(ValueError, match="no assistant message"):
        token_values(policy, tok, CHAT_PROMPT, [[{"role": "tool", "content": "x"}]], reference=ref)
    with pytest.raises(TypeError, match="reference"):
        token_values(policy, tok, PROMPT, RESPONSES, reference="ref")
    assert isinstance(reference_stats(ref, tok, PROMPT, RESPONSES[:1]), ReferenceStats)


def test_word_reward_marks_the_token_that_completes_the_word(tiny) -> None:
    _, _, tok = tiny
    ids = tok("the greatest film was great. Great!", add_special_tokens=False)["input_ids"]
    rewards = word_reward(tok, "great", 2.0)(ids)
    texts = [tok.decode([i]) for i in ids]
    marked = [t for t, r in zip(texts, rewards) if r]
    assert rewards.count(2.0) == 2 and sum(rewards) == 4.0
    assert all(t.lower().endswith("t") for t in marked)  # the token that ends 'great' / 'Great'


def test_llama_keeps_hidden_states_not_logits(tiny) -> None:
    from shiq_lab.views.token_values import _LogitSource

    policy, _, tok = tiny
    batch = batch_responses(encode_responses(tok, PROMPT, RESPONSES), tok.pad_token_id)
    rb, rt = torch.nonzero(batch.rows, as_tuple=True)
    source = _LogitSource(policy)
    states = source.states(batch.input_ids, batch.attention_mask, rb, rt)
    assert source.head_ok and states.full is None
    assert tuple(states.hidden.shape) == (len(rb), policy.config.hidden_size)  # [N, H], never [B, T, V]
    full = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rb, rt]
    torch.testing.assert_close(states.logits(2, 9, torch.device("cpu")), full[2:9].float(), atol=1e-5, rtol=1e-5)
