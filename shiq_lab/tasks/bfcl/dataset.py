"""Offline multi-turn data from BFCL episodes, in the project's ``messages`` format.

Each row is one executed trajectory: ``messages`` (system, then per turn user -> assistant -> tool), every
assistant message carrying its turn's reward, so :func:`shiq_lab.data.tokenize_dataset` puts the reward on
that turn's last assistant token and masks every system / user / tool token (mask 0).

Sources:

- ``ground_truth``: the official calls (every turn 1.0);
- corruptions of one call in one turn: ``drop`` (remove it), ``swap`` (exchange it with the next call),
  ``perturb`` (change one literal argument); the later turns keep their ground-truth calls but run against
  the state the corruption produced, so a mistake may cost later turns too (the credit-assignment case);
- ``sample``: trajectories played by a model (:func:`~.rollout.rollout`), executed and scored.

``reward_mode="turn"`` keeps the per-turn rewards; ``"final"`` puts the official all-or-nothing score on the
last turn only (the other turns 0): the same data with a sparse signal.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

from shiq_lab.tasks.bfcl.calls import ParsedCall, format_call, parse_call
from shiq_lab.tasks.bfcl.checker import check_episode
from shiq_lab.tasks.bfcl.episodes import Episode
from shiq_lab.tasks.bfcl.prompts import DEFAULT_PROMPT, PromptConfig, conversation
from shiq_lab.tasks.bfcl.rollout import Trajectory

__all__ = ["CORRUPTIONS", "REWARD_MODES", "corrupt", "execute", "offline_rows", "with_reward_mode"]

CORRUPTIONS = ("drop", "swap", "perturb")
REWARD_MODES = ("turn", "final")


def _perturb_value(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1]) * rng.randint(1, 9)
    if isinstance(value, float):
        return round(value * rng.choice([0.5, 2.0]) + 1.0, 2)
    if isinstance(value, str):
        return value + "_x" if not value.endswith("_x") else value[:-2]
    if isinstance(value, list) and value:
        return value[:-1]
    return None


def corrupt(episode: Episode, kind: str, rng: random.Random) -> tuple[list[list[str]], dict[str, Any]] | None:
    """The ground-truth calls with one call of one turn dropped, swapped with the next, or perturbed.

    Returns ``(calls, info)`` (``info``: kind, turn, call index) or ``None`` when the episode offers no such
    corruption (e.g. no turn with two different calls for ``swap``).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption {kind!r}: choose one of {', '.join(CORRUPTIONS)}")
    gt = episode.ground_truth
    sites = [(k, j) for k, turn in enumerate(gt) for j in range(len(turn))]
    if kind == "swap":
        sites = [(k, j) for k, j in sites if j + 1 < len(gt[k]) and gt[k][j] != gt[k][j + 1]]
    rng.shuffle(sites)
    for k, j in sites:
        calls = copy.deepcopy(gt)
        if kind == "drop":
            del calls[k][j]
        elif kind == "swap":
            calls[k][j], calls[k][j + 1] = calls[k][j + 1], calls[k][j]
        else:
            parsed = parse_call(gt[k][j], {parse_name(gt[k][j]): None})
            if not isinstance(parsed, ParsedCall):
                continue
            slots = [("kw", name) for name, _ in parsed.kwargs] + [("pos", i) for i in range(len(parsed.args))]
            if not slots:
                continue
            where, key = rng.choice(slots)
            kwargs, args = dict(parsed.kwargs), list(parsed.args)
            if where == "kw":
                kwargs[key] = _perturb_value(kwargs[key], rng)
            else:
                args[key] = _perturb_value(args[key], rng)
            calls[k][j] = format_call(parsed.name, kwargs, tuple(args))
        return calls, {"kind": kind, "turn": k, "call": j}
    return None


def parse_name(text: str) -> str:
    """The function name of a (ground-truth) call string, read without parsing its arguments."""
    return text.split("(", 1)[0].strip()


def execute(episode: Episode, calls: Sequence[Sequence[str]], source: str, *,
            config: PromptConfig = DEFAULT_PROMPT) -> Trajectory:
    """Run ``calls`` on fresh back-ends and build the scored conversation (texts are the canonical call lists)."""
    result = check_episode(episode, calls)
    messages = conversation(episode, calls, [t.results for t in result.turns], result.rewards, config)
    texts = [m["content"] for m in messages if m["role"] == "assistant"]
    return Trajectory(episode.id, source, texts, [list(c) for c in calls], result, messages)


def with_reward_mode(messages: list[dict[str, Any]], score: float, mode: str) -> list[dict[str, Any]]:
    """Messages with per-turn rewards (``turn``) or only the episode score on the last assistant turn (``final``)."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward_mode={mode!r}: choose one of {', '.join(REWARD_MODES)}")
    out = [dict(m) for m in messages]
    if mode == "final":
        assistant = [i for i, m in enumerate(out) if m["role"] == "assistant"]
        for i in assistant:
            out[i]["reward"] = 0.0
        out[assistant[-1]]["reward"] = float(score)
    return out


def offline_rows(episodes: Sequence[Episode], *, corruptions_per_kind: int = 1, samples: Sequence[Trajectory] = (),
                 reward_mode: str = "turn", seed: int = 0, config: PromptConfig = DEFAULT_PROMPT) -> list[dict[str, Any]]:
    """Rows ``{"messages", "episode_id", "source", "return", "score"}`` for :func:`shiq_lab.data.tokenize_dataset`.

    Per episode: its ground truth, ``corruptions_per_kind`` of each corruption kind (distinct sites), and the
    given model ``samples`` of that episode.
    """
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    by_id: dict[str, list[Trajectory]] = {}
    for t in samples:
        by_id.setdefault(t.episode_id, []).append(t)
    for e in episodes:
        trajectories = [execute(e, e.ground_truth, "ground_truth", config=config)]
        for kind in CORRUPTIONS:
            seen = set()
            for _ in range(corruptions_per_kind * 4):
                if len(seen) >= corruptions_per_kind:
                    break
                got = corrupt(e, kind, rng)
                if got is None:
                    break
                key = repr(got[0])
                if key in seen or got[0] == e.ground_truth:
                    continue
                seen.add(key)
                trajectories.append(execute(e, got[0], kind, config=config))
        trajectories += by_id.get(e.id, [])
        for t in trajectories:
            rows.append({"messages": with_reward_mode(t.messages, t.score, reward_mode), "episode_id": e.id,
                         "source": t.source, "return": float(sum(t.rewards)) if reward_mode == "turn" else t.score,
                         "score": t.score})
    return rows
