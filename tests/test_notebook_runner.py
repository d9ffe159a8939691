"""The notebook runner's shell-channel polling: re-polls in steps, keeps the caller's deadline."""

import asyncio
import queue

import pytest

from shiq_lab.infra import notebook_runner


class _Channel:
    """A channel whose message only shows up on the third poll (a missed wake-up, then found)."""

    def __init__(self, ready_on: int) -> None:
        self.calls: list[float | None] = []
        self.ready_on = ready_on

    async def get_msg(self, timeout=None):
        self.calls.append(timeout)
        if len(self.calls) >= self.ready_on:
            return {"msg_type": "execute_reply"}
        await asyncio.sleep(timeout or 0)  # a real poll waits its timeout out
        raise queue.Empty


def test_polls_in_steps_until_the_message_is_seen() -> None:
    channel = _Channel(ready_on=3)
    notebook_runner._poll_in_steps(channel, step=0.01)
    assert asyncio.run(channel.get_msg(timeout=None)) == {"msg_type": "execute_reply"}
    assert channel.calls == [0.01, 0.01, 0.01]


def test_keeps_the_deadline_and_raises_empty_after_it() -> None:
    channel = _Channel(ready_on=10**9)
    notebook_runner._poll_in_steps(channel, step=0.02)
    with pytest.raises(queue.Empty):
        asyncio.run(channel.get_msg(timeout=0.05))
    assert 2 <= len(channel.calls) <= 6 and all(t <= 0.02 for t in channel.calls)


def test_papermill_engine_uses_the_polling_client() -> None:
    import papermill.engines

    notebook_runner._install_polling_client()
    client = papermill.engines.PapermillNotebookClient
    assert client._shiq_lab_polling is True
    assert client.start_new_kernel_client is not client.__mro__[1].start_new_kernel_client
