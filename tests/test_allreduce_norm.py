"""engine/allreduce_norm.py's kernel (the all-reduce fused with the residual add and the RMSNorm,
tensor parallelism on CUDA) on CPU under Triton's interpreter, one rank: three rounds of different
row counts (a program taking one row or several) give the add and the norm, the buffer's slots hold the sentinel again after each read
(so the next round's peers find them clear), the round in device memory moves on once a launch,
and a partial's -0.0 is not taken for the sentinel. The interpreter rounds fp32 to bf16 by
truncation where a GPU rounds to nearest, so the reference here truncates too. Two ranks also run
here, one launch after the other (the peer's first store stood in for); both waiting on each other
at once runs on the GPUs only (benchmarks/probe_allreduce_norm.py: equal to NCCL + liger's add-norm)."""
from __future__ import annotations

import pytest

from tests.conftest import interpreted

pytest.importorskip("triton")


def _cut(t):
    """fp32 -> bf16 as the interpreter does it (truncation)."""
    import torch
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def _one_rank() -> None:
    import torch

    from engine.allreduce_norm import SENTINEL, launch
    cut = _cut
    rows, n, eps = 4, 64, 1e-5
    buffer = torch.full((2 * rows * n,), SENTINEL, dtype=torch.int16)
    ptrs, state = torch.tensor([buffer.data_ptr()]), torch.zeros(2, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
    for round_, (b, programs) in enumerate(((3, 2), (2, 2), (4, 1))):
        partial, residual = (torch.randn(b, n, generator=g).to(torch.bfloat16) for _ in range(2))
        partial[0, 5] = -0.0   # data, not the sentinel: the kernel must not wait on it
        x_ref = cut(partial.float() + residual.float())
        normed = cut(x_ref.float() * torch.rsqrt(x_ref.float().pow(2).mean(-1, keepdim=True) + eps))
        x, h = launch(partial, residual, weight, eps, ptrs.data_ptr(), state, rank=0, world=1, rows=rows,
                      programs=programs)
        assert torch.equal(x, x_ref) and torch.equal(h, cut(normed.float() * weight.float()))
        assert state.tolist() == [round_ + 1, 0]
        assert bool((buffer == SENTINEL).all())


def _two_ranks() -> None:
    """Two ranks' launches one after the other in one process (the interpreter runs a launch to
    its end, so both cannot wait on each other): rank 1's stores of the round are first put into
    rank 0's buffer as rank 1 would make them, then rank 0 runs (it stores its row into rank 1's
    buffer, sums rank 1's from its own), then rank 1 (its stores land in rank 0's buffer again,
    which is cleared by hand after). Both ranks' outputs must equal the sum in rank order, added
    and normalised (each rank's own row summed from its partial, its peer's from its buffer); the
    slots a rank read hold the sentinel again."""
    import torch

    from engine.allreduce_norm import SENTINEL, launch
    cut = _cut
    rows, n, eps, world = 3, 64, 1e-5, 2
    buffers = [torch.full((2 * world * rows * n,), SENTINEL, dtype=torch.int16) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in buffers])
    states = [torch.zeros(2, dtype=torch.int32) for _ in range(world)]
    g = torch.Generator().manual_seed(1)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
    residual = torch.randn(rows, n, generator=g).to(torch.bfloat16)   # the same on every rank
    for round_ in range(3):
        partials = [torch.randn(rows, n, generator=g).to(torch.bfloat16) for _ in range(world)]
        partials[1][1, 7] = -0.0   # sent as +0.0
        half = round_ % 2
        slots = buffers[0].view(2, world, rows, n)
        slots[half, 1] = partials[1].view(torch.int16).masked_fill(partials[1].view(torch.int16) == SENTINEL, 0)
        outs = [launch(partials[r], residual, weight, eps, ptrs.data_ptr(), states[r], rank=r, world=world,
                       rows=rows, programs=2) for r in range(world)]
        summed = cut(partials[0].float() + partials[1].float())
        x_ref = cut(summed.float() + residual.float())
        normed = cut(x_ref.float() * torch.rsqrt(x_ref.float().pow(2).mean(-1, keepdim=True) + eps))
        h_ref = cut(normed.float() * weight.float())
        for r, (x, h) in enumerate(outs):
            assert torch.equal(x, x_ref) and torch.equal(h, h_ref), (round_, r)
            assert states[r].tolist() == [round_ + 1, 0]
        # rank 1's second store of the round into rank 0's buffer (in a real round it stores once)
        assert torch.equal(slots[half, 1], partials[1].view(torch.int16).masked_fill(
            partials[1].view(torch.int16) == SENTINEL, 0))
        slots[half, 1] = SENTINEL
        assert all(bool((b == SENTINEL).all()) for b in buffers)


def test_fused_all_reduce_norm_kernel_on_one_rank():
    interpreted("tests.test_allreduce_norm", "_one_rank")


def test_fused_all_reduce_norm_kernel_two_ranks_in_turn():
    interpreted("tests.test_allreduce_norm", "_two_ranks")
