"""Shared test set-up: offline hub, deterministic torch, small thread count for 2-core CI."""

import os

from shiq_lab.infra.notebooks import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ[_k] = _v
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny tensors: one thread avoids oversubscribing a 2-core CI box (measured 62 s -> 16 s
# for the loss tests under load); notebooks and subprocess tests set their own.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> None:
    """Every test starts seeded and on one torch thread (the one place this is set: a test that changes it
    is reset before the next one)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
