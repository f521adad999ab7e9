"""Decode steps captured once per (row bucket, width bucket) as CUDA graphs and replayed.

An eager HF decode step is bound by host-side launch overhead (~80 ms for a 7B model whatever the
batch). The slab makes the step's shapes depend only on (rows, attended width), so we pad rows up
to a bucket and attend columns [0, width bucket) and capture the forward once per pair. Everything
that changes per step lives in static device buffers read inside the graph:
  ids [S, 1]     each row's input token
  lens [S]       each row's K/V length (its position id; rows past n have 0 and only see themselves)
  write [1]      the shared write column w
The mask is computed inside the graph from lens and write, so a replay needs three small copies.
Padding rows write garbage into slots no live row uses; a slot is fully rewritten when a row is
embedded into it, and stale columns are always masked.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
from typing import Callable, Iterator

import torch

from engine.kv_slab import KVSlab, row_mask


def buckets(limit: int, steps: tuple[int, ...]) -> list[int]:
    """The steps below `limit`, then `limit` itself: the shapes graphs are captured for."""
    return sorted({b for b in steps if b < limit} | {limit})


def capture(forward: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `forward` once on a side stream (compiles, warms kernels and the allocator outside the
    capture), then capture it into a CUDA graph whose memory comes from `pool`. -> (the graph,
    its output: a static tensor each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """Around a series of captures: the cyclic GC off (a collection inside a capture can free
    another graph's private memory pool, which invalidates the capture), then a device sync."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
    torch.cuda.synchronize()


class GraphDecoder:
    def __init__(self, forward, slab: KVSlab, max_padding: int = 64) -> None:
        self.forward = forward      # ModelRunner.forward_decode
        self.slab = slab
        self.max_padding = max_padding
        S, T = slab.num_slots, slab.max_len
        dev = slab.data.device
        self.row_buckets = buckets(S, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256))
        self.width_buckets = buckets(T, (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192))
        self.ids = torch.zeros(S, 1, dtype=torch.long, device=dev)
        self.lens = torch.zeros(S, dtype=torch.long, device=dev)
        self.write = torch.zeros(1, dtype=torch.long, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        lens = self.lens[:rows]
        cols = torch.arange(width, device=self.lens.device)
        return self.forward(self.ids[:rows], lens[:, None], row_mask(cols, self.write, lens),
                            rows, 0, width, self.write)                               # [B, V]

    def _graph(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, width)
        if key not in self.graphs:
            self.graphs[key] = capture(lambda: self._forward(rows, width), self.pool)
        return self.graphs[key]

    def capture_all(self) -> int:
        """Capture every (rows, width) graph now (largest first, so the shared pool is sized once),
        so that no request pays for a capture. Returns the number of graphs."""
        self.slab.write_col = 0
        with capturing():
            for rows in reversed(self.row_buckets):
                for width in reversed(self.width_buckets):
                    self.write.fill_(min(width - 1, self.slab.max_len - 1))
                    self._graph(rows, width)
        return len(self.graphs)

    def bucket(self, n: int, width_needed: int) -> tuple[int, int]:
        rows = self.row_buckets[bisect.bisect_left(self.row_buckets, n)]
        width = self.width_buckets[bisect.bisect_left(self.width_buckets, width_needed)]
        return rows, width

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [n] on the device (row order of the slab) -> logits [n, V]."""
        slab = self.slab
        n = slab.num_rows
        slab.prepare_decode(max_padding=self.max_padding)
        rows, width = self.bucket(n, slab.write_col + 1)
        self.ids[:n, 0].copy_(input_ids)
        lens = torch.tensor(slab.lengths + [0] * (rows - n), dtype=torch.long)
        self.lens[:rows].copy_(lens, non_blocking=True)
        self.write.fill_(slab.write_col)
        graph, logits = self._graph(rows, width)
        graph.replay()
        slab.advance()
        return logits[:n]
