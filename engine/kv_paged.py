"""The batch's K/V in fixed-size pages: a row holds pages only for the tokens it has.

Layout: `data` is [L, 2, H, N, D] (layers, K/V, kv heads, token slots, head dim) with
N = num_pages * page_size; page p holds slots [p * page_size, (p + 1) * page_size). Token t of a
row lives in slot `page_size * pages[t // page_size] + t % page_size`. Which pages a row holds is
decided by `engine/kv_pages.PageAllocator` (the one owner of page ids); this class moves tensors.

Baton's semantics on pages:
- Embedding (a prefilled request, or K/V restored from host memory) scatters the row's tokens into
  freshly allocated pages, whichever are free; no other row moves.
- Removal frees the row's pages at once; rows 0..n-1 stay the live rows in batch order (the last
  row takes the freed index: metadata only, no K/V copy).
- A decode step first grows every row by one slot (a new page when it crosses a boundary), writes
  each row's new K/V at its own slot, and attends only that row's tokens: in the gathered eager
  path (any device, `PagedCache`) each row's tokens are gathered into a padded window with a mask;
  on CUDA the fused decoder attends the pool directly through FlexAttention
  (engine/paged_attention.py), so no padding is ever read.

Invariants: `lengths[r]` tokens of row r are valid; after `prepare_decode` every row also owns the
slot of position `lengths[r]`; the allocator's page count of a row == pages_for(its slots).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.kv_pages import OutOfPages, PageAllocator


class PagedKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 max_len: int, max_rows: int, dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: masked slots still enter attn @ V with weight 0, and 0 * NaN = NaN.
        # One page more than the allocator hands out: the scratch page, where the padding rows of
        # a bucketed (CUDA-graph) step write, so they never touch a live row's slots.
        self.data = torch.zeros(num_layers, 2, num_kv_heads, (num_pages + 1) * page_size, head_dim,
                                dtype=dtype, device=device)          # [L, 2, H, N, D]
        self.pages = PageAllocator(num_pages, page_size)
        self.page_size = page_size
        self.num_pages = num_pages
        self.scratch_slot = num_pages * page_size
        self.max_len = max_len                                      # tokens of one row (context)
        self.max_rows = max_rows
        self.num_relocations = 0                                    # never: rows do not move
        self.row_ids: list[str] = []
        self.lengths: list[int] = []
        # Row r's pages in order (host), kept in step with the allocator, so a step's page table
        # is one slice and one copy rather than a Python loop over rows.
        self._table = torch.zeros(max_rows, self.pages.pages_for(max_len), dtype=torch.long)   # [R, P]

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    @property
    def bytes_per_token(self) -> int:
        L, two, H, _, D = self.data.shape
        return L * two * H * D * self.data.element_size()

    @property
    def dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim)."""
        L, _two, H, _N, D = self.data.shape
        return L, H, D

    @property
    def total_bytes(self) -> int:
        """Bytes of the pages rows can hold (the scratch page not counted)."""
        return self.num_pages * self.page_size * self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return sum(self.lengths) * self.bytes_per_token

    @property
    def max_pages_per_row(self) -> int:
        return self.pages.pages_for(self.max_len)

    # ---- membership ------------------------------------------------------------------------
    def add_row(self, row_id: str, kv: torch.Tensor) -> None:
        """Embed a row's K/V ([L, 2, H, n, D], on any device) into free pages."""
        slots = self.add_empty_row(row_id, kv.shape[3])
        self.data.index_copy_(3, slots, kv.to(self.data.device, non_blocking=True))

    def add_empty_row(self, row_id: str, n: int) -> torch.Tensor:
        """A new last row of n tokens in free pages whose K/V the caller writes (a prefill that
        writes straight into pages). -> the slots of its tokens 0..n-1, [n] long on the device.
        Raises OutOfPages (or RuntimeError past the context or row limit), changing nothing."""
        if n + 1 > self.max_len:
            raise RuntimeError("row longer than the context limit")
        if self.num_rows >= self.max_rows:
            raise RuntimeError("paged K/V has no free row")
        pages = self.pages.allocate(row_id, n)          # raises OutOfPages, changing nothing
        self._table[self.num_rows, :len(pages)] = torch.tensor(pages, dtype=torch.long)
        self.row_ids.append(row_id)
        self.lengths.append(n)
        return self._row_slots(self.num_rows - 1, n)

    def row_kv(self, row_id: str) -> torch.Tensor:
        """[L, 2, H, n, D] copy of a row's K/V (gathered from its pages)."""
        index = self.row_ids.index(row_id)
        return self.data.index_select(3, self._row_slots(index, self.lengths[index]))

    def take_row(self, row_id: str, allocate) -> torch.Tensor:
        """Copy a row's K/V out to host memory ([L, 2, H, n, D], from `allocate(shape, dtype)`)
        and remove the row."""
        index = self.row_ids.index(row_id)
        src = self.data.index_select(3, self._row_slots(index, self.lengths[index]))   # [L, 2, H, n, D]
        host = allocate(src.shape, src.dtype)
        host.copy_(src, non_blocking=host.is_pinned())
        self.remove_row(row_id)
        return host

    def remove_row(self, row_id: str) -> None:
        index = self.row_ids.index(row_id)
        last = self.num_rows - 1
        self.row_ids[index], self.lengths[index] = self.row_ids[last], self.lengths[last]
        self._table[index] = self._table[last]
        self.row_ids.pop()
        self.lengths.pop()
        self.pages.free(row_id)

    def reserve(self, longest: int) -> None:
        """Nothing to prepare: a newcomer takes whichever pages are free."""

    # ---- decode ----------------------------------------------------------------------------
    def prepare_decode(self) -> torch.Tensor:
        """Give every row the slot of its next token. -> write slots [n] long, on the host (the
        fused paged step packs them with its other inputs into one copy)."""
        for r, (row_id, n) in enumerate(zip(self.row_ids, self.lengths)):
            if n + 1 > self.max_len:
                raise RuntimeError("row longer than the context limit")
            new = self.pages.grow(row_id, n + 1)    # the scheduler's budget keeps this from failing
            if new:                                 # the next token starts a page
                self._table[r, n // self.page_size] = new[0]
        lengths = torch.tensor(self.lengths, dtype=torch.long)[:, None]            # [n, 1]
        return self._slots(lengths)[:, 0]

    def advance(self) -> None:
        """After a decode step wrote every row's slot."""
        self.lengths = [n + 1 for n in self.lengths]

    def page_table(self, rows: int) -> torch.Tensor:
        """[rows, max_pages_per_row] long on the host, no copy: row r's pages in order (entries
        past its pages hold stale page ids: callers mask them by length)."""
        return self._table[:rows]

    def _slots(self, positions: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """The one mapping from token positions to pool slots: positions [n, W] (host, long) of
        rows first_row .. first_row + n - 1 -> slots [n, W] (host)."""
        table = self._table[first_row:first_row + positions.shape[0]]               # [n, P]
        page = table.gather(1, positions // self.page_size)
        return page * self.page_size + positions % self.page_size

    def _row_slots(self, index: int, n: int) -> torch.Tensor:
        """Slots of row `index`'s tokens 0..n-1, [n] long on the device."""
        return self._slots(torch.arange(n)[None], first_row=index)[0].to(self.data.device, non_blocking=True)

    def gathered_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the eager decode: -> (gather [n, W] slots, mask [n, 1, 1, W] bool) with
        W = longest row + 1; row r's column c holds its token c (c <= lengths[r], the last one
        being the token this step writes), padding columns point at slot 0 and are masked."""
        lengths = torch.tensor(self.lengths, dtype=torch.long)                    # [n]
        cols = torch.arange(int(lengths.max()) + 1)                               # [W]
        valid = cols[None, :] <= lengths[:, None]                                 # [n, W]
        positions = torch.where(valid, cols[None, :], 0)
        gather = self._slots(positions).to(self.data.device, non_blocking=True)
        return gather, valid.to(self.data.device)[:, None, None, :]

    @property
    def num_pages_free(self) -> int:
        return self.pages.num_free

    @property
    def num_pages_used(self) -> int:
        return self.pages.num_used


class _PagedLayer(CacheLayerMixin):
    """One layer's view of a paged pool: writes the new K/V at each row's slot, returns each row's
    tokens gathered into a padded window [n, H, W, D]."""

    is_sliding = False

    def __init__(self, data: torch.Tensor, layer: int, write_slots: torch.Tensor, gather: torch.Tensor) -> None:
        super().__init__()
        self._pool = data[layer]                 # [2, H, N, D]
        self._write = write_slots                # [n]
        self._gather = gather                    # [n, W]
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states [n, H, 1, D] -> the pool's [H, n, D] at each row's slot
        self._pool[0].index_copy_(1, self._write, key_states[:, :, 0].transpose(0, 1))
        self._pool[1].index_copy_(1, self._write, value_states[:, :, 0].transpose(0, 1))
        keys = self._pool[0][:, self._gather].transpose(0, 1)         # [n, H, W, D]
        values = self._pool[1][:, self._gather].transpose(0, 1)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._gather.shape[1], 0

    def get_seq_length(self) -> int:
        return self._gather.shape[1]

    def get_max_length(self) -> int:
        return self._pool.shape[2]


class PagedCache(Cache):
    """A transformers `Cache` for one decode step over a paged pool (the eager path)."""

    def __init__(self, data: torch.Tensor, write_slots: torch.Tensor, gather: torch.Tensor) -> None:
        super().__init__(layers=[_PagedLayer(data, i, write_slots, gather) for i in range(data.shape[0])])


__all__ = ["OutOfPages", "PagedCache", "PagedKV"]
