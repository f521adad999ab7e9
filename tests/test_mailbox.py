"""service.mailbox: order kept per inbox, one loop wake-up per burst, closed loop tolerated,
a cancelled reader does not break delivery."""
from __future__ import annotations

import asyncio
import threading

from service.mailbox import Inbox, Mailbox


async def _read(inbox: Inbox, n: int, timeout: float = 10) -> list:
    out: list = []
    while len(out) < n:
        out += await asyncio.wait_for(inbox.get_all(), timeout)
    return out


def test_burst_while_loop_is_blocked_is_one_flush_in_order():
    """1000 posts from another thread while the loop is busy: every item arrives, in order per
    inbox, and the loop is woken (and _flush run) once."""
    async def main() -> tuple[int, list[list[int]]]:
        mailbox = Mailbox(asyncio.get_running_loop())
        flushes = 0
        real_flush = mailbox._flush

        def counting_flush() -> None:
            nonlocal flushes
            flushes += 1
            real_flush()
        mailbox._flush = counting_flush
        inboxes = [Inbox() for _ in range(4)]

        def producer() -> None:
            for i in range(1000):
                mailbox.post(inboxes[i % 4], i)
        thread = threading.Thread(target=producer)
        thread.start()
        thread.join()          # the loop is blocked here: nothing can flush until we yield
        got = [await _read(inbox, 250) for inbox in inboxes]
        return flushes, got

    flushes, got = asyncio.run(main())
    assert flushes == 1
    assert got == [list(range(k, 1000, 4)) for k in range(4)]


def test_posts_racing_flushes_lose_nothing():
    """Posts from a thread while the loop keeps flushing: all arrive, in order, with no lost
    wake-up (each flush leaves an empty list, so the next post schedules another)."""
    async def main() -> list[int]:
        mailbox = Mailbox(asyncio.get_running_loop())
        inbox = Inbox()
        n = 20000

        def producer() -> None:
            for i in range(n):
                mailbox.post(inbox, i)
        thread = threading.Thread(target=producer)
        thread.start()
        out = await _read(inbox, n)
        thread.join()
        return out

    assert asyncio.run(main()) == list(range(20000))


def test_cancelled_reader_then_new_reader_gets_everything():
    async def main() -> list[int]:
        mailbox = Mailbox(asyncio.get_running_loop())
        inbox = Inbox()
        reader = asyncio.ensure_future(inbox.get_all())
        await asyncio.sleep(0)
        reader.cancel()                      # e.g. the client went away mid-wait
        await asyncio.sleep(0)
        for i in range(3):
            mailbox.post(inbox, i)
        await asyncio.sleep(0.01)
        return await _read(inbox, 3)

    assert asyncio.run(main()) == [0, 1, 2]


def test_post_after_loop_closed_does_not_raise():
    loop = asyncio.new_event_loop()
    mailbox = Mailbox(loop)
    inbox = Inbox()
    loop.close()
    mailbox.post(inbox, 1)   # dropped, not raised into the engine thread
    mailbox.post(inbox, 2)
    assert mailbox._pending == []
