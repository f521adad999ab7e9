"""The batch's K/V: one preallocated slab, rows as slots, one shared write column.

Layout: `data` is [L, 2, S, H, T, D] (layers, K/V, slots, kv heads, columns, head dim).
Rows 0..n-1 are the live rows, in batch order. Every live row is right-aligned at the shared write
column `w`: row r holds its `lengths[r]` tokens in columns [w - lengths[r], w). This is Baton's
vector shaping: a row with fewer tokens is simply left-padded, and the attention mask (regenerated
every step from `lengths`) hides the padding. The next decode writes column w for every row at once.

- Embedding (a prefilled request, or K/V restored from host memory) is a copy into a free row.
- Removal is a swap with the last live row, so live rows stay contiguous (a plain view for the model).
- Padding common to all rows is trimmed for free: the model only sees columns [w - max(lengths), w].
- When the write column reaches the end, or a new row is longer than w, the window is moved
  (one copy of the live window); this is rare and amortised over many steps.

Shapes never depend on which requests are in the batch, only on (n, window width): the CUDA-graph
path captures per (row bucket, width bucket).
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVSlab:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int,
                 max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: masked columns still enter attn @ V with weight 0, and 0 * NaN = NaN.
        self.data = torch.zeros(num_layers, 2, num_slots, num_kv_heads, max_len, head_dim,
                                dtype=dtype, device=device)  # [L, 2, S, H, T, D]
        self.max_len = max_len
        self.num_slots = num_slots
        self.write_col = 0
        self.num_relocations = 0   # times the live window was moved (a copy of the whole window)
        self.num_pages_used = self.num_pages_free = 0   # the slab has no pages (EngineStats reports 0)
        self.row_ids: list[str] = []
        self.lengths: list[int] = []

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    @property
    def bytes_per_token(self) -> int:
        L, two, _, H, _, D = self.data.shape
        return L * two * H * D * self.data.element_size()

    @property
    def dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim)."""
        L, _two, _S, H, _T, D = self.data.shape
        return L, H, D

    @property
    def total_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def used_bytes(self) -> int:
        return sum(self.lengths) * self.bytes_per_token

    def window_start(self) -> int:
        return self.write_col - max(self.lengths, default=0)

    # ---- membership ------------------------------------------------------------------------
    def add_row(self, row_id: str, kv: torch.Tensor) -> None:
        """Embed a row's K/V ([L, 2, H, n, D], on any device) right-aligned at the write column."""
        if self.num_rows >= self.num_slots:
            raise RuntimeError("K/V slab has no free slot")
        n = kv.shape[3]
        self._make_room(need_left=n)
        slot = self.num_rows
        self.data[:, :, slot, :, self.write_col - n:self.write_col].copy_(kv, non_blocking=True)
        self.row_ids.append(row_id)
        self.lengths.append(n)

    def row_kv(self, row_id: str) -> torch.Tensor:
        """[L, 2, H, n, D] view of a row's K/V."""
        slot = self.row_ids.index(row_id)
        return self.data[:, :, slot, :, self.write_col - self.lengths[slot]:self.write_col]

    def take_row(self, row_id: str, allocate) -> torch.Tensor:
        """Copy a row's K/V out to host memory ([L, 2, H, n, D], from `allocate(shape, dtype)`)
        and remove the row."""
        slot = self.row_ids.index(row_id)
        n = self.lengths[slot]
        src = self.data[:, :, slot, :, self.write_col - n:self.write_col]
        host = allocate(src.shape, src.dtype)
        host.copy_(src, non_blocking=host.is_pinned())
        self.remove_row(row_id)
        return host

    def remove_row(self, row_id: str) -> None:
        slot = self.row_ids.index(row_id)
        last = self.num_rows - 1
        if slot != last:
            lo = self.window_start()
            self.data[:, :, slot, :, lo:self.write_col] = self.data[:, :, last, :, lo:self.write_col]
            self.row_ids[slot] = self.row_ids[last]
            self.lengths[slot] = self.lengths[last]
        self.row_ids.pop()
        self.lengths.pop()
        if not self.row_ids:
            self.write_col = 0

    def reserve(self, longest: int) -> None:
        """Before embedding several rows: move the window once so that a row of `longest` tokens
        fits left of the write column (otherwise each longer newcomer would move it again)."""
        self._make_room(need_left=longest)

    # ---- decode ----------------------------------------------------------------------------
    def prepare_decode(self, max_padding: int | None = None) -> tuple[int, int]:
        """Make room for one write column; return the window [lo, hi) the step attends to:
        from the first column any row uses, or, with `max_padding`, from column 0, moving the rows
        left once more than that many columns of common padding precede them (the CUDA path: its
        graphs attend from column 0, and so does its eager step, because attention kernels sum keys
        in blocks and a window starting elsewhere would round bf16 differently)."""
        self._make_room(need_left=0)
        if max_padding is None:
            return self.window_start(), self.write_col + 1
        if self.window_start() > max_padding:
            self._relocate(max(self.lengths, default=0))
        return 0, self.write_col + 1

    def advance(self) -> None:
        """After a decode step wrote column w for every live row."""
        self.write_col += 1
        self.lengths = [n + 1 for n in self.lengths]

    def decode_mask(self, lo: int, hi: int) -> torch.Tensor:
        """[n, 1, 1, hi - lo] bool: True where a row attends (its own tokens and the new column)."""
        device = self.data.device
        return row_mask(torch.arange(lo, hi, device=device), self.write_col,
                        torch.tensor(self.lengths, device=device))

    # ---- internals -------------------------------------------------------------------------
    def _make_room(self, need_left: int) -> None:
        """Move the live window so that w >= need_left and w + 1 <= max_len."""
        width = max(self.lengths, default=0)
        if max(width, need_left) + 1 > self.max_len:
            raise RuntimeError("row longer than the slab (context limit)")
        w = self.write_col
        if w >= need_left and w + 1 <= self.max_len:
            return
        self._relocate(max(width, need_left))

    def _relocate(self, new_w: int) -> None:
        """Move the live window so that it ends at column new_w (one layer at a time, so the
        temporary is 1/L of the window)."""
        width, w, n = max(self.lengths, default=0), self.write_col, self.num_rows
        if n and width and new_w != w:
            self.num_relocations += 1
            for i in range(self.data.shape[0]):
                layer = self.data[i]                                  # [2, S, H, T, D]
                window = layer[:, :n, :, w - width:w].clone()
                layer[:, :n, :, new_w - width:new_w] = window
        self.write_col = new_w


