"""The host pool hands out contiguous runs of arena blocks, reuses them after release, and falls
back to fresh memory when no run fits (pinning is a CUDA-only detail tested on the GPU machine)."""
import torch

from engine.host_pool import HostPool


def test_runs_are_reused_and_fall_back_when_full():
    pool = HostPool(arena_bytes=10 * 64, block_bytes=64, pin=False)      # 10 blocks of 64 bytes
    a = pool.allocate(torch.Size([4, 16]), torch.float32)                  # 256 B -> 4 blocks
    b = pool.allocate(torch.Size([3, 16]), torch.float32)                  # 192 B -> 3 blocks
    assert pool.blocks_in_use == 7
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.sum() == 64 and b.sum() == 96                                 # views do not overlap
    c = pool.allocate(torch.Size([4, 16]), torch.float32)                  # 4 blocks: only 3 free
    assert pool.blocks_in_use == 7 and c.data_ptr() != a.data_ptr()        # fresh memory fallback
    pool.release(a)
    d = pool.allocate(torch.Size([2, 16]), torch.float32)                  # fits in a's old run
    assert pool.blocks_in_use == 5 and d.data_ptr() == a.data_ptr()
    pool.release(c)                                                        # not from the arena: no-op
    pool.release(b)
    pool.release(d)
    assert pool.blocks_in_use == 0


def test_no_arena_means_plain_tensors():
    pool = HostPool(arena_bytes=0, block_bytes=64, pin=False)
    t = pool.allocate(torch.Size([2, 3]), torch.bfloat16)
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16 and pool.blocks_in_use == 0
