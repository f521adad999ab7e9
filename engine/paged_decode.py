"""The fused decode step over paged K/V: rows padded to a bucket, attention over each row's own
pages only (FlexAttention), optionally captured once per row bucket as a CUDA graph.

Everything a step changes lives in static buffers read inside the step (so a captured graph stays
valid): ids [S, 1] and positions [S, 1] of each row, its write slot [S], and the attention's page
table and lengths (engine/paged_attention.py). Padding rows (past the live ones, up to the
bucket) have length 0, attend nothing and write to the pool's scratch page, never a live slot.
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


class PagedDecoder:
    def __init__(self, fused: FusedDecoder, kv: PagedKV, device: torch.device, graphs: bool, compile: bool,
                 split_kv: int = 0, sort_rows: bool = True) -> None:
        self.fused, self.kv, self.device = fused, kv, device
        self.sort_rows = sort_rows   # run each step's rows longest first (see decode)
        S = kv.max_rows
        self.row_buckets = buckets(S, ROW_BUCKETS)
        self.attention = PagedDecodeAttention(
            fused.num_heads, fused.num_kv_heads, fused.head_dim, kv.page_size, max_rows=S,
            max_pages_per_row=kv.max_pages_per_row, device=device, compile=compile, num_pages=kv.num_pages + 1,
            kernel_options={"SPLIT_KV": split_kv} if split_kv else None)
        self.ids = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.write = torch.full((S,), kv.scratch_slot, dtype=torch.long, device=device)
        self.use_graphs = graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, rows: int) -> torch.Tensor:
        attend = PagedAttend(self.kv.data, self.write[:rows], self.attention, rows, self.fused.scaling)
        return self.fused(self.ids[:rows], self.positions[:rows], attend)              # [rows, V]

    def _graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if rows not in self.graphs:
            self.graphs[rows] = capture(lambda: self._forward(rows), self.pool)
        return self.graphs[rows]

    @torch.inference_mode()   # as every decode runs: no autograd (FlexAttention's backward needs more tables)
    def capture_all(self) -> int:
        """Capture every row bucket now (largest first, so the shared pool is sized once)."""
        self.attention.update(self.kv.page_table(self.kv.max_rows), torch.zeros(self.kv.max_rows, dtype=torch.long,
                                                                                   device=self.device), self.kv.max_rows)
        with capturing():
            for rows in reversed(self.row_buckets):
                self._graph(rows)
        return len(self.graphs)

    @torch.inference_mode()
    def decode(self, input_ids: list[int]) -> torch.Tensor:
        """One step for every live row; row r's input is input_ids[r]. -> logits [n, V].

        With `sort_rows` the step runs its rows longest first (the inputs, write slots and page
        table permuted on the way in, the logits back on the way out; rows are independent in a
        decode step). FlexAttention's decode kernel runs one program per (row, kv head) that walks
        the row's whole K/V, launched in row order: a long row that starts late sets the layer's
        time while the other SMs idle. Longest first is the classic greedy schedule for that
        (longest processing time first), note 27."""
        kv = self.kv
        n = kv.num_rows
        write = kv.prepare_decode()                                                     # [n]
        rows = self.row_buckets[bisect.bisect_left(self.row_buckets, n)]
        pad = rows - n
        lengths = kv.lengths
        order = sorted(range(n), key=lambda r: -lengths[r]) if self.sort_rows else list(range(n))
        inverse = [0] * n
        for i, r in enumerate(order):
            inverse[r] = i
        host = torch.tensor([[input_ids[r] for r in order] + [0] * pad, [lengths[r] for r in order] + [0] * pad,
                             order + list(range(n, rows)), inverse + [0] * pad], dtype=torch.long)   # [4, rows]
        host = host.pin_memory() if self.device.type == "cuda" else host
        ids, positions, order_d, inverse_d = host.to(self.device, non_blocking=True)
        self.ids[:rows, 0].copy_(ids)
        self.positions[:rows, 0].copy_(positions)
        self.write[:n].copy_(write.index_select(0, order_d[:n]))
        self.write[n:rows].fill_(kv.scratch_slot)
        step_lengths = torch.where(torch.arange(rows, device=self.device) < n, positions + 1, 0)   # [rows]
        self.attention.update(kv.page_table(rows).index_select(0, order_d), step_lengths, rows)
        if self.use_graphs:
            graph, logits = self._graph(rows)
            graph.replay()
        else:
            logits = self._forward(rows)
        kv.advance()
        return logits[:n].index_select(0, inverse_d[:n])