def row_mask(cols: torch.Tensor, write, lengths: torch.Tensor) -> torch.Tensor:
    """The regenerated attention mask of one decode step, [n, 1, 1, W] bool: row r attends column c
    iff c holds one of its `lengths[r]` tokens (right-aligned at `write`) or is the new column `write`.
    `write` may be an int or a device tensor (inside a CUDA graph)."""
    return ((cols[None, :] >= (write - lengths)[:, None]) & (cols[None, :] <= write))[:, None, None, :]


class _SlabLayer(CacheLayerMixin):
    """One layer's view of a slab: writes the new K/V at the write column, returns the window."""

    is_sliding = False

    def __init__(self, cache: "SlabCache", layer: int) -> None:
        super().__init__()
        # A weak reference: a strong one makes a cycle (cache -> layers -> cache) that only the
        # cyclic GC frees, which kept each prefill's multi-GB K/V alive for many steps.
        self._cache = weakref.proxy(cache)
        self._layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self._cache
        kv = c.data[self._layer]                         # [2, S, H, T, D]; key_states: [n, H, q, D]
        # index_copy_ with a device index: the write column can change between CUDA-graph replays.
        kv[0, :c.num_rows].index_copy_(2, c.write_index, key_states)
        kv[1, :c.num_rows].index_copy_(2, c.write_index, value_states)
        return kv[0, :c.num_rows, :, c.lo:c.hi], kv[1, :c.num_rows, :, c.lo:c.hi]  # [n, H, W, D]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.hi - self._cache.lo, 0

    def get_seq_length(self) -> int:
        return self._cache.hi - self._cache.lo

    def get_max_length(self) -> int:
        return self._cache.data.shape[4]


class SlabCache(Cache):
    """A transformers `Cache` over rows [0, n) of a slab: the q new columns go to `write_index`
    (a device tensor [q]), attention reads columns [lo, hi)."""

    def __init__(self, data: torch.Tensor, num_rows: int, lo: int, hi: int, write_index: torch.Tensor) -> None:
        self.data = data
        self.num_rows = num_rows
        self.lo = lo
        self.hi = hi
        self.write_index = write_index
        super().__init__(layers=[_SlabLayer(self, i) for i in range(data.shape[0])])
