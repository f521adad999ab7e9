"""Page accounting for a paged K/V cache (pure Python, no torch).

The K/V pool of each layer is cut into `num_pages` pages of `page_size` token slots; every layer
uses the same page ids, so one `PageAllocator` serves the whole model. A row (a request in the
batch) holds pages only for the tokens it has, in order: token t of a row lives in slot
t % page_size of page `pages(row)[t // page_size]`. This class only decides which page ids a row
owns; moving K/V (to host on park, back into any free pages on restore) is the caller's job.

Pages carry reference counts so that rows can share a prefix (`share`). Only full pages are ever
shared: a row's writes go to its last, partial page or to a fresh one, so a write never touches a
page that another row also reads.

Return values: `allocate`, `grow` and `share` return the pages they took from the free list;
`free` returns the pages it put back (those whose count dropped to 0). Failing calls
(`OutOfPages`, `ValueError`, `KeyError`) change nothing.

Invariants (asserted by `check`):
- every page is either in the free list (refcount 0) or used (refcount >= 1), never both;
  free + used == num_pages;
- no page id appears twice in the free list;
- a page's refcount == the number of rows that hold it; no row holds a page twice;
- a row's page count == pages_for(its token count);
- pages with refcount > 1 are full in every row holding them (the tail page is never shared).
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable

RowId = Hashable


class OutOfPages(Exception):
    """Not enough free pages for the request; the allocator's state is unchanged."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} free K/V pages, only {free} free")
        self.needed = needed
        self.free = free


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 0 or page_size < 1:
            raise ValueError(f"bad pool: num_pages={num_pages}, page_size={page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Free list is a min-heap: lowest id first, not LIFO. Used pages then stay packed at the
        # low end of the pool, so kernels or copies over a pool prefix [0, highest used id] touch
        # little dead memory, and page placement is deterministic for a given call sequence.
        # Cost: O(log n) per page instead of O(1), negligible at a few pages per step.
        self._free: list[int] = list(range(num_pages))  # sorted, hence already a heap
        self._refs: list[int] = [0] * num_pages
        self._pages: dict[RowId, list[int]] = {}
        self._tokens: dict[RowId, int] = {}

    # -- queries -------------------------------------------------------------------------------

    def pages_for(self, num_tokens: int) -> int:
        """The one rule: n tokens need ceil(n / page_size) pages (0 tokens need 0 pages)."""
        if num_tokens < 0:
            raise ValueError(f"negative token count {num_tokens}")
        return -(-num_tokens // self.page_size)

    def pages_needed(self, row_id: RowId, num_tokens: int) -> int:
        """Free pages needed for row_id to hold num_tokens (a new row, or growing an existing one)."""
        return max(0, self.pages_for(num_tokens) - len(self._pages.get(row_id, ())))

    def can_allocate(self, row_id: RowId, num_tokens: int) -> bool:
        """Whether `allocate` (new row) or `grow` (existing row) to num_tokens would succeed."""
        return self.pages_needed(row_id, num_tokens) <= len(self._free)

    def pages(self, row_id: RowId) -> list[int]:
        return list(self._pages[row_id])

    def num_tokens(self, row_id: RowId) -> int:
        return self._tokens[row_id]

    def refcount(self, page: int) -> int:
        return self._refs[page]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def rows(self) -> list[RowId]:
        return list(self._pages)

    # -- changes -------------------------------------------------------------------------------

    def allocate(self, row_id: RowId, num_tokens: int) -> list[int]:
        """A new row holding num_tokens tokens gets pages_for(num_tokens) fresh pages."""
        if row_id in self._pages:
            raise ValueError(f"row {row_id!r} already holds pages")
        taken = self._take(self.pages_for(num_tokens))
        self._pages[row_id] = taken
        self._tokens[row_id] = num_tokens
        return list(taken)

    def grow(self, row_id: RowId, new_num_tokens: int) -> list[int]:
        """The row now has new_num_tokens tokens; appends and returns the pages that takes."""
        held = self._pages[row_id]
        if new_num_tokens < self._tokens[row_id]:
            raise ValueError(f"row {row_id!r} cannot shrink from {self._tokens[row_id]} "
                             f"to {new_num_tokens} tokens")
        added = self._take(self.pages_for(new_num_tokens) - len(held))
        held.extend(added)
        self._tokens[row_id] = new_num_tokens
        return added

    def share(self, src_row_id: RowId, dst_row_id: RowId, num_tokens: int) -> list[int]:
        """New row dst whose first num_tokens tokens are src's first num_tokens tokens.

        dst holds the same page ids as src for the num_tokens // page_size full pages (refcount +1)
        and a fresh page for a partial tail, whose slots the caller must copy from src's page.
        Returns the fresh pages (0 or 1)."""
        if dst_row_id in self._pages:
            raise ValueError(f"row {dst_row_id!r} already holds pages")
        src_tokens = self._tokens[src_row_id]
        if not 0 <= num_tokens <= src_tokens:
            raise ValueError(f"cannot share {num_tokens} tokens of a {src_tokens}-token row")
        shared = self._pages[src_row_id][:num_tokens // self.page_size]
        fresh = self._take(self.pages_for(num_tokens) - len(shared))
        for page in shared:
            self._refs[page] += 1
        self._pages[dst_row_id] = shared + fresh
        self._tokens[dst_row_id] = num_tokens
        return list(fresh)

    def free(self, row_id: RowId) -> list[int]:
        """Drops the row; returns the pages whose refcount fell to 0 (now in the free list)."""
        held = self._pages.pop(row_id)
        del self._tokens[row_id]
        released = []
        for page in held:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                heapq.heappush(self._free, page)
                released.append(page)
        return released

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(count, len(self._free))
        taken = [heapq.heappop(self._free) for _ in range(count)]
        for page in taken:
            self._refs[page] = 1
        return taken

    # -- invariants ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raises AssertionError if an invariant (module docstring) is broken. Works under -O."""
        def require(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(what)

        free = set(self._free)
        require(len(free) == len(self._free), "a page appears twice in the free list")
        require(all(0 <= p < self.num_pages for p in free), "free page id out of range")
        held = Counter(p for pages in self._pages.values() for p in pages)
        require(self._pages.keys() == self._tokens.keys(), "pages and token counts disagree on rows")
        for page in range(self.num_pages):
            require(self._refs[page] == held[page], f"page {page}: refcount != number of holders")
            require((page in free) != (held[page] >= 1), f"page {page}: not exactly free xor used")
        require(len(free) + len(held) == self.num_pages, "free + used != num_pages")
        for row, pages in self._pages.items():
            tokens = self._tokens[row]
            require(len(pages) == self.pages_for(tokens), f"row {row!r}: page count != pages_for")
            require(len(set(pages)) == len(pages), f"row {row!r} holds a page twice")
            require(all(self._refs[p] == 1 for p in pages[tokens // self.page_size:]),
                    f"row {row!r}: its partial tail page is shared")
