"""The fused decode step over paged K/V: rows padded to a bucket, attention over each row's own
pages only (FlexAttention), optionally captured once per row bucket as a CUDA graph.

Everything a step changes lives in one static buffer read inside the step (so a captured graph
stays valid): per row its input token, position, attended length, write slot, where its logits go
back to, and its page table (see `ID`..`TABLE`); the step itself derives the attention's tables
from it (engine/paged_attention.py). Padding rows (past the live ones, up to the bucket) have
length 0, attend nothing and write to the pool's scratch page, never a live slot.
Unlike the slab's graphs, the shapes do not depend on the context: one graph per row bucket.
"""
from __future__ import annotations

import bisect

import torch

from engine.cuda_graphs import buckets, capture, capturing
from engine.fused_decode import FusedDecoder, PagedAttend
from engine.kv_paged import PagedKV
from engine.paged_attention import PagedDecodeAttention

# Coarse: a decode step reads every weight once whatever its rows, and a padding row attends
# nothing, so padding up to 2x rows costs little, while each bucket is one FlexAttention compile.
ROW_BUCKETS = (8, 32, 64, 128, 256, 512)

# Columns of the step's inputs, one row per row of the bucket in the order the step runs them:
# input token, position (K/V length before the step), tokens attended (position + 1; 0 for
# padding), write slot, where the row's logits go back to (the inverse of the run order), then
# the row's page table.
ID, POS, LEN, WRITE, INV, TABLE = range(6)


def decode_kernel_options(split_kv: int, num_stages: int, kv_block: int, page_size: int) -> dict | None:
    """flex's decode-kernel settings from EngineConfig's (0: flex's own choice). A program's K/V
    block (BLOCK_N) must divide the mask's block, a page: a block that does not is left to flex."""
    options = {"SPLIT_KV": split_kv, "num_stages": num_stages,
               "BLOCK_N": kv_block if kv_block and page_size % kv_block == 0 else 0}
    return {k: v for k, v in options.items() if v} or None


class PagedDecoder:
    def __init__(self, fused: FusedDecoder, kv: PagedKV, device: torch.device, graphs: bool, compile: bool,
                 split_kv: int = 0, sort_rows: bool = True, num_stages: int = 0, kv_block: int = 0) -> None:
        self.fused, self.kv, self.device = fused, kv, device
        self.sort_rows = sort_rows   # run each step's rows longest first (see decode)
        S, P = kv.max_rows, kv.max_pages_per_row
        self.row_buckets = buckets(S, ROW_BUCKETS)
        self.attention = PagedDecodeAttention(
            fused.num_heads, fused.num_kv_heads, fused.head_dim, kv.page_size, max_rows=S,
            max_pages_per_row=P, device=device, compile=compile, num_pages=kv.num_pages + 1,
            kernel_options=decode_kernel_options(split_kv, num_stages, kv_block, kv.page_size))
        # The step's inputs (columns above), read inside the step; a padding row (past the live
        # ones, up to the bucket) attends nothing and writes to the pool's scratch slot.
        self.padding = torch.zeros(S, TABLE + P, dtype=torch.long)
        self.padding[:, WRITE] = kv.scratch_slot
        self.padding[:, INV] = torch.arange(S)
        self.inputs = self.padding.to(device, copy=True)   # never the template itself (CPU: .to is a no-op)
        on_cuda = device.type == "cuda"
        # Staged on the host (pinned) and sent in one copy; the event says the copy has left it.
        self.staged = self.padding.pin_memory() if on_cuda else None
        self.copied = torch.cuda.Event() if on_cuda else None
        self.use_graphs = graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, rows: int) -> torch.Tensor:
        """The whole step from the inputs buffer: the attention's tables, the forward, the logits
        back in the rows' own order. Captured whole, so a step is one copy and one replay."""
        x = self.inputs[:rows]
        self.attention.update(x[:, TABLE:], x[:, LEN], rows)
        attend = PagedAttend(self.kv.data, x[:, WRITE], self.attention, rows, self.fused.scaling)
        logits = self.fused(x[:, ID:ID + 1], x[:, POS:POS + 1], attend)                  # [rows, V]
        return logits.index_select(0, x[:, INV])

    def _graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if rows not in self.graphs:
            self.graphs[rows] = capture(lambda: self._forward(rows), self.pool)
        return self.graphs[rows]

    @torch.inference_mode()   # as every decode runs: no autograd (FlexAttention's backward needs more tables)
    def capture_all(self) -> int:
        """Capture every row bucket now (largest first, so the shared pool is sized once); the
        inputs are all padding meanwhile."""
        with capturing():
            for rows in reversed(self.row_buckets):
                self._graph(rows)
        return len(self.graphs)

    @torch.inference_mode()
    def decode(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """One step for every live row; row r's input is input_ids[r], a host list or [n] long
        on the device (the last step's sampled ids, not yet read by the host: the step takes them
        on the device after its inputs' copy). -> logits [n, V].

        The host builds the step's inputs (a few small CPU ops), sends them in one copy and
        replays the bucket's graph, which refreshes the attention's tables itself: the GPU idles
        only for that (note 28: ~45 small launches outside the graph had cost ~1.1 ms a step).

        With `sort_rows` the step runs its rows longest first (the inputs permuted on the way in,
        the logits back on the way out; rows are independent in a decode step). FlexAttention's
        decode kernel runs one program per (row, kv head) that walks the row's whole K/V,
        launched in row order: a long row that starts late sets the layer's time while the other
        SMs idle. Longest first is the classic greedy schedule for that (longest processing time
        first), note 27."""
        kv = self.kv
        n = kv.num_rows
        write = kv.prepare_decode()                                                     # [n], host
        rows = self.row_buckets[bisect.bisect_left(self.row_buckets, n)]
        lengths = torch.tensor(kv.lengths, dtype=torch.long)                             # [n]
        order = torch.argsort(lengths, descending=True, stable=True) if self.sort_rows else torch.arange(n)
        if self.copied is not None:
            self.copied.synchronize()            # the last step's copy has left the staging buffer
        x = (self.staged if self.staged is not None else self.inputs)[:rows]
        on_device = isinstance(input_ids, torch.Tensor)
        if not on_device:   # else the ids go in on the device, after the copy
            x[:n, ID] = torch.tensor(input_ids, dtype=torch.long)[order]
        x[:n, POS] = lengths[order]
        x[:n, LEN] = x[:n, POS] + 1
        x[:n, WRITE] = write[order]
        x[:n, INV].index_copy_(0, order, torch.arange(n))
        x[:n, TABLE:] = kv.page_table(n)[order]
        x[n:] = self.padding[n:rows]
        if self.staged is not None:
            self.inputs[:rows].copy_(x, non_blocking=True)
            self.copied.record()
        if on_device:   # row r runs at position INV[r]
            self.inputs[:n, ID].index_copy_(0, self.inputs[:n, INV], input_ids)
        if self.use_graphs:
            graph, logits = self._graph(rows)
            graph.replay()
        else:
            logits = self._forward(rows)
        kv.advance()
        return logits[:n]
