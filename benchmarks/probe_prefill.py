"""Where the packed whole-prompt prefill's time goes, graphed or not: `python -m
benchmarks.probe_prefill --tokenizer TOKDIR` (CUDA).

W4 on the H200 (docs/benchmarks.md note 27) hardly moved with note 26's prefill graphs (token
buckets of powers of 2 up to 8,192): TPOT 19.1 -> 18.9 ms, where ~15 was predicted. This times
one packed prefill forward of W4-like prompts (lognormal, median 400 tokens, sigma 1, capped
3,000; 1-16 prompts a forward) four ways, each with a device sync after it: eager; graphed with
the powers of 2; graphed with fine buckets to 8,192 (steps of 128 to 1,024, then 256, 512,
1,024); and as the engine does it now (fine buckets to 1,280, eager past them).
Per forward: tokens, the bucket, the host time until the call returns, the wall time to the
sync, the median of --reps. Prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench import load_model, versions

POW2_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)   # note 26's
FINE_BUCKETS = (64, *range(128, 1025, 128), *range(1280, 2049, 256), *range(2560, 4097, 512),
                *range(5120, 8193, 1024))


def w4_prompts(count: int, g: torch.Generator) -> list[list[int]]:
    lengths = torch.distributions.LogNormal(torch.log(torch.tensor(400.0)), 1.0).sample((count,))
    return [torch.randint(100, 30000, (min(3000, max(8, int(n))),), generator=g).tolist() for n in lengths]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sets", type=int, default=3, help="prompt sets per prompt count")
    args = p.parse_args()
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    from engine.fused_prefill import StaticPrefill
    device = torch.device("cuda")
    model, tokenizer, spec = load_model(args.preset, None, args.tokenizer, device, torch.bfloat16)
    config = EngineConfig(max_batch_size=64, warmup=False, kv_layout="paged", prefill_graphs=True,
                          kv_memory_fraction=0.3, max_prefill_tokens=8192)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    packed, kv = engine.runner.packed, engine.slab
    engine_static = packed.static
    started = time.perf_counter()
    pow2 = StaticPrefill(packed, 8192, graphs=True, steps=POW2_BUCKETS)
    fine = StaticPrefill(packed, 8192, graphs=True, steps=FINE_BUCKETS)
    pow2.capture_all()
    fine.capture_all()
    print(json.dumps({"versions": versions(), "engine_buckets": engine_static.buckets, "fine_buckets": fine.buckets,
                      "capture_s": round(time.perf_counter() - started, 1)}), flush=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 0
    for count in (1, 2, 4, 8, 16):
        for _ in range(args.sets):
            prompts = w4_prompts(count, g)
            tokens = sum(map(len, prompts))
            if tokens > 8192:
                continue
            row = {"prompts": count, "tokens": tokens}
            for name, static in (("eager", None), ("pow2", pow2), ("fine", fine), ("engine", engine_static)):
                packed.static = static
                hosts, walls = [], []
                for _ in range(args.reps):
                    ids = [f"p{n}.{i}" for i in range(count)]
                    n += 1
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    packed.prefill(prompts, ids)
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    hosts.append(t1 - t0)
                    walls.append(t2 - t0)
                    for i in ids:
                        kv.remove_row(i)
                row[name] = {"host_ms": round(1000 * statistics.median(hosts), 2),
                             "wall_ms": round(1000 * statistics.median(walls), 2)}
                if static is not None:
                    row[name]["bucket"] = static.bucket(tokens, count)   # None: the eager forward
            print(json.dumps(row), flush=True)
    packed.static = engine_static
    engine.close()


if __name__ == "__main__":
    main()
