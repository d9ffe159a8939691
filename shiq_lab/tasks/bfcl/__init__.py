"""BFCL-V3 multi-turn tool use: episodes, safe call parsing, fresh back-ends and per-turn state-checked rewards.

Importing this package registers the ``shiq-lab bfcl`` sub-command (the offline sweep of :mod:`.sweep`).
"""

from shiq_lab.infra.registry import register_command
from shiq_lab.tasks.bfcl.checker import EpisodeResult, TurnResult, check_episode, episode_score, turn_rewards
from shiq_lab.tasks.bfcl.episodes import Episode, load_episodes

__all__ = ["Episode", "EpisodeResult", "TurnResult", "check_episode", "episode_score", "load_episodes", "turn_rewards"]


def _sweep_main(argv: list[str]) -> int:
    from shiq_lab.tasks.bfcl.sweep import main  # torch and the trainer only when the command runs

    return main(argv)


register_command("bfcl", _sweep_main, "BFCL-V3 multi-turn sweep: ShiQ (per-turn / final), DRO, CoPG, DPO")
