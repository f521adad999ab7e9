"""engine/allreduce_norm.py's kernel (the all-reduce fused with the residual add and the RMSNorm,
tensor parallelism on CUDA) on CPU under Triton's interpreter, one rank: three rounds of different
row counts (a program taking one row or several) give the add and the norm, the buffer's slots hold the sentinel again after each read
(so the next round's peers find them clear), the round in device memory moves on once a launch,
and a partial's -0.0 is not taken for the sentinel. The interpreter rounds fp32 to bf16 by
truncation where a GPU rounds to nearest, so the reference here truncates too. Two ranks run on
the GPUs only (benchmarks/probe_allreduce_norm.py: equal to NCCL + liger's add-norm)."""
from __future__ import annotations

import pytest

from tests.conftest import interpreted

pytest.importorskip("triton")


def _one_rank() -> None:
    import torch

    from engine.allreduce_norm import SENTINEL, launch

    def cut(t):   # fp32 -> bf16 as the interpreter does it
        return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
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
        # local: its own row from the partial (the engine's); not local: through its own buffer
        for i, local in enumerate((True, False)):
            x, h = launch(partial, residual, weight, eps, ptrs.data_ptr(), state, rank=0, world=1, rows=rows,
                          programs=programs, local=local)
            assert torch.equal(x, x_ref) and torch.equal(h, cut(normed.float() * weight.float()))
            assert state.tolist() == [2 * round_ + i + 1, 0]
            assert bool((buffer == SENTINEL).all())


def test_fused_all_reduce_norm_kernel_on_one_rank():
    interpreted("tests.test_allreduce_norm", "_one_rank")
