"""Worker threads hand finished calls to a ZeroMQ poll loop: a queue for the results, a pipe to wake the poller."""

from __future__ import annotations

import os
import queue
from typing import Any


def finished_calls(wake_r: int, done: queue.SimpleQueue) -> list[tuple[dict[str, Any], bytes]]:
    """What pool threads finished, once their wake-up pipe fired (the pipe is emptied too)."""
    try:
        os.read(wake_r, 4096)
    except BlockingIOError:
        pass
    finished = []
    while True:
        try:
            finished.append(done.get_nowait())
        except queue.Empty:
            return finished
