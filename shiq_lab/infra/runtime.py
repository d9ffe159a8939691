"""CPU thread count for small models.

The models of the CPU-scale runs (``tiny``, ``imdb-small``, the sentiment classifier) have matrices
so small that torch's intra-op threads cost more than they save: on a 2-core machine, one thread
ran the notebook-04 sweep in a quarter of the CPU time of two. :func:`cpu_threads` sets the count
for a block and restores it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave torch's setting alone)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"cpu_threads={n!r}: use an int >= 1, or None to keep torch's setting")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Within the block, the process's file descriptor 2 goes to /dev/null (restored after).

    For native code that prints to stderr on its own, such as the CPU profiler's ``USDT: ...
    profiler_start / profiler_stop`` lines around every ``torch.profiler.profile`` block. Python
    exceptions raised in the block still reach the caller (they are objects, not stderr text).
    """
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
