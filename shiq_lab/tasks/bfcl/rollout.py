"""A chat model plays BFCL episodes: each assistant turn is generated, its calls executed, the results fed back.

:func:`rollouts` plays many (episode, seed) trajectories together: at every assistant step the prompts of all
live trajectories go through one left-padded, KV-cached generation (:func:`shiq_lab.evaluation.sampling.
sample_batch`), then each trajectory's calls are parsed, checked and executed on its own
:class:`~.checker.EpisodeRun` (private back-ends: two samples of the same episode share nothing), a finished
trajectory drops out and the next waiting one takes its place. Each trajectory draws from its own CPU
generator seeded with its seed, so its tokens do not depend on the batch size or on its neighbours (up to the
floating-point effect of padding on the logits). :func:`rollout` is the batch of one.

A trajectory keeps the token ids it actually sampled (never re-tokenised text): its ``input_ids`` are the chat
template's environment text (system, user, tool; mask 0) and the sampled assistant tokens (mask 1).
:func:`trajectory_kl` scores those same ids under a policy and its reference:
``sum over assistant tokens of KL(pi(.|s) || pi_ref(.|s))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shiq_lab.data.batch import pad_token_id
from shiq_lab.evaluation.sampling import sample_batch
from shiq_lab.lm.modes import device_of, eval_mode
from shiq_lab.tasks.bfcl.checker import EpisodeResult, EpisodeRun
from shiq_lab.tasks.bfcl.episodes import Episode
from shiq_lab.tasks.bfcl.prompts import (
    DEFAULT_PROMPT,
    PromptConfig,
    decode_calls,
    system_prompt,
    tool_message,
    user_message,
)

__all__ = ["Trajectory", "rollout", "rollouts", "trajectory_kl", "trajectory_values"]


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
    # the model side's back-end state after the last turn (plain data, :meth:`.backends.Backends.state`); set by
    # :func:`rollouts`, None for trajectories built from given calls (:func:`.dataset.execute`)
    final_state: dict[str, Any] | None = None

    @property
    def rewards(self) -> list[float]:
        return self.result.rewards

    @property
    def score(self) -> float:
        return self.result.score


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=generation_prompt)


class _Live:
    """A trajectory in progress: its conversation, token ids and mask, its own back-ends and random stream."""

    def __init__(self, episode: Episode, seed: int, config: PromptConfig) -> None:
        self.episode, self.config = episode, config
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.run = EpisodeRun(episode)
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(episode, config)}]
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.rendered = ""
        self.texts: list[str] = []
        self.calls: list[list[str]] = []

    def prompt(self, tokenizer: Any) -> list[int]:
        """Add the next user message; the ids so far, ending with the assistant's generation prompt."""
        self.messages.append({"role": "user", "content": user_message(self.episode, len(self.calls), self.config)})
        head = _render(tokenizer, self.messages, True)
        # only the new text is tokenised: earlier ids (the sampled ones above all) stay exactly as they were
        delta = tokenizer(head[len(self.rendered):], add_special_tokens=False)["input_ids"]
        self.ids += delta
        self.mask += [0] * len(delta)
        return self.ids

    def answer(self, tokenizer: Any, new: list[int], eos: int, newline: list[int]) -> None:
        """Take the sampled ids of this turn, execute their calls on this trajectory's back-ends, feed back."""
        self.ids += new
        self.mask += [1] * len(new)
        if not new or new[-1] != eos:  # cut at max_new_tokens: the environment closes the message
            self.ids.append(eos)
            self.mask.append(0)
        self.ids += newline
        self.mask += [0] * len(newline)
        text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
        self.texts.append(text)
        self.calls.append(decode_calls(text))
        self.messages.append({"role": "assistant", "content": text})
        self.rendered = _render(tokenizer, self.messages, False)
        results = self.run.step(self.calls[-1]).results
        if results:
            self.messages.append({"role": "tool", "content": tool_message(results, self.config)})

    def finish(self, source: str) -> Trajectory:
        result = self.run.result
        replies = iter(result.rewards)
        for m in self.messages:
            if m["role"] == "assistant":
                m["reward"] = next(replies)
        return Trajectory(self.episode.id, source, self.texts, self.calls, result, self.messages, self.ids, self.mask,
                          self.run.model.state())


@torch.no_grad()
def rollouts(model: torch.nn.Module, tokenizer: Any, episodes: Sequence[Episode], seeds: Sequence[int], *,
             config: PromptConfig = DEFAULT_PROMPT, max_new_tokens: int = 48, temperature: float = 1.0,
             batch_size: int = 8, source: str = "sample") -> list[Trajectory]:
    """Play ``episodes[i]`` with seed ``seeds[i]`` (one trajectory each; repeat an episode for more samples).

    Up to ``batch_size`` trajectories advance together, one assistant step per turn each; sampling is at
    ``temperature`` (0 = greedy). Returns the trajectories in input order. The model runs on its own device, in
    eval mode, and is handed back in its own mode.
    """
    if len(episodes) != len(seeds):
        raise ValueError(f"{len(episodes)} episodes but {len(seeds)} seeds: give one seed per trajectory")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size}, max_new_tokens={max_new_tokens}: each must be >= 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: an assistant message could not end; use "
                         "shiq_lab.infra.models.load_tokenizer")
    pad, newline = pad_token_id(tokenizer), tokenizer("\n", add_special_tokens=False)["input_ids"]
    device = device_of(model)
    waiting = list(range(len(episodes)))[::-1]  # popped from the end: input order
    live: dict[int, _Live] = {}
    done: dict[int, Trajectory] = {}
    with eval_mode(model):
        while waiting or live:
            while waiting and len(live) < batch_size:  # a finished trajectory's slot goes to the next one
                i = waiting.pop()
                live[i] = _Live(episodes[i], int(seeds[i]), config)
                if live[i].run.done:  # an episode without turns has nothing to generate
                    done[i] = live.pop(i).finish(source)
            if not live:
                continue
            order = list(live)
            prompts = [live[i].prompt(tokenizer) for i in order]
            new = sample_batch(model, prompts, pad_id=pad, eos_id=eos, max_new_tokens=max_new_tokens,
                               temperature=temperature, generator=[live[i].generator for i in order], device=device)
            for i, ids in zip(order, new):
                live[i].answer(tokenizer, ids, eos, newline)
                if live[i].run.done:
                    done[i] = live.pop(i).finish(source)
    return [done[i] for i in range(len(episodes))]


def rollout(model: torch.nn.Module, tokenizer: Any, episode: Episode, *, config: PromptConfig = DEFAULT_PROMPT,
            max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0, source: str = "sample") -> Trajectory:
    """Play ``episode`` with ``model`` (sampling at ``temperature``; 0 = greedy): :func:`rollouts` of one."""
    return rollouts(model, tokenizer, [episode], [seed], config=config, max_new_tokens=max_new_tokens,
                    temperature=temperature, batch_size=1, source=source)[0]


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
