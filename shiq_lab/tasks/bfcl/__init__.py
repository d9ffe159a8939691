"""BFCL-V3 multi-turn tool use: episodes, safe call parsing, fresh back-ends and per-turn state-checked rewards."""

from shiq_lab.tasks.bfcl.checker import (
    EpisodeResult,
    TurnResult,
    check_episode,
    episode_score,
    turn_rewards,
)
from shiq_lab.tasks.bfcl.episodes import Episode, load_episodes

__all__ = ["Episode", "EpisodeResult", "TurnResult", "check_episode", "episode_score", "load_episodes", "turn_rewards"]
