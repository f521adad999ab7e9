"""What the engine hands back: a `StepOutput` per step and an `EngineStats` snapshot.

Both are values (msgspec structs, so they cross the engine process's pipe cheaply): the engine
computes them itself, nobody reads its internals to build them.
"""
from __future__ import annotations

from typing import Optional

import msgspec

from engine.request import RequestOutput


class EngineStats(msgspec.Struct, frozen=True, array_like=True):
    rows_on_device: int = 0
    rows_parked: int = 0             # preempted or suspended rows whose K/V are (or are being) parked
    requests_waiting: int = 0        # waiting for their first admission
    kv_bytes_on_device: int = 0
    kv_bytes_on_host: int = 0
    steps: int = 0
    step_errors: int = 0
    preemptions: int = 0             # rows parked since start (preemptions and suspends)
    bytes_offloaded: int = 0
    bytes_restored: int = 0
    seconds_prefill: float = 0.0     # wall time in prefill forwards and their sampling
    seconds_decode: float = 0.0      # wall time in decode forwards and their sampling
    seconds_offload: float = 0.0     # K/V copies to host (synchronised on CUDA)
    seconds_restore: float = 0.0     # K/V copies back to the device
    kv_relocations: int = 0          # times the slab's live window was moved
    kv_pages_used: int = 0           # paged layout: pages held by rows (0 with the slab)
    kv_pages_free: int = 0           # paged layout: pages free
    prefill_tokens: int = 0          # prompt tokens run through prefill forwards since start
    prefill_chunks: int = 0          # forwards over part of a prompt (a chunk, or the rest after a cached prefix)
    prefix_lookup_tokens: int = 0    # prompt tokens looked up in the prefix cache
    prefix_hit_tokens_device: int = 0   # of those, found in its device tier
    prefix_hit_tokens_host: int = 0     # of those, found in its host tier
    prefix_bytes_device: int = 0     # K/V bytes the prefix cache holds on the device
    prefix_bytes_host: int = 0       # K/V bytes the prefix cache holds in host memory
    overlapped_steps: int = 0        # decode steps launched before the last one's events (overlap_decode)
    pipelined_steps: int = 0         # of those, launched before the last one's tokens were read (pipeline_decode)
    seconds_idle: float = 0.0        # the engine loop waiting for work (finished waits, see `settled`)
    waiting_since: Optional[float] = None   # monotonic time the current wait began; None while busy

    def settled(self, now: float) -> EngineStats:
        """These stats with the wait in progress counted as idle up to `now`."""
        if self.waiting_since is None:
            return self
        return msgspec.structs.replace(self, seconds_idle=self.seconds_idle + max(0.0, now - self.waiting_since),
                                       waiting_since=None)


class StepOutput(msgspec.Struct, frozen=True):
    """One engine step's events, one tuple per phase in the order they happened (parks and
    restores; each prefill group; the decode), and the stats after the step."""
    phases: tuple[tuple[RequestOutput, ...], ...]
    stats: EngineStats

    @property
    def events(self) -> list[RequestOutput]:
        return [event for phase in self.phases for event in phase]
