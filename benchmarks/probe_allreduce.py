"""What the TP decode step's all-reduces cost inside a CUDA graph (2 GPUs), by kind:

    torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce

For the 7B shape's step (64 all-reduces of [32, 4096] bf16) and the 70B shape's (160 of [32,
8192]), captures one graph of that many all-reduces of each kind and times its replay (median of
20 replays, after 3): c10d NCCL `all_reduce`; symmetric memory's one-shot all-reduce (P2P reads
over NVLink, no multicast: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stays set), skipped with its
error where this torch or machine has none; and a same-size device copy (the floor of touching
the data). Rank 0 prints JSON lines: microseconds a graph and an op. Exits without tearing the
process group down (after a capture that hangs, docs/benchmarks.md note 23).
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


def main() -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    name = dist.group.WORLD.group_name
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                          "world": dist.get_world_size()}), flush=True)
    for label, n, rows, hidden in (("7B", 64, 32, 4096), ("70B", 160, 32, 8192)):
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        kinds = {"nccl": lambda: dist.all_reduce(x), "copy": lambda: y.copy_(x)}
        y = torch.empty_like(x)
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty((rows, hidden), dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(buf, name)
            kinds["symm_one_shot"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
        except Exception as exc:  # noqa: BLE001 - report why the kind is missing
            if rank == 0:
                print(json.dumps({"shape": label, "kind": "symm_one_shot", "error": repr(exc)[:300]}), flush=True)
        for kind, fn in kinds.items():
            try:
                seconds = _time(_graph(fn, n))
            except Exception as exc:  # noqa: BLE001
                if rank == 0:
                    print(json.dumps({"shape": label, "kind": kind, "error": repr(exc)[:300]}), flush=True)
                continue
            if rank == 0:
                print(json.dumps({"shape": label, "kind": kind, "ops": n, "bytes": x.numel() * 2,
                                  "graph_us": 1e6 * seconds, "op_us": 1e6 * seconds / n}), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
