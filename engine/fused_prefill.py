"""Prefill straight into pages: the fused decoder's kernels over newcomers' prompts packed end to end.

The HF prefill (ModelRunner.prefill) left-pads a group of prompts to the longest, passes an
explicit 4-D mask (so SDPA cannot use its flash kernel), writes the K/V to a temporary
[L, 2, m, H, P, D] tensor, and the engine then copies each row's K/V into pages. Here instead:
  - the prompts' tokens are one packed sequence [T] (no padding), each with its own positions;
  - every layer runs the fused decoder's GEMMs and point-wise kernels (engine/fused_decode.py) over
    the T tokens, writes each token's K and V to its slot in the row's freshly allocated pages,
    and attends causally within its own prompt with variable-length flash attention
    (torch.nn.attention.varlen, CUDA), or with SDPA's causal kernel per prompt (elsewhere);
  - only each prompt's last token goes through the LM head.
A chunk of one prompt (chunked prefill, or the rest after a cached prefix) runs in the same
forward: its tokens follow the whole prompts' in the packed sequence, its K/V go to the request's
partial K/V, and it attends every column before it and causally among its own (SDPA with a
lower-right causal bias). So a step's prefill work (whole prompts, chunks, the rest of prompts
with cached prefixes) is one forward, whose host time (~18 ms for 512 tokens of a 7B on an H200,
note 25) is paid once a step instead of once per prompt or chunk.
The same arithmetic as the HF forward on the same weights, so in fp32 the first tokens and K/V
equal the HF prefill's up to rounding (tests/test_fused_prefill.py); in bf16 kernels round as
the fused decode step does (tests/test_gpu.py compares against the eager path).
"""
from __future__ import annotations

import bisect
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import PREFILL_GRAPH_TOKENS_PER_GPU
from engine.cuda_graphs import buckets, capture, capturing
from engine.fused_decode import FusedDecoder
from engine.kv_paged import PagedKV


