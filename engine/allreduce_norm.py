"""The sum over the ranks of a row-parallel linear's partial output, the residual add after it and
the RMSNorm after that, in one Triton kernel over symmetric memory (tensor parallelism on CUDA,
EngineConfig.tp_allreduce = "fused"): in the TP decode step each all-reduce and the add-norm
kernel after it (NCCL's ring and liger's, two launches and two gaps) become one launch.

FlashInfer's trtllm_allreduce_fusion is the library version; its wheel (97 MB, CUDA compiled by
nvcc at first use, or 437 MB of prebuilt kernels) cannot reach the lent GPU machines (note 32), and
torch.distributed has no such fusion, so this kernel uses torch's symmetric memory for its buffers.

How the ranks meet without a barrier (the "Lamport" scheme of TensorRT-LLM's one-shot kernels,
written here from its idea): every slot of every rank's buffer holds a sentinel (bf16 -0.0) until
data lands in it. A program (one per row) stores its partial row straight into its slot of every
peer's buffer over NVLink (P2P stores, no multicast), then reads its own buffer's slots until no
element is the sentinel (its own row it takes from its partial, read with the residual before it
waits: note 35), sums the ranks' rows in rank order in fp32 with one rounding (as NCCL's
sum of two), puts the sentinel back, and adds the residual and normalises with HF's roundings and
liger's reduction (its warps a row, its rsqrt): its outputs equal NCCL + liger's add-norm's.
A partial's own -0.0 is sent as +0.0, so the sentinel is never data (the sum's value is the same).

Why two buffers suffice: round k uses buffer k % 2, and each rank clears its slots right after
reading them. A peer writes this rank's buffer k % 2 again in round k + 2, which it reaches only
after reading this rank's round k + 1 data, stored by a later kernel than the one that cleared:
a kernel's stores are all done before the next kernel on the stream starts. The round lives in
device memory (the last program of a launch moves it on), so a CUDA graph replays the kernel as
it is. One sequence of calls on every rank in the same order is required, as for any collective.

No program waits on another: each first stores all of its rows, then reads them; at most one
program per SM, so all of them can be resident at once.
Limits: bf16, rows <= `max_rows` (a decode step's; larger inputs such as a packed prefill's take
the caller's NCCL path)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# liger's rsqrt is libdevice's; Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) has only tl.math's
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"
SENTINEL = -32768   # int16 bits of bf16 -0.0
_SENTINEL = tl.constexpr(SENTINEL)   # the same, as a kernel reads a global


@triton.jit(do_not_specialize=["b"])   # one compile for every row count (Triton would specialise 1 and multiples of 16)
def _all_reduce_add_norm(partial, residual, weight, x_out, h_out, buffers, state, eps, b,
                         rank: tl.constexpr, world: tl.constexpr, ROWS: tl.constexpr,
                         N: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    first, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    buffers = buffers.to(tl.pointer_type(tl.uint64))
    step = tl.load(state, volatile=True)
    half = step % 2                                          # this round's buffer
    for row in range(first, b, programs):   # every row's partial out first: no wait depends on another program
        mine = tl.load(partial + row * N + cols, mask=inside, other=0.0).to(tl.int16, bitcast=True)
        mine = tl.where(mine == _SENTINEL, 0, mine)           # -0.0 goes as +0.0
        slot = ((half * world + rank) * ROWS + row) * N + cols
        for peer in tl.static_range(world):
            if peer != rank:   # its own row it sums from `partial`, not through its buffer
                theirs = tl.load(buffers + peer).to(tl.pointer_type(tl.int16))
                tl.store(theirs + slot, mine, mask=inside)
    own = tl.load(buffers + rank).to(tl.pointer_type(tl.int16))
    w = tl.load(weight + cols, mask=inside, other=0.0).to(tl.float32)
    for row in range(first, b, programs):
        at = row * N + cols
        # the residual and this rank's own partial are read before any wait on a peer, so after the
        # last peer's row lands only the sum and the norm remain (note 35: -0.6 us an op)
        res = tl.load(residual + at, mask=inside, other=0.0).to(tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(world):   # rank order: the same sum on every rank
            if r == rank:
                got = tl.load(partial + at, mask=inside, other=0.0).to(tl.int16, bitcast=True)
                got = tl.where(got == _SENTINEL, 0, got)   # as it was sent to the peers
            else:
                src = own + ((half * world + r) * ROWS + row) * N + cols
                got = tl.load(src, mask=inside, other=0, volatile=True)
                while tl.max((got == _SENTINEL).to(tl.int32), axis=0) > 0:
                    got = tl.load(src, mask=inside, other=0, volatile=True)
                tl.store(src, tl.full([BLOCK], _SENTINEL, tl.int16), mask=inside)
            total += got.to(tl.bfloat16, bitcast=True).to(tl.float32)
        summed = total.to(tl.bfloat16)
        x = (summed.to(tl.float32) + res).to(tl.bfloat16)
        xf = x.to(tl.float32)
        if LIBDEVICE:
            rstd = libdevice.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        else:
            rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        normed = (xf * rstd).to(tl.bfloat16)
        tl.store(x_out + at, x, mask=inside)
        tl.store(h_out + at, (normed.to(tl.float32) * w).to(tl.bfloat16), mask=inside)
    # the launch's last program moves the round on (every program has read it by then)
    ticket = tl.atomic_add(state + 1, 1, sem="acq_rel")
    if ticket == programs - 1:
        tl.store(state + 1, 0)
        tl.store(state, step + 1)


def launch(partial, residual, weight, eps, buffers_ptr: int, state, rank: int, world: int, rows: int,
           programs: int):
    """The kernel on `partial` and `residual` [b, n] (b <= rows), the buffers' pointer table at
    `buffers_ptr` (each rank's buffer: [2, world, rows, n] bf16) and `state` (int32 [2]: round,
    tickets) -> (residual + the ranks' sum, its RMSNorm * weight). At most `programs` programs
    (the SMs: all of them can be resident at once), each taking rows b apart."""
    b, n = partial.shape
    x, h = torch.empty_like(residual), torch.empty_like(residual)
    block = triton.next_power_of_2(n)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4   # liger's: the same sum of squares, in the same order
    _all_reduce_add_norm[(min(b, programs),)](
        partial, residual, weight, x, h, buffers_ptr, state, eps, b, rank=rank, world=world, ROWS=rows, N=n,
        BLOCK=block, num_warps=warps, LIBDEVICE=_LIBDEVICE)
    return x, h


class FusedAllReduceNorm:
    """(partial, residual, weight, eps) -> (residual + the partials' sum over the ranks, its RMSNorm),
    or None where it does not apply (more rows than `max_rows`, another dtype or width): the caller
    then sums with its all-reduce and adds and normalises apart. Every rank of `group` must build it
    at once (it meets its peers to exchange the buffers) and call it in the same order."""

    def __init__(self, group, max_rows: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        if dtype != torch.bfloat16:
            raise ValueError("the fused all-reduce + add + RMSNorm is for bf16")
        if hasattr(symm_mem, "get_backend") and symm_mem.get_backend(torch.device("cuda")) != "CUDA":
            symm_mem.set_backend("CUDA")   # CUDA's own P2P buffers (not NVSHMEM)
        device = torch.device("cuda", torch.cuda.current_device())
        self.world = dist.get_world_size(group)
        if 2 * self.world * max_rows * hidden >= 1 << 31:   # the kernel's offsets are 32-bit
            raise ValueError("the fused all-reduce's buffer would pass 2**31 elements")
        self.buffer = symm_mem.empty(2 * self.world * max_rows * hidden, dtype=torch.int16, device=device)
        self.buffer.fill_(SENTINEL)
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        self.state = torch.zeros(2, dtype=torch.int32, device=device)
        self.rows, self.hidden, self.dtype = max_rows, hidden, dtype
        self.programs = torch.cuda.get_device_properties(device).multi_processor_count
        torch.cuda.synchronize(device)
        dist.barrier(group=group)   # every buffer holds the sentinel before any rank stores into it
        # one round now, on every rank (this is collective): the kernel compiles at start-up, not in a request's prefill
        one = torch.zeros(1, hidden, dtype=dtype, device=device)
        self(one, one, torch.ones(hidden, dtype=dtype, device=device), 1e-6)
        torch.cuda.synchronize(device)

    def __call__(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        b, n = partial.shape
        if (b > self.rows or n != self.hidden or partial.dtype != self.dtype or residual.dtype != self.dtype
                or not partial.is_contiguous() or not residual.is_contiguous()):
            return None
        return launch(partial, residual, weight, eps, self.handle.buffer_ptrs_dev, self.state,
                      self.handle.rank, self.world, self.rows, self.programs)
