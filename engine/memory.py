"""Device memory: sizing the K/V slab and the watermark signal for batch-size scaling.

On CUDA the signal reads the device's free memory (`torch.cuda.mem_get_info`): above the high
watermark of used memory the scheduler parks rows, below the low one it admits again. The K/V
storage (slab or page pool) is allocated once at start and never returned, so the watermarks are
fractions of the memory *outside* it (`exclude(pool_bytes)`): counted in, a pool sized at 85% of
free memory alone sits above the low watermark, and one crossing of the high one (a long prefill's
activations) would hold the signal on for good, admitting one row at a time. On CPU
there is no device memory to watch: the K/V budget in EngineConfig (kv_budget_bytes) plays that
role inside the scheduler, so the same logic is testable here.
"""
from __future__ import annotations

import torch


class MemoryMonitor:
    def __init__(self, device: torch.device, high_watermark: float, low_watermark: float) -> None:
        self.device = device
        self.high = high_watermark
        self.low = low_watermark
        self._over = False
        self._excluded = 0   # bytes of the K/V pool, held for the engine's life

    def exclude(self, pool_bytes: int) -> None:
        """Leave the preallocated K/V pool out of the watermark arithmetic."""
        self._excluded = pool_bytes

    def used_fraction(self) -> float:
        """Share of device memory that is really taken: PyTorch's cached-but-free blocks are ours
        to reuse, so they count as free."""
        if self.device.type != "cuda":
            return 0.0
        free, total = torch.cuda.mem_get_info(self.device)
        cached_free = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return used_fraction_outside(total, free + cached_free, self._excluded)

    def pressure(self) -> bool:
        """True from crossing the high watermark until falling under the low one (hysteresis)."""
        if self.device.type != "cuda":
            return False
        used = self.used_fraction()
        self._over = used > self.high or (self._over and used > self.low)
        return self._over

    def slab_slots(self, max_slots: int, bytes_per_slot: int, fraction: float, reserve: int = 0) -> int:
        """How many rows (or pages) of `bytes_per_slot` to preallocate: all asked for on CPU; on
        CUDA no more than `fraction` of the free memory allows, leaving at least `reserve` bytes
        free (a prefill's temporaries)."""
        if self.device.type != "cuda":
            return max_slots
        free, _total = torch.cuda.mem_get_info(self.device)
        fit = min(int(free * fraction), free - reserve) // bytes_per_slot
        if fit < 1:
            raise RuntimeError(f"not enough device memory for one K/V row of {bytes_per_slot} bytes")
        return min(max_slots, fit)


def used_fraction_outside(total: int, free: int, excluded: int) -> float:
    """Share of the memory outside an `excluded` allocation (counted as used) that is taken."""
    outside = total - excluded
    return (outside - free) / outside if outside > 0 else 1.0