# A chunk's attention may use any SDPA kernel but cuDNN's. cuDNN builds an execution plan for each
# new set of shapes *and strides*, and a chunk's keys are a slice of its request's partial K/V
# (stride = the prompt's length), so a first chunk (square causal, where SDPA picked cuDNN on the
# H200) would pay a plan per prompt. Flash and memory-efficient attention have no per-shape set-up.
# Suspected of note 25's slow first chunked runs; on the H200 the change was lost in the run-to-run
# spread of the chunks' host time (docs/benchmarks.md note 26), and it is kept for the principle.
CHUNK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _varlen():
    """-> (varlen_attn, the keyword arguments that make it causal), or None where this torch or
    device has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}
    return None


class PackedAttend:
    """One prefill forward's attention: K/V of the packed tokens to their slots, then causal
    attention within each prompt (cu = prompt boundaries [m + 1], int32 on the device)."""

    def __init__(self, data: torch.Tensor, slots: torch.Tensor, cu: torch.Tensor, bounds: list[int],
                 scale: float, varlen, longest: int | None = None) -> None:
        self.data, self.slots, self.cu, self.bounds, self.scale, self.varlen = data, slots, cu, bounds, scale, varlen
        self.longest = longest or max(b - a for a, b in zip(bounds, bounds[1:]))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.data[layer]                                             # [2, H, N, D]
        k, v, q = k[:, :, 0], v[:, :, 0].contiguous(), q[:, :, 0]           # [T, h, d]
        pool[0].index_copy_(1, self.slots, k.transpose(0, 1))
        pool[1].index_copy_(1, self.slots, v.transpose(0, 1))
        T, hq, d = q.shape
        hkv = k.shape[1]
        if self.varlen is not None:
            fn, causal = self.varlen
            if hkv != hq:
                k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
            out = fn(q, k, v, self.cu, self.cu, self.longest, self.longest, scale=self.scale, **causal)
            return out.reshape(T, hq * d)
        out = torch.empty_like(q)
        for a, b in zip(self.bounds, self.bounds[1:]):   # one causal SDPA per prompt ([1, h, n, d])
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                is_causal=True, scale=self.scale, enable_gqa=hkv != hq)[0].transpose(0, 1)
        return out.reshape(T, hq * d)


class ChunkAttend:
    """A chunk's attention: K/V of prompt tokens [start, end) to the partial K/V [L, 2, 1, H, P, D]
    (ModelRunner.new_partial_kv), then the chunk's queries attend columns [0, end), causally
    aligned to the end (query j sees columns up to start + j)."""

    def __init__(self, partial: torch.Tensor, start: int, end: int, scale: float) -> None:
        from torch.nn.attention.bias import causal_lower_right
        self.partial, self.start, self.end, self.scale = partial, start, end, scale
        self.bias = causal_lower_right(end - start, end)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.partial[layer, :, 0]                                      # [2, H, P, D]
        kv[0, :, self.start:self.end] = k[:, :, 0].transpose(0, 1)          # [H, c, D]
        kv[1, :, self.start:self.end] = v[:, :, 0].transpose(0, 1)
        c, hq, _, d = q.shape
        keys, values = kv[0, None, :, :self.end], kv[1, None, :, :self.end]   # [1, H, end, D]
        if keys.shape[1] != hq:   # grouped-query attention: the fast kernels want as many K/V heads
            keys = keys.repeat_interleave(hq // keys.shape[1], dim=1)
            values = values.repeat_interleave(hq // values.shape[1], dim=1)
        with sdpa_kernel(CHUNK_BACKENDS):
            out = F.scaled_dot_product_attention(q[:, :, 0].transpose(0, 1)[None], keys, values,
                                                 attn_mask=self.bias, scale=self.scale)   # [1, hq, c, d]
        return out[0].transpose(0, 1).reshape(c, hq * d)


class MixedAttend:
    """One forward's attention over whole prompts (tokens [0, whole), `PackedAttend`) followed by
    chunks (each `ChunkAttend` over its own token range)."""

    def __init__(self, whole: PackedAttend | None, chunks: list[tuple[int, int, ChunkAttend]]) -> None:
        self.whole, self.chunks = whole, chunks     # chunks: (first token, last token + 1, attend)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.whole is not None:   # the whole prompts' tokens end where the first chunk's begin
            end = self.chunks[0][0]
            parts.append(self.whole(layer, q[:end], k[:end], v[:end]))
        for a, b, attend in self.chunks:
            parts.append(attend(layer, q[a:b], k[a:b], v[a:b]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class FusedPrefill:
    def __init__(self, fused: FusedDecoder, kv: PagedKV, graphs: bool = False, max_tokens: int = 8192,
                 chunk_graphs: bool = True, graph_tokens: int = PREFILL_GRAPH_TOKENS_PER_GPU) -> None:
        """`graphs`: whole-prompt forwards of up to min(`max_tokens`, `graph_tokens`) tokens replay
        a CUDA graph per token bucket (`StaticPrefill`; capture with `capture_all`), and so do
        chunks with `chunk_graphs` (`StaticChunk`). Needs varlen attention."""
        self.fused, self.kv = fused, kv
        self.device = kv.data.device
        self.varlen = _varlen() if self.device.type == "cuda" and kv.data.dtype in (torch.float16, torch.bfloat16) \
            else None
        top = min(max_tokens, graph_tokens)
        self.static = StaticPrefill(self, top, graphs=True) if graphs and self.varlen is not None else None
        self.chunk_static = StaticChunk(self, top, graphs=True) if self.static is not None and chunk_graphs \
            else None

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], row_ids: list[str],
                chunks: list[tuple[torch.Tensor, list[int], int]] = ()) -> torch.Tensor:
        """Add a row per prompt (row_ids[i] holds prompts[i]'s K/V in its own pages) and prefill
        each chunk (partial K/V from ModelRunner.new_partial_kv, its token ids, the position of
        the first) into its partial K/V, all in one forward. -> logits [m + len(chunks), V]: each
        prompt's last token, then each chunk's. Raises OutOfPages with nothing changed."""
        kv = self.kv
        slots: list[torch.Tensor] = []
        try:
            for row_id, p in zip(row_ids, prompts):
                slots.append(kv.add_empty_row(row_id, len(p)))
        except BaseException:
            for row_id in reversed(row_ids[:len(slots)]):
                kv.remove_row(row_id)
            raise
        bounds = [0]
        for p in prompts:
            bounds.append(bounds[-1] + len(p))
        graphed = {}   # chunks that replay the chunk graph (their partial K/V is its workspace)
        if self.chunk_static is not None:
            for j, (partial, chunk_ids, start) in enumerate(chunks):
                if self.chunk_static.holds(partial) and (bucket := self.chunk_static.bucket(len(chunk_ids))):
                    graphed[j] = bucket
        eager = [c for j, c in enumerate(chunks) if j not in graphed]
        out = self._forward(prompts, slots, bounds, eager) if prompts or eager else None
        if not graphed:
            return out
        # the graphed chunks' logits, in their places among the eager forward's (whole prompts, then chunks)
        parts, taken = [out[:len(prompts)]] if out is not None else [], len(prompts)
        for j, (partial, chunk_ids, start) in enumerate(chunks):
            if j in graphed:
                parts.append(self.chunk_static.run(graphed[j], chunk_ids, start))
            else:
                parts.append(out[taken:taken + 1])
                taken += 1
        return torch.cat(parts)

    def _forward(self, prompts: list[list[int]], slots: list[torch.Tensor], bounds: list[int],
                 chunks: list[tuple[torch.Tensor, list[int], int]]) -> torch.Tensor:
        """The whole prompts (their K/V slots `slots`, packed at `bounds`) and the chunks through
        one forward: a prefill graph's where one fits, else eagerly. -> logits [m + len(chunks), V]."""
        ids = [t for p in prompts for t in p]
        positions = [torch.arange(len(p)) for p in prompts]
        last = [b - 1 for b in bounds[1:]]
        if not chunks and self.static is not None and (bucket := self.static.bucket(len(ids), len(prompts))):
            return self.static.run(bucket, ids, torch.cat(positions), torch.cat(slots), bounds)
        kv = self.kv
        dev = self.device
        # non_blocking: a blocking host-to-device copy waits for the stream, and the decode step
        # launched before this forward is still running on it (LLMEngine.step_phases)
        cu = torch.tensor(bounds, dtype=torch.int32).to(dev, non_blocking=True)
        whole = PackedAttend(kv.data, torch.cat(slots), cu, bounds, self.fused.scaling, self.varlen) if prompts else None
        chunk_attends = []
        for partial, chunk_ids, start in chunks:
            a = len(ids)
            ids.extend(chunk_ids)
            positions.append(torch.arange(start, start + len(chunk_ids)))
            last.append(len(ids) - 1)
            chunk_attends.append((a, len(ids), ChunkAttend(partial, start, start + len(chunk_ids), self.fused.scaling)))
        attend = MixedAttend(whole, chunk_attends) if chunk_attends else whole
        return self.fused(torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)[:, None],
                          torch.cat(positions).to(dev, non_blocking=True)[:, None],
                          attend, keep=torch.tensor(last).to(dev, non_blocking=True))

    def prefill_chunk(self, partial: torch.Tensor, ids: list[int], start: int) -> torch.Tensor:
        """Prompt tokens [start, start + len(ids)) of one request into its partial K/V, as
        ModelRunner.prefill_chunk does on the HF forward. -> logits [1, V] of the chunk's last token."""
        return self.prefill([], [], [(partial, ids, start)])


