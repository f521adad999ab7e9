"""Kernel breakdown of one decode step (CUDA): `python -m benchmarks.profile_step [--batch 32]`.

Builds the Llama-2-7B preset, fills a slab with `batch` rows of ~1,024 random K/V columns, times
the CUDA-graph step for the HF forward and the fused decode, then profiles each step run eagerly
(same kernels, launched one by one) and prints kernel count, kernel time and the top kernels.
Used for notes 10 and 11 of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import gc

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import build_preset, fill_slab, median_decode_step
from engine.kv_slab import KVSlab
from engine.model_runner import ModelRunner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    dev = torch.device("cuda")
    model = build_preset("llama2-7b", dev, torch.bfloat16, vocab_size=49152)
    B, C = args.batch, args.context
    for fused in (False, True):
        slab = KVSlab(32, 32, 128, B, C + 64, torch.bfloat16, dev)
        runner = ModelRunner(model, slab, dev, cuda_graphs=True, fused_decode=fused)
        fill_slab(slab, B, C)
        print(f"{runner.describe()}: graph step {1000 * median_decode_step(runner):.2f} ms")
        runner.graphs = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.decode([7] * B)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        print(f"  eager profile: {sum(e.count for e in events) / 3:.0f} kernels/step, "
              f"{sum(e.device_time_total for e in events) / 3000:.2f} ms kernel time/step")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
            print(f"  {e.device_time_total / 3000:7.3f} ms  n={e.count / 3:5.0f}  {e.key[:100]}")
        del runner, slab
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
