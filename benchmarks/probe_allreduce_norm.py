"""The all-reduce fused with the residual add and the RMSNorm after it (engine/allreduce_norm.py,
`--tp-allreduce fused`), against what the TP decode step runs by default (NCCL's all-reduce, then
liger-kernel's fused add + RMSNorm): is it exact, and is it faster inside a CUDA graph?

    torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce_norm

Note 32: session 27's first kernel (a per-row barrier of atomic flags on both sides of the sum,
peers' rows read over NVLink) was exact but slower than NCCL + liger: 18.2 against 12.3 us an op
back to back, 27.8 against 22.3 between GEMMs (7B shape, 2x H200). The engine's kernel stores
each row into every peer's buffer and waits for the sentinel to go from its own: no barrier and
no remote reads.

Note 35: the kernel sums its own row from its partial (read before it waits, with the residual);
its A/B against the kernel before that (its own row stored into and read back from its own buffer)
ran at commit a85c5b0 (`fused_through_own_*`, benchmarks/results/probe-allreduce-norm-s31.jsonl).

Checks, rank 0 printing JSON lines: the residual out equals NCCL + liger's bit for bit, the norm
within one bf16 rounding (the row's sum of squares is reduced in another order), every rank's
outputs equal rank 0's, and again after the timed graphs' replays (the round in device memory and
the cleared slots carry from one replay to the next). Times graphs of back-to-back ops and of
ops with a GEMM between each (as in the step), for the 7B ([32 and 128, 4096], 64 a step) and 70B
([32, 8192], 160) shapes.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from benchmarks.probe_allreduce import _graph, _time, join


def _unfused(partial, residual, weight, eps, add_norm):
    summed = partial.clone()
    dist.all_reduce(summed)
    return add_norm(summed, residual, weight, eps)


def main() -> None:
    from engine.allreduce_norm import FusedAllReduceNorm
    from engine.fused_decode import liger_add_norm
    rank = join()
    group, world = dist.group.WORLD, dist.get_world_size()
    add_norm = liger_add_norm()
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "world": world,
                          "liger": add_norm is not None}), flush=True)
    for label, n_ops, rows, hidden in (("7B", 64, 32, 4096), ("7B", 64, 128, 4096), ("70B", 160, 32, 8192)):
        fused = FusedAllReduceNorm(group, 256, hidden)
        gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + hidden)   # partials differ by rank
        partial = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        same = torch.Generator(device="cuda").manual_seed(hidden)                # residual and weight do not
        residual = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=same)
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=same)).to(torch.bfloat16)
        eps = 1e-5
        out = {"shape": label, "ops": n_ops, "rows": rows, "hidden": hidden}

        def check(tag):
            x_ref, h_ref = _unfused(partial, residual, weight, eps, add_norm)
            x, h = fused(partial, residual, weight, eps)
            torch.cuda.synchronize()
            gathered = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(gathered, x)
            ulp = (h.float() - h_ref.float()).abs() / h_ref.float().abs().clamp_min(1e-30) * 128
            out.update({f"{tag}residual_equal": bool(torch.equal(x, x_ref)),
                        f"{tag}norm_equal_fraction": float((h == h_ref).float().mean()),
                        f"{tag}norm_max_ulps": round(float(ulp.max()), 2),
                        f"{tag}ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)})
        try:
            check("")
            w = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16, generator=same) / hidden ** 0.5
            between = {"back_to_back": lambda t: t, "with_gemm": lambda t: t @ w}
            for where, before in between.items():
                for kind, op in (("nccl_liger", lambda p, r: _unfused(p, r, weight, eps, add_norm)),
                                 ("fused", lambda p, r: fused(p, r, weight, eps))):
                    state = {"r": residual.clone()}

                    def step(op=op, before=before, state=state):
                        state["r"] = op(before(partial), state["r"])[0]
                    seconds = _time(_graph(step, n_ops))
                    out[f"{kind}_{where}_op_us"] = round(1e6 * seconds / n_ops, 2)
            check("after_replays_")
        except Exception as exc:  # noqa: BLE001 - report why it could not run
            out["error"] = repr(exc)[:500]
        if rank == 0:
            print(json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
