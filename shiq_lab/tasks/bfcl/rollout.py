"""A chat model plays BFCL episodes: each assistant turn is generated, its calls executed, the results fed back.

:func:`rollout` keeps the token ids it actually sampled (never re-tokenised text): the trajectory's
``input_ids`` are the chat template's environment text (system, user, tool; mask 0) and the sampled assistant
tokens (mask 1). :func:`trajectory_kl` scores those same ids under a policy and its reference:
``sum over assistant tokens of KL(pi(.|s) || pi_ref(.|s))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shiq_lab.tasks.bfcl.checker import EpisodeResult, check_episode
from shiq_lab.tasks.bfcl.episodes import Episode
from shiq_lab.tasks.bfcl.prompts import (
    DEFAULT_PROMPT,
    PromptConfig,
    decode_calls,
    system_prompt,
    tool_message,
    user_message,
)

__all__ = ["Trajectory", "prefix_results", "rollout", "trajectory_kl"]


@dataclass
class Trajectory:
    """One played episode: texts, calls, per-turn rewards, and the exact token ids with their mask."""

    episode_id: str
    source: str
    texts: list[str]  # the assistant's text of each turn
    calls: list[list[str]]
    result: EpisodeResult
    messages: list[dict[str, Any]]  # the conversation, assistant messages with their turn's reward
    input_ids: list[int] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return self.result.rewards

    @property
    def score(self) -> float:
        return self.result.score


def prefix_results(episode: Episode, calls: Sequence[Sequence[str]]) -> list[list[str]]:
    """The model's call results of the turns given so far (later turns treated as no-call turns)."""
    full = [list(c) for c in calls] + [[] for _ in range(episode.n_turns - len(calls))]
    return [t.results for t in check_episode(episode, full).turns[: len(calls)]]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)


@torch.no_grad()
def rollout(model: torch.nn.Module, tokenizer: Any, episode: Episode, *, config: PromptConfig = DEFAULT_PROMPT,
            max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0, source: str = "sample") -> Trajectory:
    """Play ``episode`` with ``model`` (sampling at ``temperature``; 0 = greedy), one assistant step per turn."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(episode, config)}]
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    texts: list[str] = []
    calls: list[list[str]] = []
    for k in range(episode.n_turns):
        messages.append({"role": "user", "content": user_message(episode, k, config)})
        head = _render(tokenizer, messages, True)
        delta = tokenizer(head[len(rendered):], add_special_tokens=False)["input_ids"]
        ids += delta
        mask += [0] * len(delta)
        new: list[int] = []
        past = None
        step_input = torch.tensor([ids], device=device)
        for _ in range(max_new_tokens):  # a plain sampling loop: torch's generator makes it reproducible
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=gen))
            new.append(token)
            if token == eos:
                break
            step_input = torch.tensor([[token]], device=device)
        ids += new
        mask += [1] * len(new)
        if new[-1] != eos:  # cut at max_new_tokens: the environment closes the message
            ids.append(eos)
            mask.append(0)
        ids += newline
        mask += [0] * len(newline)
        text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
        texts.append(text)
        calls.append(decode_calls(text))
        messages.append({"role": "assistant", "content": text})
        rendered = _render(tokenizer, messages, False)
        results = prefix_results(episode, calls)[k]
        if results:
            messages.append({"role": "tool", "content": tool_message(results, config)})
    result = check_episode(episode, calls)
    reply = 0
    for m in messages:
        if m["role"] == "assistant":
            m["reward"] = result.rewards[reply]
            reply += 1
    return Trajectory(episode.id, source, texts, calls, result, messages, ids, mask)


@torch.no_grad()
def trajectory_kl(policy: torch.nn.Module, reference: torch.nn.Module, input_ids: Sequence[int],
                  action_mask: Sequence[int]) -> float:
    """``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))`` over the assistant tokens of one trajectory (0 when same model)."""
    if policy is reference:
        return 0.0
    ids = torch.tensor([list(input_ids)], device=next(policy.parameters()).device)
    m = torch.tensor(list(action_mask), dtype=torch.bool)
    # logits[t] is the state before token t+1
    states = torch.nonzero(m[1:]).squeeze(-1)
    lp = torch.log_softmax(policy(input_ids=ids).logits[0, states].float(), dim=-1)
    lq = torch.log_softmax(reference(input_ids=ids.to(next(reference.parameters()).device)).logits[0, states].float(),
                           dim=-1).to(lp.device)
    return float((lp.exp() * (lp - lq)).sum())


def trajectory_values(policy: torch.nn.Module, reference: Any, tokenizer: Any, messages: Sequence[dict[str, Any]], *,
                      beta: float = 0.1) -> Any:
    """Per-token Q, V, advantage, residual and KL of a multi-turn trajectory (:func:`shiq_lab.views.token_values.token_values`).

    The prompt is the system and first user message; the response is everything up to the last assistant
    turn: assistant tokens are the policy's (``is_policy``), user and tool tokens the environment's. Each
    assistant message's ``reward`` sits on its last token.
    """
    import numpy as np

    from shiq_lab.data.encode import encode_responses
    from shiq_lab.views.token_values import token_values

    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:first]]
    response = [{"role": m["role"], "content": m["content"]} for m in messages[first:last + 1]]
    encoded = encode_responses(tokenizer, prompt, [response])[0]
    rewards = np.zeros(encoded.n_rows)
    policy_rows = np.flatnonzero(np.asarray(encoded.policy, dtype=bool))
    segments = np.asarray(encoded.segment)
    for j, m in enumerate(messages[first:last + 1]):
        rows = policy_rows[segments[policy_rows] == j]
        if m["role"] == "assistant" and len(rows):
            rewards[rows[-1]] = float(m.get("reward", 0.0) or 0.0)
    return token_values(policy, tokenizer, prompt, [response], reference=reference, beta=beta, rewards=[rewards])
