"""Conversations of BFCL episodes for a chat model, and decoding of the model's text into call strings.

A conversation is ``system`` (instructions + function docs), then per turn ``user`` -> ``assistant`` (the
calls of the turn as a Python list, ``[cd(folder='a'), ls()]``; ``[]`` for no call) -> ``tool`` (one result
per line; absent when there was no call). One assistant step per turn: the official harness lets a model
take up to 20 steps in a turn; here all calls of a turn come in one message, which is what the ground truth
trajectories look like, and keeps every turn one policy segment with one reward.

Docs profiles (the official JSON docs make a median system prompt of about 36,000 characters):

- ``json``: the official JSON docs, for measurement;
- ``compact``: one line per function, ``name(arg: type, opt: type = default): first sentence``;
- ``signatures``: one line per function, ``name(arg, opt=default)``: the CPU profile.

Tool results are cut to ``max_result_chars`` in the prompt only (the long-context back-ends return pages);
the checker always compares the full results.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shiq_lab.tasks.bfcl.episodes import ADDED_FUNCTIONS_MESSAGE, Episode, function_docs

__all__ = [
    "DEFAULT_PROMPT",
    "NO_CALL",
    "PROFILES",
    "PromptConfig",
    "assistant_message",
    "conversation",
    "decode_calls",
    "render_docs",
    "system_prompt",
    "tool_message",
    "user_message",
]

PROFILES = ("json", "compact", "signatures")
NO_CALL = "[]"

INSTRUCTIONS = (
    "You operate APIs by calling functions. For each user request, reply with only the function calls to make, "
    "as a Python list: [func1(arg=value), func2(arg=value)]. Arguments are literals. The results come back in a "
    "tool message. If no function fits or a required argument is missing, reply [] .")


@dataclass(frozen=True)
class PromptConfig:
    """How an episode is rendered for the model."""

    docs: str = "signatures"  # one of PROFILES
    max_result_chars: int = 200  # per tool message, in the prompt only

    def __post_init__(self) -> None:
        if self.docs not in PROFILES:
            raise ValueError(f"docs profile {self.docs!r}: choose one of {', '.join(PROFILES)}")


DEFAULT_PROMPT = PromptConfig()

_TYPES = {"string": "str", "integer": "int", "float": "float", "boolean": "bool", "array": "list", "dict": "dict",
          "any": "Any", "tuple": "tuple"}


def _description(doc: dict[str, Any]) -> str:
    text = doc.get("description", "")
    text = text.split("Tool description:", 1)[-1].strip()
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first.strip()


def _signature(doc: dict[str, Any], *, typed: bool) -> str:
    params = doc.get("parameters", {}).get("properties", {})
    required = set(doc.get("parameters", {}).get("required", []))
    parts = []
    for name, spec in params.items():
        kind = _TYPES.get(spec.get("type", "any"), spec.get("type", "any"))
        part = f"{name}: {kind}" if typed else name
        if name not in required:
            part += f" = {spec['default']!r}" if "default" in spec else " = None"
        parts.append(part)
    return f"{doc['name']}({', '.join(parts)})"


def render_docs(names: Sequence[str], classes: Sequence[str], profile: str = "signatures", version: str = "v3") -> str:
    """Docs of the functions ``names`` (of the API ``classes``) in one of :data:`PROFILES`."""
    wanted = set(names)
    docs = [d for c in classes for d in function_docs(c, version) if d["name"] in wanted]
    if profile == "json":
        return json.dumps(docs)
    if profile == "compact":
        return "\n".join(f"{_signature(d, typed=True)}: {_description(d)}" for d in docs)
    if profile == "signatures":
        return "\n".join(_signature(d, typed=False) for d in docs)
    raise ValueError(f"docs profile {profile!r}: choose one of {', '.join(PROFILES)}")


def system_prompt(episode: Episode, config: PromptConfig = DEFAULT_PROMPT) -> str:
    docs = render_docs(episode.available_functions(0), episode.involved_classes, config.docs, episode.version)
    return f"{INSTRUCTIONS}\nFunctions:\n{docs}"


def user_message(episode: Episode, turn: int, config: PromptConfig = DEFAULT_PROMPT) -> str:
    """The user text of ``turn``; a miss_func turn that gives functions back lists their docs first."""
    added = episode.missed_functions.get(turn)
    if added and episode.turns[turn] == ADDED_FUNCTIONS_MESSAGE:
        docs = render_docs(added, episode.involved_classes, config.docs, episode.version)
        return f"{docs}\n{ADDED_FUNCTIONS_MESSAGE}"
    return episode.turns[turn]


def assistant_message(calls: Sequence[str]) -> str:
    """The assistant text of a turn's calls (``[]`` for none)."""
    return "[" + ", ".join(calls) + "]" if calls else NO_CALL


def tool_message(results: Sequence[str], config: PromptConfig = DEFAULT_PROMPT) -> str:
    """One line per call result, each cut to ``max_result_chars``."""
    cut = config.max_result_chars
    return "\n".join(r if len(r) <= cut else r[:cut] + "..." for r in results)


def conversation(episode: Episode, calls: Sequence[Sequence[str]], results: Sequence[Sequence[str]],
                 rewards: Sequence[float] | None = None, config: PromptConfig = DEFAULT_PROMPT) -> list[dict[str, Any]]:
    """Messages of an executed trajectory: assistant messages carry the turn's ``reward`` when given.

    ``results[k]`` are the model's call results of turn k (what :func:`~.checker.check_episode` returns).
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(episode, config)}]
    for k in range(episode.n_turns):
        messages.append({"role": "user", "content": user_message(episode, k, config)})
        reply: dict[str, Any] = {"role": "assistant", "content": assistant_message(calls[k])}
        if rewards is not None:
            reply["reward"] = float(rewards[k])
        messages.append(reply)
        if results[k]:
            messages.append({"role": "tool", "content": tool_message(results[k], config)})
    return messages


def _call_texts(node: ast.AST, source: str) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)):
        return [ast.get_source_segment(source, e) or "" for e in node.elts]
    if isinstance(node, ast.Call):
        return [ast.get_source_segment(source, node) or ""]
    return None


def decode_calls(text: str) -> list[str]:
    """The call strings in a model's reply (``[f(a=1), g()]``, or one bare call); ``[]`` when it made none.

    Only :mod:`ast` parses the text; the elements come back as source strings, which
    :func:`~.calls.parse_call` then checks (a non-call element comes back too and is refused there).
    A reply that does not parse as a list of calls is a text answer: no calls.
    """
    body = text.strip()
    fence = re.search(r"```(?:python)?\s*(.*?)```", body, re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    candidates = [body]
    if "[" in body and "]" in body:
        candidates.append(body[body.index("["): body.rindex("]") + 1])
    for candidate in candidates:
        if len(candidate) > 100_000:
            continue
        try:
            tree = ast.parse(candidate, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        found = _call_texts(tree.body, candidate)
        if found is not None:
            return found
    return []
