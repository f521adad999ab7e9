"""service.mailbox.Mailbox: order kept per queue, one loop wake-up per burst, closed loop tolerated."""
from __future__ import annotations

import asyncio
import threading

from service.mailbox import Mailbox


def test_burst_while_loop_is_blocked_is_one_flush_in_order():
    """1000 posts from another thread while the loop is busy: every item arrives, in order per
    queue, and the loop is woken (and _flush run) once."""
    async def main() -> tuple[int, list[list[int]]]:
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        flushes = 0
        real_flush = mailbox._flush

        def counting_flush() -> None:
            nonlocal flushes
            flushes += 1
            real_flush()
        mailbox._flush = counting_flush
        queues = [asyncio.Queue() for _ in range(4)]

        def producer() -> None:
            for i in range(1000):
                mailbox.post(queues[i % 4], i)
        thread = threading.Thread(target=producer)
        thread.start()
        thread.join()          # the loop is blocked here: nothing can flush until we yield
        got = [[] for _ in queues]
        for q, out in zip(queues, got):
            while len(out) < 250:
                out.append(await asyncio.wait_for(q.get(), 5))
        return flushes, got

    flushes, got = asyncio.run(main())
    assert flushes == 1
    assert got == [list(range(k, 1000, 4)) for k in range(4)]


def test_posts_racing_flushes_lose_nothing():
    """Posts from a thread while the loop keeps flushing: all arrive, in order, with no lost
    wake-up (each flush leaves an empty list, so the next post schedules another)."""
    async def main() -> list[int]:
        mailbox = Mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[int] = asyncio.Queue()
        n = 20000

        def producer() -> None:
            for i in range(n):
                mailbox.post(queue, i)
        thread = threading.Thread(target=producer)
        thread.start()
        out = [await asyncio.wait_for(queue.get(), 10) for _ in range(n)]
        thread.join()
        return out

    assert asyncio.run(main()) == list(range(20000))


def test_post_after_loop_closed_does_not_raise():
    loop = asyncio.new_event_loop()
    mailbox = Mailbox(loop)
    queue = asyncio.Queue()
    loop.close()
    mailbox.post(queue, 1)   # dropped, not raised into the engine thread
    mailbox.post(queue, 2)
    assert mailbox._pending == []
