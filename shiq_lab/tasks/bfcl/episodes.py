"""BFCL multi-turn entries as :class:`Episode` objects, and the function docs of the API classes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from shiq_lab.tasks.bfcl.asset import CATEGORIES, data_file, docs_dir

__all__ = ["ADDED_FUNCTIONS_MESSAGE", "CLASS_FILES", "Episode", "function_docs", "load_episodes"]

# API class -> stem of its back-end source file and of its docs file (the package's own mapping)
CLASS_FILES: dict[str, str] = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}

# What the official harness says in a miss_func turn that only brings back the withheld functions.
ADDED_FUNCTIONS_MESSAGE = "I have updated some more functions you can choose from. What about now?"


@dataclass(frozen=True)
class Episode:
    """One multi-turn entry.

    ``turns[k]`` is the user message of turn k (a turn of the data without one, where miss_func gives the
    withheld functions back, carries the official harness's message). ``ground_truth[k]`` is the list of
    call strings of turn k; an empty list means the model must make no call. ``missed_functions`` maps a
    turn to the function names that are absent from the docs before that turn (miss_func only).
    """

    id: str
    category: str
    turns: list[str]
    ground_truth: list[list[str]]
    involved_classes: list[str]
    initial_config: dict[str, Any]
    missed_functions: dict[int, list[str]] = field(default_factory=dict)
    version: str = "v3"

    @property
    def long_context(self) -> bool:
        """The back-ends load the long-context extensions (the package decides this from the category)."""
        return self.category == "long_context"

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    def available_functions(self, turn: int) -> list[str]:
        """Names of the documented functions the model is shown at ``turn`` (miss_func withholds some)."""
        hidden = {f for t, names in self.missed_functions.items() if t > turn for f in names}
        return [d["name"] for c in self.involved_classes for d in function_docs(c, self.version) if d["name"] not in hidden]


@lru_cache(maxsize=16)
def _function_docs(class_name: str, version: str) -> tuple[str, ...]:
    if class_name not in CLASS_FILES:
        raise ValueError(f"unknown BFCL API class {class_name!r}; known: {', '.join(CLASS_FILES)}")
    path = docs_dir(version) / f"{CLASS_FILES[class_name]}.json"
    return tuple(line for line in path.read_text().splitlines() if line.strip())


def function_docs(class_name: str, version: str = "v3") -> list[dict[str, Any]]:
    """The official JSON docs of one API class (a fresh list of dicts on every call)."""
    return [json.loads(line) for line in _function_docs(class_name, version)]


@lru_cache(maxsize=16)
def _read(category: str, version: str) -> tuple[tuple[str, str], ...]:
    questions = data_file(category, version).read_text().splitlines()
    answers = data_file(category, version, answers=True).read_text().splitlines()
    return tuple(zip([q for q in questions if q.strip()], [a for a in answers if a.strip()], strict=True))


def load_episodes(category: str = "base", version: str = "v3") -> list[Episode]:
    """The entries of one multi-turn category (``base``, ``miss_func``, ``miss_param``, ``long_context``).

    Every call returns new objects (parsed again from the cached file text), so callers may not share state.
    """
    if category not in CATEGORIES:
        raise ValueError(f"BFCL category {category!r} is unknown: choose one of {', '.join(CATEGORIES)}")
    episodes = []
    for q_line, a_line in _read(category, version):
        q, a = json.loads(q_line), json.loads(a_line)
        if q["id"] != a["id"] or len(q["question"]) != len(a["ground_truth"]):
            raise ValueError(f"{data_file(category, version)}: entry {q['id']} does not line up with its answer "
                             f"{a['id']} ({len(q['question'])} turns vs {len(a['ground_truth'])}): refetch the asset")
        turns = []
        for k, messages in enumerate(q["question"]):
            users = [m["content"] for m in messages if m["role"] == "user"]
            if len(users) > 1:
                raise ValueError(f"{q['id']} turn {k}: {len(users)} user messages, expected at most one")
            turns.append(users[0] if users else ADDED_FUNCTIONS_MESSAGE)
        episodes.append(Episode(
            id=q["id"], category=category, turns=turns, ground_truth=[list(t) for t in a["ground_truth"]],
            involved_classes=list(q["involved_classes"]), initial_config=q["initial_config"],
            missed_functions={int(t): list(v) for t, v in q.get("missed_function", {}).items()}, version=version))
    return episodes
