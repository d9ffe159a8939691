"""Per-turn rewards of a BFCL episode: the official state and response checks after every turn.

The model's calls and the ground truth's calls run on two separate, fresh sets of back-ends (see
:mod:`.backends`), turn after turn, each side keeping its own state. After turn k:

- state check: every public attribute of every back-end of the model's side equals the ground truth's;
- response check: the ground truth's results of turn k are all among the model's results so far (as a
  multiset, order free: the package's ``_is_subsequence_unordered``);
- a turn whose ground truth is empty ("no call") passes only when the model made no call, and its state is not
  checked (as in the package's irrelevance check);
- a turn with an invalid call string (see :mod:`.calls`) scores 0; its valid calls still run, so later turns see
  the state they produced.

The official score is all or nothing: 1.0 when every turn passes (the package stops at the first failure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shiq_lab.tasks.bfcl.backends import Backends
from shiq_lab.tasks.bfcl.calls import MAX_CALLS_PER_TURN, InvalidCall, ParsedCall
from shiq_lab.tasks.bfcl.episodes import Episode

__all__ = ["EpisodeResult", "EpisodeRun", "TurnResult", "check_episode", "episode_score", "turn_rewards"]


@dataclass
class TurnResult:
    """What happened in one turn: the reward and why."""

    reward: float
    reason: str  # "ok" or what failed
    results: list[str] = field(default_factory=list)  # the model's call results, in call order
    ground_truth_results: list[str] = field(default_factory=list)
    invalid: list[InvalidCall] = field(default_factory=list)
    state_ok: bool | None = None  # None where not checked (no-call turns, empty responses)
    response_ok: bool | None = None


@dataclass
class EpisodeResult:
    turns: list[TurnResult]

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.turns]

    @property
    def score(self) -> float:
        """The official all-or-nothing episode score."""
        return 1.0 if all(t.reward == 1.0 for t in self.turns) else 0.0


def _unordered_subset(needed: Sequence[str], have: Sequence[str]) -> bool:
    pool = list(have)
    for item in needed:
        try:
            pool.remove(item)
        except ValueError:
            return False
    return True


def _sides(episode: Episode) -> tuple[Backends, Backends]:
    def make() -> Backends:
        return Backends(episode.involved_classes, episode.initial_config, long_context=episode.long_context,
                        version=episode.version)

    return make(), make()


class EpisodeRun:
    """One episode being played: its own model-side and ground-truth back-ends, checked one turn at a time.

    :meth:`step` executes the model's calls of the next turn on this run's private back-ends (nothing is shared
    with another run, even of the same episode) and returns that turn's :class:`TurnResult`; the results it
    reports are what the model reads in the turn's tool message. :func:`check_episode` is this loop over all
    turns, so a rollout that steps a run turn by turn gets exactly the rewards of checking its calls at the end.
    """

    def __init__(self, episode: Episode) -> None:
        self.episode = episode
        self.model, self.truth = _sides(episode)
        self.turns: list[TurnResult] = []
        self._model_results: list[str] = []

    @property
    def done(self) -> bool:
        return len(self.turns) == self.episode.n_turns

    @property
    def result(self) -> EpisodeResult:
        """The turns checked so far (all of them once :attr:`done`)."""
        return EpisodeResult(list(self.turns))

    def step(self, turn_calls: Sequence[str]) -> TurnResult:
        """Execute and check the model's call strings of the next turn; never raises on a bad call string."""
        episode, k = self.episode, len(self.turns)
        if self.done:
            raise ValueError(f"{episode.id}: all {episode.n_turns} turns are already played")
        model, truth, gt_calls = self.model, self.truth, episode.ground_truth[k]
        if isinstance(turn_calls, str):  # a bare string would otherwise be read as a list of characters
            turn_calls = [turn_calls]
        parsed = [model.parse(c) for c in turn_calls[:MAX_CALLS_PER_TURN]]
        invalid = [p for p in parsed if isinstance(p, InvalidCall)]
        if len(turn_calls) > MAX_CALLS_PER_TURN:
            invalid.append(InvalidCall(f"<{len(turn_calls) - MAX_CALLS_PER_TURN} more calls>",
                                       f"more than {MAX_CALLS_PER_TURN} calls in one turn"))
        results = [model.execute(p) for p in parsed if isinstance(p, ParsedCall)]
        self._model_results += results
        gt_results = []
        for text in gt_calls:
            p = truth.parse(text)
            if isinstance(p, InvalidCall):  # a data error, not a type error
                raise ValueError(
                    f"{episode.id} turn {k}: ground-truth call {text!r} is refused ({p.reason}); "
                    "the data and the parser disagree")
            gt_results.append(truth.execute(p))
        turn = TurnResult(0.0, "ok", results, gt_results, invalid)
        if not gt_calls:
            turn.reason = "ok" if not turn_calls else "made a call in a turn whose ground truth is no call"
        elif not turn_calls:
            turn.reason = "no call in a turn that needs calls"
        else:
            turn.state_ok = model.state() == truth.state()
            turn.response_ok = _unordered_subset(gt_results, self._model_results)
            if invalid:
                turn.reason = f"invalid call: {invalid[0].reason}"
            elif not turn.state_ok:
                turn.reason = "state differs from the ground truth's"
            elif not turn.response_ok:
                turn.reason = "a ground-truth result is missing from the model's results"
        turn.reward = 1.0 if turn.reason == "ok" else 0.0
        self.turns.append(turn)
        return turn


def check_episode(episode: Episode, calls: Sequence[Sequence[str]]) -> EpisodeResult:
    """Execute ``calls[k]`` (the model's call strings of turn k) turn by turn and check every turn.

    Builds fresh back-ends on every call (an :class:`EpisodeRun`) and leaves nothing behind; never raises on a
    bad call string.
    """
    if len(calls) != episode.n_turns:
        raise ValueError(f"{episode.id} has {episode.n_turns} turns but {len(calls)} lists of calls were given: "
                         "give one list per turn (an empty list for a turn without calls)")
    run = EpisodeRun(episode)
    for turn_calls in calls:
        run.step(turn_calls)
    return run.result


def turn_rewards(episode: Episode, calls: Sequence[Sequence[str]]) -> list[float]:
    """Per-turn rewards (1.0 when the turn's state and response checks hold, else 0.0)."""
    return check_episode(episode, calls).rewards


def episode_score(episode: Episode, calls: Sequence[Sequence[str]]) -> float:
    """The official all-or-nothing score of the episode (1.0 when every turn passes)."""
    return check_episode(episode, calls).score
