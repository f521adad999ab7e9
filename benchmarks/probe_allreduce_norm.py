"""An all-reduce fused with the residual add and the RMSNorm after it, one Triton kernel over
symmetric memory (2+ GPUs), against what the TP decode step runs now (NCCL's all-reduce, then
liger-kernel's fused add + RMSNorm): is it exact, and is it faster inside a CUDA graph?

    torchrun --nproc-per-node 2 -m benchmarks.probe_allreduce_norm

Note 31: what TP adds to a 7B step at TP 2 is 64 all-reduces (~8.5 us each inside the step) and
each one's add-norm kernel after it; one rank's shard alone, with no collectives, runs at 0.63x of
TP 1. This kernel would take the add-norm's launch and gap out of every all-reduce. Not in the
engine: a probe first (built in session 27, not yet run on the GPUs).

The kernel: one program per row. It copies this rank's partial row into its symmetric buffer,
meets its peers at a barrier (per-row flags in the buffer's signal pads, set 0 -> 1 by the sender
and back 1 -> 0 by the receiver: the pads end as they began, so a CUDA graph can replay it), sums
the ranks' rows in rank order in fp32 (one rounding, as NCCL's sum of two), adds the residual
(rounded, as the unfused add), normalises in fp32 and rounds before the weight (HF's and liger's
order), then meets its peers again so that no rank rewrites its buffer while another still reads it.

Checks, rank 0 printing JSON lines: the residual out equals NCCL + liger's bit for bit, the norm
within one bf16 rounding (the row's sum of squares is reduced in another order), and every rank's
outputs equal rank 0's. Times graphs of back-to-back ops and of ops with a GEMM between each
(as in the step), for the 7B ([32, 4096], 64 a step) and 70B ([32, 8192], 160) shapes.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from benchmarks.probe_allreduce import _graph, _time, join

@triton.jit
def _meet(pads, row, rank: tl.constexpr, world: tl.constexpr):
    """This row's barrier across the ranks: flag every peer's slot [row, rank] (waiting while
    the peer has not yet taken the last flag), then take every flag [row, peer] of this rank's
    own pad. The CTA barriers order the program's other threads around the atomics. Every
    program of the grid must be resident at once (rows <= the SMs' room for programs), or one
    spinning could keep a peer's partner from ever starting."""
    tl.debug_barrier()
    for peer in tl.static_range(world):
        slot = tl.load(pads + peer).to(tl.pointer_type(tl.uint32)) + row * world + rank
        seen = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
        while seen != 0:
            seen = tl.atomic_cas(slot, 0, 1, sem="release", scope="sys")
    own = tl.load(pads + rank).to(tl.pointer_type(tl.uint32))
    for peer in tl.static_range(world):
        seen = tl.atomic_cas(own + row * world + peer, 1, 0, sem="acquire", scope="sys")
        while seen != 1:
            seen = tl.atomic_cas(own + row * world + peer, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()

@triton.jit
def all_reduce_add_norm(partial, residual, weight, x_out, h_out, buffers, pads, eps,
                        rank: tl.constexpr, world: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    at = row * N + cols
    buffers = buffers.to(tl.pointer_type(tl.uint64))
    pads = pads.to(tl.pointer_type(tl.uint64))
    mine = tl.load(buffers + rank).to(tl.pointer_type(tl.bfloat16))
    tl.store(mine + at, tl.load(partial + at, mask=inside), mask=inside)
    _meet(pads, row, rank, world)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(world):   # rank order: the same sum on every rank
        theirs = tl.load(buffers + r).to(tl.pointer_type(tl.bfloat16))
        total += tl.load(theirs + at, mask=inside, other=0.0, volatile=True).to(tl.float32)
    summed = total.to(tl.bfloat16)
    x = (summed.to(tl.float32) + tl.load(residual + at, mask=inside, other=0.0).to(tl.float32)).to(tl.bfloat16)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(tl.bfloat16)
    h = (normed.to(tl.float32) * tl.load(weight + cols, mask=inside, other=0.0).to(tl.float32)).to(tl.bfloat16)
    tl.store(x_out + at, x, mask=inside)
    tl.store(h_out + at, h, mask=inside)
    _meet(pads, row, rank, world)


class FusedAllReduceNorm:
    """(partial, residual, weight, eps) -> (residual + the partials' sum over the ranks, its RMSNorm)."""

    def __init__(self, group, rows: int, hidden: int, dtype=torch.bfloat16) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        if hasattr(symm_mem, "get_backend") and symm_mem.get_backend(torch.device("cuda")) != "CUDA":
            symm_mem.set_backend("CUDA")
        self.buffer = symm_mem.empty(rows * hidden, dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        self.rows, self.hidden = rows, hidden

    def __call__(self, partial, residual, weight, eps):
        b, n = partial.shape
        assert b <= self.rows and n == self.hidden and partial.is_contiguous() and residual.is_contiguous()
        x, h = torch.empty_like(residual), torch.empty_like(residual)
        all_reduce_add_norm[(b,)](partial, residual, weight, x, h, self.handle.buffer_ptrs_dev,
                                  self.handle.signal_pad_ptrs_dev, eps, rank=self.handle.rank,
                                  world=self.handle.world_size, N=n, BLOCK=triton.next_power_of_2(n), num_warps=16)
        return x, h


def _unfused(partial, residual, weight, eps, add_norm):
    summed = partial.clone()
    dist.all_reduce(summed)
    return add_norm(summed, residual, weight, eps)


def main() -> None:
    from engine.fused_decode import liger_add_norm
    rank = join()
    group, world = dist.group.WORLD, dist.get_world_size()
    add_norm = liger_add_norm()
    if rank == 0:
        print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "world": world,
                          "liger": add_norm is not None}), flush=True)
    for label, n_ops, rows, hidden in (("7B", 64, 32, 4096), ("70B", 160, 32, 8192)):
        fused = FusedAllReduceNorm(group, rows, hidden)
        gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + hidden)   # partials differ by rank
        partial = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        same = torch.Generator(device="cuda").manual_seed(hidden)                # residual and weight do not
        residual = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=same)
        weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=same)).to(torch.bfloat16)
        eps = 1e-5
        out = {"shape": label, "ops": n_ops, "rows": rows, "hidden": hidden}
        try:
            x_ref, h_ref = _unfused(partial, residual, weight, eps, add_norm)
            x, h = fused(partial, residual, weight, eps)
            torch.cuda.synchronize()
            gathered = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(gathered, x)
            ulp = (h.float() - h_ref.float()).abs() / h_ref.float().abs().clamp_min(1e-30) * 128
            out.update(residual_equal=bool(torch.equal(x, x_ref)), norm_equal_fraction=float((h == h_ref).float().mean()),
                       norm_max_ulps=round(float(ulp.max()), 2), ranks_agree=all(torch.equal(g, gathered[0]) for g in gathered))
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
        except Exception as exc:  # noqa: BLE001 - report why it could not run
            out["error"] = repr(exc)[:500]
        if rank == 0:
            print(json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
