"""Where a tensor-parallel decode step's host time goes: `python -m benchmarks.profile_tp [--tp 2]`.

Builds an engine through `engine.build.build_engine` (followers spawned, the model sharded) around
a preset with random weights (default `tiny`, CPU and gloo; `--device cuda` for NCCL), runs a
batch of 8 requests of 32 tokens under cProfile on rank 0, and prints TPOT and the functions
with the most own time. Used for note 22 of docs/benchmarks.md (DTensor's per-op sharding
propagation against the local-shard forward).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time

import torch

from benchmarks import workloads
from benchmarks.bench import _drive, load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    from engine.build import build_engine
    from engine.config import EngineConfig
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    loader = functools.partial(load_model, args.preset, None, None, device, dtype)
    reqs = workloads.w1(8, vocab=32000, prompt=(64, 128), output=(32, 32))
    config = EngineConfig(device=args.device, max_batch_size=8, max_seq_len=256, warmup=False,
                          tensor_parallel=args.tp, kv_layout="slab", aging_seconds=0, fused_decode=False)
    engine, _info, _tok = build_engine(config, loader)
    try:
        _drive(engine, [workloads.BenchRequest([5] * 16, 4)], None, engine.runner.device)   # warm-up
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        figures, _ = _drive(engine, reqs, None, engine.runner.device)
        profiler.disable()
        print(f"tp {args.tp}: wall {time.perf_counter() - started:.2f} s, TPOT p50 {1000 * figures['tpot_p50_s']:.1f} ms")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