# Token buckets of the whole-prompt prefill graphs: a forward of T tokens replays the graph of the
# smallest bucket >= T, its tokens padded; a forward of more than the last bucket runs eagerly.
# Measured on an H200, 7B (benchmarks/probe_prefill.py, note 27): the eager forward costs ~40 ms of
# host time whatever its size, and its GPU time passes that at ~1,500 tokens; a graph costs the
# padded bucket's GPU time (~27 ms at 1,024 tokens, 56 ms at 2,048). So graphs pay up to ~1,280
# tokens, in fine steps (padding costs GPU time one for one), and past that the eager forward's
# host time hides under its GPU time while a graph's padding would only add (powers of 2 up to
# 8,192 lost 20-70 ms a forward there, which is why note 26's graphs hardly moved W4).
# Past 1,280 (graphed only under TP): steps of 128 to 1,792, then of at most a quarter. A padded
# token costs its GPU time in every replay, a bucket one capture at start-up.
PREFILL_BUCKETS = (64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1408, 1536, 1664, 1792, 2048, 2304, 2560,
                   3072, 3584, 4096, 5120)
PREFILL_GRAPH_PROMPTS = 64   # prompts one graphed forward takes (more: the eager forward)


class _BucketGraphs:
    """A forward per token bucket over static buffers, captured once as a CUDA graph and replayed
    (or, without `use_graphs`, run eagerly): what StaticPrefill and StaticChunk share. Each
    defines `_forward(T)` and `_rest()`, the buffers' resting state for the captures."""
    buckets: list[int]
    use_graphs: bool
    pool: object
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]

    def _forward(self, T: int) -> torch.Tensor:
        raise NotImplementedError

    def _rest(self) -> None:
        raise NotImplementedError

    def _graph(self, T: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if T not in self.graphs:
            self.graphs[T] = capture(lambda: self._forward(T), self.pool)
        return self.graphs[T]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket now, largest first (the pool is sized once), from the resting state."""
        self._rest()
        with capturing():
            for T in reversed(self.buckets):
                self._graph(T)
        return len(self.graphs)

    def _replay(self, T: int) -> torch.Tensor:
        """Bucket T's forward over the buffers as they are now: its graph's output (a static
        tensor the next replay rewrites), or an eager forward's."""
        if not self.use_graphs:
            return self._forward(T)
        graph, out = self._graph(T)
        graph.replay()
        return out


class StaticPrefill(_BucketGraphs):
    """The packed whole-prompt prefill over static buffers, one shape per token bucket, so each
    bucket's forward can be captured once as a CUDA graph and replayed: the eager forward's host
    time (~1,300 kernel launches and two compiled-region calls a layer: 20-40 ms for a 7B on an
    H200, more than its GPU time for a few hundred tokens, note 26) becomes one graph launch.

    Static buffers: token ids, positions and K/V slots [T], prompt boundaries cu
    [PREFILL_GRAPH_PROMPTS + 2] and the last token of each prompt, keep [PREFILL_GRAPH_PROMPTS].
    Padding: tokens past the prompts form one more segment (ids 0, positions 0, their K/V to the
    pool's scratch slot, never a live one), whose outputs nobody reads; cu repeats T after it
    (empty segments); keep's unused entries point at token 0. Variable-length attention runs with
    the bucket as its longest sequence, so the same launch serves any prompts that fit.
    Without `graphs` the same padded forward runs eagerly (the CPU tests check it against the
    unpadded one)."""

    def __init__(self, packed: FusedPrefill, max_tokens: int, graphs: bool,
                 steps: tuple[int, ...] = PREFILL_BUCKETS) -> None:
        self.packed, self.kv, self.fused = packed, packed.kv, packed.fused
        dev = packed.device
        self.buckets = buckets(min(max_tokens, steps[-1]), steps)
        top, prompts = self.buckets[-1], PREFILL_GRAPH_PROMPTS
        self.ids = torch.zeros(top, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, 1, dtype=torch.long, device=dev)
        self.slots = torch.full((top,), self.kv.scratch_slot, dtype=torch.long, device=dev)
        self.cu = torch.zeros(prompts + 2, dtype=torch.int32, device=dev)
        self.keep = torch.zeros(prompts, dtype=torch.long, device=dev)
        self.bounds: list[int] = [0]   # the host copy of cu for the eager fallback (no varlen)
        self.use_graphs = graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs else None   # not the decode graphs' pool:
        # with decode_before_prefill the decode step's logits are still unread when this replays
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, tokens: int, prompts: int) -> int | None:
        """The bucket a forward of `tokens` tokens in `prompts` prompts replays, or None (eager)."""
        if prompts > PREFILL_GRAPH_PROMPTS or tokens > self.buckets[-1]:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, tokens)]

    def _forward(self, T: int) -> torch.Tensor:
        attend = PackedAttend(self.kv.data, self.slots[:T], self.cu, self.bounds, self.fused.scaling,
                              self.packed.varlen, longest=T)
        return self.fused(self.ids[:T], self.positions[:T], attend, keep=self.keep)   # [prompts, V]

    def _rest(self) -> None:
        """Every token a padding token, every prompt empty: the captures write only the scratch slot."""
        self.slots.fill_(self.kv.scratch_slot)
        self.cu.zero_()

    def run(self, T: int, ids: list[int], positions: torch.Tensor, slots: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        """The prompts (packed: ids, positions, K/V slots; prompt i is tokens [bounds[i],
        bounds[i + 1])) through bucket T. -> logits [m, V] of each prompt's last token (a view of
        the graph's output: read it before the next prefill)."""
        n, m = len(ids), len(bounds) - 1
        host = torch.zeros(2, T, dtype=torch.long)
        host[0, :n] = torch.tensor(ids, dtype=torch.long)
        host[1, :n] = positions
        cu = bounds + [T] * (self.cu.shape[0] - m - 1)
        meta = torch.tensor(cu + [b - 1 for b in bounds[1:]] + [0] * (self.keep.shape[0] - m), dtype=torch.long)
        if self.packed.device.type == "cuda":
            host, meta = host.pin_memory(), meta.pin_memory()
        host, meta = host.to(self.packed.device, non_blocking=True), meta.to(self.packed.device, non_blocking=True)
        self.ids[:T, 0].copy_(host[0])
        self.positions[:T, 0].copy_(host[1])
        self.slots[:n].copy_(slots)
        self.slots[n:T].fill_(self.kv.scratch_slot)
        self.cu.copy_(meta[:self.cu.shape[0]])
        self.keep.copy_(meta[self.cu.shape[0]:])
        self.bounds = bounds + ([T] if n < T else [])
        return self._replay(T)[:m]


class StaticChunk(_BucketGraphs):
    """One prompt's chunk through a CUDA graph per token bucket (PREFILL_BUCKETS), so a long
    prompt in chunks pays a graph launch a chunk instead of the eager forward's ~40 ms of host time
    (note 28: with eager chunks no step's prefill could stay under ~40 ms, so the stream's ITL p99
    was bound to it).

    Its partial K/V is a static workspace [L, 2, C, H, D] (token-major, so variable-length
    attention reads a layer's keys in place), C = the context plus the largest bucket (a padded
    chunk's last tokens are written past the prompt's end). One prompt at a time holds it
    (`acquire` / `release`, through ModelRunner.new_partial_kv / release_partial); the partial K/V
    the engine handles is a view [L, 2, 1, H, P, D] of it, so every other path (the eager chunk,
    the prefix cache's load and insert, embedding the finished prompt into pages) is unchanged.
    Static buffers: token ids and positions [T] (a chunk of c tokens at `start`: positions start +
    j, the padding continuing past the chunk with ids 0), each token's K/V to workspace column =
    its position, key bounds cu_k [2] = [0, start + T], keep [1] = c - 1. The chunk's T queries
    attend keys [0, start + T) causally aligned to the end (query j sees columns <= start + j), so
    the real queries never see the padding's K/V, which later chunks overwrite and nobody else
    reads. Without varlen attention (CPU tests, `graphs` False) the same padded forward runs
    eagerly with SDPA over the host's copy of the bounds."""

    def __init__(self, packed: FusedPrefill, max_tokens: int, graphs: bool,
                 steps: tuple[int, ...] = PREFILL_BUCKETS) -> None:
        self.packed, self.fused = packed, packed.fused
        kv, dev = packed.kv, packed.device
        self.buckets = buckets(min(max_tokens, steps[-1]), steps)
        top = self.buckets[-1]
        L, H, D = kv.dims
        self.max_prompt = kv.max_len
        self.workspace = torch.zeros(L, 2, self.max_prompt + top, H, D, dtype=kv.data.dtype, device=dev)
        self.ids = torch.zeros(top, 1, dtype=torch.long, device=dev)
        self.positions = torch.arange(top, dtype=torch.long, device=dev)[:, None]
        self.cu_k = torch.tensor([0, top], dtype=torch.int32, device=dev)
        self.keep = torch.zeros(1, dtype=torch.long, device=dev)
        self.end = top                     # the host's copy of cu_k[1] (the eager SDPA fallback)
        self.held = False
        self.use_graphs = graphs
        self.pool = packed.static.pool if graphs else None   # the whole-prompt graphs' pool (never replayed at once)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._cu_q = {}                    # bucket -> [0, T] int32 (constant)

    # ---- the workspace --------------------------------------------------------------------
    def acquire(self, prompt_len: int) -> torch.Tensor | None:
        """The workspace as a prompt's partial K/V [L, 2, 1, H, P, D] (P = prompt_len rounded up
        to 16, as ModelRunner.new_partial_kv), or None while another prompt holds it or the prompt
        is longer than the context it was sized for."""
        if self.held or prompt_len > self.max_prompt:
            return None
        self.held = True
        P = min(-(-prompt_len // 16) * 16, self.workspace.shape[2])
        return self.workspace.permute(0, 1, 3, 2, 4)[:, :, None, :, :P]

    def holds(self, partial: torch.Tensor) -> bool:
        return self.held and partial.data_ptr() == self.workspace.data_ptr()

    def release(self, partial: torch.Tensor) -> None:
        if self.holds(partial):
            self.held = False

    # ---- the forward ----------------------------------------------------------------------
    def bucket(self, tokens: int) -> int | None:
        if tokens > self.buckets[-1]:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, tokens)]

    def _attend(self, T: int):
        ws, cu_k, scale, varlen = self.workspace, self.cu_k, self.fused.scaling, self.packed.varlen
        cols = self.positions[:T, 0]
        if T not in self._cu_q:
            self._cu_q[T] = torch.tensor([0, T], dtype=torch.int32, device=ws.device)
        cu_q = self._cu_q[T]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = ws[layer, 0], ws[layer, 1]                       # [C, H, D]
            keys.index_copy_(0, cols, k[:, :, 0])
            values.index_copy_(0, cols, v[:, :, 0])
            q = q[:, :, 0]                                                  # [T, hq, d]
            hq, hkv, d = q.shape[1], keys.shape[1], q.shape[2]
            if hkv != hq:
                keys, values = keys.repeat_interleave(hq // hkv, dim=1), values.repeat_interleave(hq // hkv, dim=1)
            if varlen is not None:
                fn, causal = varlen
                out = fn(q, keys, values, cu_q, cu_k, T, keys.shape[0], scale=scale, **causal)
                return out.reshape(T, hq * d)
            from torch.nn.attention.bias import causal_lower_right
            end = self.end
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys[:end].transpose(0, 1)[None], values[:end].transpose(0, 1)[None],
                attn_mask=causal_lower_right(T, end), scale=scale)          # [1, hq, T, d]
            return out[0].transpose(0, 1).reshape(T, hq * d)

        return attend

    def _forward(self, T: int) -> torch.Tensor:
        return self.fused(self.ids[:T], self.positions[:T], self._attend(T), keep=self.keep)   # [1, V]

    def _rest(self) -> None:
        """A chunk at 0 (nobody holds the workspace while the engine starts)."""
        top = self.buckets[-1]
        self.positions.copy_(torch.arange(top, device=self.positions.device)[:, None])
        self.cu_k.copy_(torch.tensor([0, top], dtype=torch.int32))

    def run(self, T: int, ids: list[int], start: int) -> torch.Tensor:
        """Prompt tokens [start, start + len(ids)) of the prompt holding the workspace through
        bucket T. -> logits [1, V] of the chunk's last token (a copy)."""
        c = len(ids)
        host = torch.zeros(2 * T + 3, dtype=torch.long)
        host[:c] = torch.tensor(ids, dtype=torch.long)
        host[T:2 * T] = torch.arange(start, start + T)
        host[2 * T:] = torch.tensor([0, start + T, c - 1])
        if self.packed.device.type == "cuda":
            host = host.pin_memory()
        host = host.to(self.packed.device, non_blocking=True)
        self.ids[:T, 0].copy_(host[:T])
        self.positions[:T, 0].copy_(host[T:2 * T])
        self.cu_k.copy_(host[2 * T:2 * T + 2])
        self.keep.copy_(host[2 * T + 2:])
        self.end = start + T
        return self._replay(T).clone()
