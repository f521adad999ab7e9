"""The paged decode step's rotary embedding and K/V write as one kernel (Triton, CUDA).

Per layer the fused step turned the qkv GEMM's output into a rotated q, a rotated k and v (two
compiled point-wise kernels) and wrote k and v into the page pool (two index copies): four small
kernels, each a launch and a gap in a step of ~550 whose gaps do not shrink with tensor
parallelism (note 31: one rank's shard alone, no collectives, took 0.71x of the whole model's
step before this kernel, 0.63x with it).
Here one program per (row, head) reads the head from qkv, rotates it if it is a q or k head, and
stores it: q to a new tensor, k and v straight into the row's write slot of the pool.

The arithmetic is the compiled `fused_decode._qkv_split_rotary`'s: x * cos + rotate_half(x) * sin
in fp32, rounded once to the dtype. `rope_store()` is None where Triton cannot run (no CUDA, no
triton), and the step keeps the four kernels. TRITON_INTERPRET=1 runs the kernel on CPU tensors
(tests/test_rope_store.py).
"""
from __future__ import annotations

import functools
import os

import structlog
import torch

log = structlog.get_logger("baton.engine")


@functools.cache   # one JIT function (and its compiled variants) per process
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_store(qkv_ptr, cos_ptr, sin_ptr, q_ptr, pool_ptr, slot_ptr, qkv_row, cs_row, slot_row,
                   pool_kv, pool_head, pool_slot, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)                       # q heads, then k heads, then v heads
        kv_head = (head - HQ).to(tl.int64)            # pool offsets in 64 bits: a layer's pool can pass 2**31 elements
        offs = tl.arange(0, D)
        src = qkv_ptr + row * qkv_row + head * D
        x = tl.load(src + offs)
        if head < HQ + HKV:                           # q or k: rotated
            half: tl.constexpr = D // 2
            partner = tl.load(src + (offs + half) % D)
            c = tl.load(cos_ptr + row * cs_row + offs).to(tl.float32)
            s = tl.load(sin_ptr + row * cs_row + offs).to(tl.float32)
            rotated = tl.where(offs < half, -partner.to(tl.float32), partner.to(tl.float32))
            y = (x.to(tl.float32) * c + rotated * s).to(x.dtype)
            if head < HQ:
                tl.store(q_ptr + (row * HQ + head) * D + offs, y)
            else:
                slot = tl.load(slot_ptr + row * slot_row)
                tl.store(pool_ptr + kv_head * pool_head + slot * pool_slot + offs, y)
        else:                                         # v: as it is
            slot = tl.load(slot_ptr + row * slot_row)
            tl.store(pool_ptr + pool_kv + (kv_head - HKV) * pool_head + slot * pool_slot + offs, x)

    return rope_store


def rope_store():
    """-> store(qkv, cos, sin, pool, slots, hq, hkv, d) -> q, or None where it cannot run.
    qkv [B, (hq + 2 hkv) d]; cos, sin [B, d]; pool [2, hkv, N, d] (one layer's K and V); slots [B]:
    each row's write slot. Writes the rotated k and the v of row b at pool[:, :, slots[b]] and
    returns the rotated q as [B, hq, 1, d]."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    try:
        kernel = _kernel()
    except Exception as exc:  # noqa: BLE001 - no triton: the step keeps its four kernels
        log.warning("rope_store_unavailable", error=repr(exc)[:300])
        return None

    def store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
              hq: int, hkv: int, d: int) -> torch.Tensor:
        b = qkv.shape[0]
        q = torch.empty(b, hq, 1, d, dtype=qkv.dtype, device=qkv.device)
        if b:
            assert qkv.stride(1) == 1 and cos.stride(1) == sin.stride(1) == 1 and sin.stride(0) == cos.stride(0) \
                and pool.stride(3) == 1
            kernel[(b, hq + 2 * hkv)](qkv, cos, sin, q, pool, slots, qkv.stride(0), cos.stride(0), slots.stride(0),
                                      pool.stride(0), pool.stride(1), pool.stride(2), HQ=hq, HKV=hkv, D=d)
        return q
    return store
