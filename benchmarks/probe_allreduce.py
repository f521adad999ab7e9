"""What the TP decode step's all-reduces cost inside a CUDA graph (2 GPUs), by kind:

    torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce

For the 7B shape's step (64 all-reduces of [32, 4096] bf16), the 70B shape's (160 of [32, 8192])
and a scan of sizes (80 all-reduces of [rows, 8192], rows 8 to 512: where the one-shot stops
paying), captures one graph of that many all-reduces of each kind and times its replay (median
of 20 replays, after 3): c10d NCCL `all_reduce`; the engine's `one-shot` sum
(engine.tensor_parallel.sum_over_ranks: symmetric memory's one-shot all-reduce, P2P reads over
NVLink, no multicast: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stays set; here for sizes up to 8 MiB);
and a same-size device copy (the floor of touching the data). Checks that the one-shot's sum
equals NCCL's, bit for bit. Rank 0 prints JSON lines: microseconds a graph and an op. Exits
without tearing the process group down (after a capture that hangs, docs/benchmarks.md note 23).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _graph(fn, n: int):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return g


def _time(g) -> float:
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def join() -> int:
    """A torchrun process's NCCL group, NVLink multicast off, on the GPU of its rank. -> the rank."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return rank


def main() -> None:
    from engine.tensor_parallel import sum_over_ranks
    rank = join()
    group = dist.group.WORLD
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                          "world": dist.get_world_size()}), flush=True)
    one_shot = sum_over_ranks(group, "cuda", torch.bfloat16, "one-shot", max_bytes=8 << 20)
    cases = [("7B", 64, 32, 4096), ("70B", 160, 32, 8192)] + [(f"scan{r}", 80, r, 8192) for r in (8, 128, 256, 512)]
    for label, n, rows, hidden in cases:
        gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + rows)
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        y = torch.empty_like(x)
        ref = x.clone()
        dist.all_reduce(ref)
        same = bool(torch.equal(one_shot(x.clone()), ref))
        kinds = {"nccl": lambda: dist.all_reduce(x), "one_shot": lambda: one_shot(x), "copy": lambda: y.copy_(x)}
        for kind, fn in kinds.items():
            try:
                seconds = _time(_graph(fn, n))
            except Exception as exc:  # noqa: BLE001 - report why the kind could not run
                if rank == 0:
                    print(json.dumps({"shape": label, "kind": kind, "error": repr(exc)[:300]}), flush=True)
                continue
            if rank == 0:
                print(json.dumps({"shape": label, "kind": kind, "ops": n, "bytes": x.numel() * 2,
                                  "graph_us": round(1e6 * seconds, 1), "op_us": round(1e6 * seconds / n, 2),
                                  **({"equal_to_nccl": same, "as": one_shot.kind} if kind == "one_shot" else {})}),
                      flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
