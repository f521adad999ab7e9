"""K/V accounting: the one owner of "how many K/V tokens does this request need" and of the
bytes parked in host memory. Pure Python (no torch), consulted by the scheduler.

The rule: a row of the decode batch holds the K/V of `request.num_tokens` tokens and keeps one
spare column for the write of its next decode step, so it needs `num_tokens + SPARE_COLUMNS`.
A row may keep decoding while, after that write, it would still have its spare column inside
the context limit. Device memory is counted in pages of `page_size` tokens (1 for the slab, whose
budget is plain tokens; the page size for the paged layout, whose allocator hands out pages).

Invariants:
- `host_bytes` == sum over parked ids of their parked bytes, and never exceeds
  `host_budget_bytes`.
- An id is parked at most once; `unpark`/`drop` of an id that is not parked changes nothing.
"""
from __future__ import annotations

from collections.abc import Iterable

from engine.request import Request

SPARE_COLUMNS = 1   # the column the next decode step writes


def tokens_needed(request: Request, ahead: int = 0) -> int:
    """K/V columns `request` needs as a row of the decode batch (with `ahead` more tokens)."""
    return request.num_tokens + ahead + SPARE_COLUMNS


class KVLedger:
    def __init__(self, device_budget_tokens: int, max_row_tokens: int, bytes_per_token: int,
                 host_budget_bytes: int, page_size: int = 1) -> None:
        self.page_size = page_size
        self.device_budget_pages = device_budget_tokens // page_size   # pages all running rows may hold
        self.max_row_tokens = max_row_tokens               # columns of one row (context limit)
        self.bytes_per_token = bytes_per_token
        self.host_budget_bytes = host_budget_bytes
        self._parked: dict[str, int] = {}                  # request_id -> bytes in host memory
        self.host_bytes = 0

    # ---- device ----------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def device_pages(self, running: Iterable[Request], ahead: int = 0) -> int:
        """Pages the running rows hold once each has the column of its next write (a request of
        `n` completions not yet forked into its rows: n rows of its prompt), each with `ahead`
        more tokens."""
        return sum(r.n * self.pages_for(tokens_needed(r, ahead)) for r in running)

    def fits(self, running: Iterable[Request], extra_tokens: int, rows: int = 1, ahead: int = 0) -> bool:
        """Would the running rows (each with `ahead` more tokens) plus a newcomer of `rows` rows
        needing `extra_tokens` each fit the device budget?"""
        return self.device_pages(running, ahead) + rows * self.pages_for(extra_tokens) <= self.device_budget_pages

    def can_grow(self, request: Request, ahead: int = 0) -> bool:
        """After its next decode write (with `ahead` more tokens), does the row still have its
        spare column in context?"""
        return tokens_needed(request, ahead) + SPARE_COLUMNS <= self.max_row_tokens

    # ---- host ------------------------------------------------------------------------------
    def parked_bytes(self, request: Request) -> int:
        return request.num_tokens * self.bytes_per_token

    def host_can_take(self, request: Request, already: int = 0) -> bool:
        """Would `request`'s K/V fit in host memory (on top of `already` bytes being planned)?"""
        return self.host_bytes + already + self.parked_bytes(request) <= self.host_budget_bytes

    def park(self, request: Request) -> None:
        if request.request_id not in self._parked:
            nbytes = self.parked_bytes(request)
            self._parked[request.request_id] = nbytes
            self.host_bytes += nbytes

    def unpark(self, request_id: str) -> None:
        self.host_bytes -= self._parked.pop(request_id, 0)

    def is_parked(self, request_id: str) -> bool:
        return request_id in self._parked

    @property
    def num_parked(self) -> int:
        return len(self._parked)
