"""benchmarks/probe_allreduce_norm.py's kernel (an all-reduce fused with the residual add and the
RMSNorm, for the GPUs' next session) on CPU under Triton's interpreter, one rank: the row is copied
into the symmetric buffer, the barrier's flags end as they began (so a CUDA graph can replay it),
and the outputs are the add and the norm. The interpreter rounds fp32 to bf16 by truncation where
a GPU rounds to nearest, so the reference here truncates too."""
from __future__ import annotations

import pytest

from tests.conftest import interpreted

pytest.importorskip("triton")


def _one_rank() -> None:
    import torch

    from benchmarks.probe_allreduce_norm import all_reduce_add_norm

    def cut(t):   # fp32 -> bf16 as the interpreter does it
        return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    rows, n, eps = 3, 64, 1e-5
    buffer, pad = torch.zeros(rows * n, dtype=torch.bfloat16), torch.zeros(rows, dtype=torch.int32)
    buffers, pads = torch.tensor([buffer.data_ptr()]), torch.tensor([pad.data_ptr()])
    g = torch.Generator().manual_seed(0)
    partial, residual = (torch.randn(rows, n, generator=g).to(torch.bfloat16) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
    x, h = torch.empty_like(residual), torch.empty_like(residual)
    all_reduce_add_norm[(rows,)](partial, residual, weight, x, h, buffers.data_ptr(), pads.data_ptr(), eps,
                                 rank=0, world=1, N=n, BLOCK=n)
    assert torch.equal(buffer.view(rows, n), partial) and not pad.any()
    x_ref = cut(partial.float() + residual.float())
    normed = cut(x_ref.float() * torch.rsqrt(x_ref.float().pow(2).mean(-1, keepdim=True) + eps))
    assert torch.equal(x, x_ref) and torch.equal(h, cut(normed.float() * weight.float()))


def test_fused_all_reduce_norm_kernel_on_one_rank():
    interpreted("tests.test_allreduce_norm_probe", "_one_rank")
