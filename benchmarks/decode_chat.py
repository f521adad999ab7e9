"""Decode step with chat-like row lengths, for one K/V layout, against the floor of the REAL K/V bytes.

Rows get lognormal lengths (median 600 tokens, sigma 0.8, capped at the context) of random K/V;
one engine of the layout runs decode steps of each batch of rows; the floor is (weights + sum of
row lengths x bytes per token) / copy bandwidth. The slab holds what a full-context row per slot
allows (at 4,096 context on an H200, 53 rows of a 7B model); batches a layout cannot hold are
reported as such (`fits: false`). Each batch also gets its step's GPU time by kind of kernel
(attention, GEMMs, point-wise, other), to say where the time beyond the floor goes.
"""
from __future__ import annotations

import bisect
import random
import statistics
import time

import torch


def chat_lengths(batch: int, context: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(1, min(context - 64, int(rng.lognormvariate(6.4, 0.8)))) for _ in range(batch)]   # e^6.4 ~ 600


def _fill(engine, lengths: list[int]) -> None:
    L, H, D = engine.slab.dims
    dtype, device = engine.slab.data.dtype, engine.slab.data.device
    for i, n in enumerate(lengths):
        engine.slab.add_row(f"m{i}", torch.randn(L, 2, H, n, D, dtype=dtype, device=device))


def _median_step(runner, steps: int = 25, skip: int = 5) -> float:
    ids = [7] * runner.slab.num_rows
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.decode(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[skip:])


def _replay_ms(paged, batch: int, steps: int = 25, skip: int = 5) -> dict:
    """The paged step's CUDA graph replayed alone (its inputs as the last step left them): the
    step's time less what the host does around it (row order, page table, block-mask refresh,
    copies), to say whether the time past the kernels is inside the graph or before it."""
    if paged is None or not paged.use_graphs:
        return {}
    graph, _ = paged.graphs[paged.row_buckets[bisect.bisect_left(paged.row_buckets, batch)]]
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"replay_ms": 1000 * statistics.median(times[skip:])}


KERNEL_KINDS = (("attention", ("flex_attention", "flash", "attention")),
                ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitk")),
                ("point-wise", ("triton_poi", "triton_per", "elementwise", "vectorized", "index", "reduce", "norm")))


def kernel_breakdown(runner, steps: int = 5) -> dict:
    """GPU time of one decode step by kind of kernel (profiled over `steps` steps, graphs
    included), the sum against the step's wall time (the rest: gaps between kernels), and the
    top kernels. Where a step's time goes beyond its floor (note 26)."""
    from torch.profiler import ProfilerActivity, profile
    ids = [7] * runner.slab.num_rows
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode(ids)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.device_time_total / 1e3 / steps
    top = sorted(kernels, key=lambda e: -e.device_time_total)[:8]
    return {"kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items())},
            "kernel_ms": round(sum(kinds.values()), 3),
            "top_kernels": [(e.key[:70], round(e.device_time_total / 1e3 / steps, 3), e.count // steps) for e in top]}


def decode_chat(model, tokenizer, spec, layout: str, batches: tuple[int, ...], context: int,
                bandwidth: float) -> dict:
    """The engine's defaults, then the fused step without its fused epilogues (key suffix
    `_plainepilogues`: the RMSNorm scale and the residual adds as kernels of their own; note 27)."""
    out = _decode_chat(model, tokenizer, spec, layout, batches, context, bandwidth, True)
    out.update(_decode_chat(model, tokenizer, spec, layout, batches, context, bandwidth, False))
    return out


def _decode_chat(model, tokenizer, spec, layout: str, batches: tuple[int, ...], context: int,
                 bandwidth: float, epilogues: bool) -> dict:
    """One engine of `layout` sized for the largest batch; each batch of rows filled, stepped, emptied.
    On pages with the default epilogues each batch is stepped twice: rows longest first (the
    engine's default), then in the rows' own order (key suffix `_rowordered`; note 27)."""
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    config = EngineConfig(max_batch_size=max(batches), max_seq_len=context, warmup=False, kv_layout=layout,
                          fused_epilogues=epilogues)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {}
    try:
        for batch in batches:
            lengths = chat_lengths(batch, context)
            room = (sum(lengths) + batch * 64) * engine.slab.bytes_per_token
            key = f"decode_chat_{layout}_b{batch}" + ("" if epilogues else "_plainepilogues")
            if info.max_batch_size < batch or engine.slab.total_bytes < room:
                out[key] = {"fits": False, "rows_that_fit": info.max_batch_size, "kv_bytes": engine.slab.total_bytes}
                continue
            _fill(engine, lengths)
            paged = engine.runner.paged
            for sort in ((True, False) if epilogues else (True,)) if paged is not None else (None,):
                if paged is not None:
                    paged.sort_rows = sort
                grown = engine.slab.lengths[0] - lengths[0]   # steps run so far on these rows
                step = _median_step(engine.runner)
                kv_bytes = (sum(lengths) + (grown + 12) * batch) * engine.slab.bytes_per_token   # mid timed steps
                floor = (weights + kv_bytes) / bandwidth
                out[key + ("_rowordered" if sort is False else "")] = {
                    "fits": True, "decode": info.decode, "rows_longest_first": sort, "fused_epilogues": epilogues,
                    "real_tokens": sum(lengths),
                    "padded_tokens": batch * max(lengths), "step_ms": 1000 * step,
                    "real_floor_ms": 1000 * floor, "ratio_to_real_floor": step / floor,
                    "weights_floor_ms": 1000 * weights / bandwidth, **_replay_ms(paged, batch),
                    **kernel_breakdown(engine.runner)}
            if paged is not None:
                paged.sort_rows = True
            for row_id in list(engine.slab.row_ids):
                engine.slab.remove_row(row_id)
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()
    return out
