"""One wake-up per burst: engine-thread outputs onto an event loop's asyncio queues.

The engine thread calls every open stream's sink once per step. With one
`loop.call_soon_threadsafe` per sink call, a step with 128 streams writes the loop's self-pipe and
takes its lock 128 times. A Mailbox collects the (queue, item) pairs under its own lock and
schedules a single `_flush` on the loop when the first pair of a burst arrives; `_flush` takes the
whole list and puts each item in arrival order, so each queue sees its items in the order they
were posted.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class Mailbox:
    """Posts items from any thread onto asyncio queues owned by `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Thread-safe. Schedules a flush only when the list was empty (a flush is then pending)."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return   # a flush is already scheduled and has not taken the list yet
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                # the loop is closed: nobody can read these queues any more; drop, do not raise
                # into the engine thread (a raising sink would fail the whole engine step)
                self._pending.clear()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)
