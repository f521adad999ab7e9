"""What a prefix-cache hit from the host tier costs (CUDA): `python -m benchmarks.probe_host_copy`.

Llama-2-7B's K/V geometry (32 layers, 32 heads of 128, bf16, blocks of 128 tokens: 64 MiB a
block). Fills a PrefixCache ("device+host", device tier of 8 blocks) with 40 blocks, so the first
ones are in host memory only, then times `load` of 16 host blocks (2,048 tokens) into a partial
K/V laid out as ModelRunner.new_partial_kv makes it and into the chunk graphs' token-major
workspace (fused_prefill.StaticChunk), and a plain pinned -> device copy of one block for the
link's rate. Then whether a small pinned copy on the compute stream (a decode step's inputs, 4
KiB) waits behind a load's copies queued on another stream (one DMA engine serves both
directions' queues in order?): its latency alone and while 16 host blocks load, with the load's
copies whole (64 MiB each) and cut per layer (2 MiB). Prints JSON lines (seconds, GB/s, ms).
"""
from __future__ import annotations

import json
import time

import torch

from benchmarks.bench import versions
from engine.prefix_cache import PrefixCache


def _timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    dev = torch.device("cuda")
    print(json.dumps({"versions": versions()}), flush=True)
    L, H, D, B = 32, 32, 128, 128
    dtype = torch.bfloat16
    block_bytes = L * 2 * H * B * D * 2
    cache = PrefixCache("device+host", B, (L, H, D), dtype, dev, 8 * block_bytes, 64 * block_bytes)
    print(json.dumps({"host_tier_pinned": cache.host_tier.data.is_pinned()}), flush=True)
    tokens = list(range(10, 10 + 40 * B))
    kv = torch.randn(L, 2, H, len(tokens), D, dtype=dtype, device=dev)
    cache.insert(tokens, kv)
    torch.cuda.synchronize()
    prompt = tokens[:16 * B] + [1]
    n = 16 * B
    partial = torch.zeros(L, 2, 1, H, n + 16, D, dtype=dtype, device=dev)[:, :, 0]
    workspace = torch.zeros(L, 2, n + 1280, H, D, dtype=dtype, device=dev).permute(0, 1, 3, 2, 4)
    for name, out in (("partial", partial), ("workspace", workspace)):
        def load(out=out):
            cache.device_tier.lru.clear()                     # every block from host, every time
            cache.device_tier.free = list(range(cache.device_tier.capacity))
            hit = cache.load(prompt, out)
            assert hit.host_tokens == n, hit
        s = _timed(load)
        assert torch.equal(out[..., :n, :], kv[..., :n, :])
        print(json.dumps({"load_16_host_blocks": name, "seconds": s, "GBps": 16 * block_bytes / s / 1e9,
                          "us_per_token": 1e6 * s / n}), flush=True)
    small_src = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    small_dst = torch.empty(4096, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    blocks = [cache.host_tier.data[i] for i in range(16)]

    def contended(pieces: int | None) -> tuple[float, float]:
        torch.cuda.synchronize()
        l0, l1, e0, e1 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        if pieces is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                l0.record()
                for i, block in enumerate(blocks):
                    dst = partial[..., i * B:(i + 1) * B, :]
                    step = L // pieces
                    for a in range(0, L, step):
                        dst[a:a + step].copy_(block[a:a + step], non_blocking=True)
                l1.record()
        time.sleep(0.002)   # the load is under way
        e0.record()
        small_dst.copy_(small_src, non_blocking=True)
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1), (l0.elapsed_time(l1) if pieces is not None else 0.0)
    for pieces in (None, 1, L):
        runs = sorted(contended(pieces) for _ in range(5))
        small, load_ms = runs[len(runs) // 2]
        print(json.dumps({"small_copy_ms": small, "during_load": pieces is not None,
                          "load_copy_pieces_per_block": pieces, "load_ms": load_ms}), flush=True)
    host = cache.host_tier.data[0]
    dst = torch.empty(host.shape, dtype=dtype, device=dev)
    s = _timed(lambda: dst.copy_(host, non_blocking=True))
    print(json.dumps({"one_block_pinned_to_device": s, "GBps": block_bytes / s / 1e9}), flush=True)
    s = _timed(lambda: host.copy_(dst, non_blocking=True))
    print(json.dumps({"one_block_device_to_pinned": s, "GBps": block_bytes / s / 1e9}), flush=True)


if __name__ == "__main__":
    main()
