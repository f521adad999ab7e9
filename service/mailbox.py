"""One wake-up per burst: engine outputs into per-stream inboxes on an event loop.

The thread that dispatches the engine's events (the engine process's reader thread, or the
engine thread itself with --engine-in-thread) calls every open stream's sink once per message. With one
`loop.call_soon_threadsafe` per sink call, a step with 128 streams writes the loop's self-pipe and
takes its lock 128 times. A Mailbox collects the (queue, item) pairs under its own lock and
schedules a single `_flush` on the loop when the first pair of a burst arrives; `_flush` takes the
whole list and appends each item to its stream's `Inbox` in arrival order.

An `Inbox` is a list plus at most one waiting future: with 128 streams, asyncio.Queue's
get/put/empty/wake-up machinery was a quarter of the event loop's Python time per message, and
the loop shares the GIL with the dispatching thread.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class Inbox:
    """One stream's pending items; only the event loop's thread touches it."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():        # done: its reader was cancelled
                waiter.set_result(None)

    async def get_all(self) -> list[Any]:
        """Every item posted so far, waiting for the first one if there is none."""
        if not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items = self.items, []
        return items


class Mailbox:
    """Posts items from any thread into Inboxes owned by `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Inbox, Any]] = []

    def post(self, inbox: Inbox, item: Any) -> None:
        """Thread-safe. Schedules a flush only when the list was empty (a flush is then pending)."""
        with self._lock:
            self._pending.append((inbox, item))
            if len(self._pending) > 1:
                return   # a flush is already scheduled and has not taken the list yet
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                # the loop is closed: nobody can read these inboxes any more; drop, do not raise
                # into the dispatching thread (a raising sink would end every other stream's relay)
                self._pending.clear()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for inbox, item in pending:
            inbox.put(item)
