"""Prefix cache: K/V of token prefixes kept across requests, in two tiers (device, then host).

Requests that start with the same tokens (a shared system prompt; a chat history resent every
turn) have the same K/V for those tokens. The cache keeps them by *blocks* of `block_size` tokens,
each named by a hash chained over every token before it (so a block is found only after the very
same prefix; vLLM's scheme, written here). A request whose prompt starts with cached blocks gets
their K/V copied into its prefill K/V and prefills only the rest (engine/engine.py), and at least
its last prompt token is always computed (its logits give the first output token).

Tiers: a block store in device memory (`device_bytes`, preallocated beside the K/V pool) and,
with "device+host", one in host memory (`host_bytes`; pinned on CUDA). The host tier is inclusive
(write-through): a block new to the cache goes to the device tier and is copied down to the host
tier at once, on a stream of its own (CUDA: the copy engine, while the model runs), so when the
device tier is full its least recently used block is simply dropped there: no copy on the compute
stream at the moment a slot is needed (note 29: copying down then stalled every running stream,
and the host tier read as cost, note 22). A hit from the host tier copies the block back up (a
second hit is a device hit), and a block that a request's own K/V holds again (a finished turn's
history) goes back to the device tier from them, without crossing the host link. Every use of a
block moves it to the recent end of both tiers' orders. Blocks are copies, not shared pages: a
cached prefix is never written, so preempting, suspending or cancelling the request it came from
cannot change it. Which blocks sit in which tier never depends on timing (a tensor-parallel
follower's cache makes the same moves as rank 0's); a slot is rewritten, and a host block read,
only after the copy down that involves it (an event the compute stream waits on, long passed).
A load gathers its device blocks at once, on the caller's stream, and copies its host blocks up
on a second stream (CUDA: the host link works while the GPU runs the decode and other prefills);
`loaded(key)` says whether a load's copies are done, and `ready(keys)` orders the reader (the
prefill forward) after them and only then brings those blocks up into the device tier (on the
caller's stream, like every write of the device tier, so no write of a slot races a read of it).
A load may stay in flight across steps (the engine prefills a request whose prefix comes from
host memory once its copies have landed, note 30): a copy down into a host slot that a load in
flight still reads waits for that load.

Invariants: every indexed hash has one slot in the device tier, the host tier or both (the host
tier may drop a device block's copy when it is full); a slot is free or holds exactly one indexed
hash; a block is indexed only after its predecessor (a chain has no holes).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

MODES = ("off", "device", "device+host")


def block_hashes(token_ids: list[int], block_size: int, limit: int | None = None) -> list[bytes]:
    """The chained hash of each full block of `token_ids` (at most `limit` blocks)."""
    count = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    out, prev = [], b""
    for b in range(count):
        block = array("q", token_ids[b * block_size:(b + 1) * block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        out.append(prev)
    return out


class _Tier:
    """Fixed slots of one block each: data [N, L, 2, H, B, D]."""

    def __init__(self, name: str, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, pin: bool) -> None:
        self.name = name
        self.data = torch.empty((num_slots, *block_shape), dtype=dtype, device=device, pin_memory=pin)
        self.free = list(range(num_slots - 1, -1, -1))
        self.lru: OrderedDict[bytes, int] = OrderedDict()   # hash -> slot, least recent first

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def bytes_used(self) -> int:
        return len(self.lru) * self.data[0].numel() * self.data.element_size() if self.capacity else 0


@dataclass
class PrefixHit:
    tokens: int          # prompt tokens whose K/V come from the cache
    device_tokens: int   # of those, found in the device tier
    host_tokens: int     # of those, found in the host tier


class PrefixCache:
    def __init__(self, mode: str, block_size: int, dims: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device, device_bytes: int, host_bytes: int, bring_up: float = 1.0) -> None:
        """`bring_up`: blocks found in the host tier alone go back to the device tier (from a
        load's copy, or from a finished request's own K/V), at most this fraction of the device
        tier's slots for one load or insert (1: all of them; 0: never, the device tier takes new
        blocks only). Note 30: a device tier much smaller than a burst's histories turns over with
        them when every history comes back up."""
        if mode not in MODES:
            raise ValueError(f"prefix_cache must be one of {MODES}, got {mode!r}")
        L, H, D = dims
        self.block_size = block_size
        shape = (L, 2, H, block_size, D)
        block_bytes = L * 2 * H * block_size * D * dtype.itemsize
        self.device_tier = _Tier("device", device_bytes // block_bytes, shape, dtype, device, pin=False)
        host_slots = host_bytes // block_bytes if mode == "device+host" else 0
        self.host_tier = _Tier("host", host_slots, shape, dtype, torch.device("cpu"),
                               pin=device.type == "cuda" and host_slots > 0)
        streams = device.type == "cuda" and host_slots > 0
        self._copies = torch.cuda.Stream(device) if streams else None   # copies down (device -> host)
        self._loads = torch.cuda.Stream(device) if streams else None    # loads (host -> device)
        self._pending: dict[str, tuple[object, torch.Tensor, list]] = {}   # key -> (event: its host copies
        #                                               are done, where they went, [(hash, block index)])
        self._reading: dict[int, object] = {}         # host slot -> event of the last load reading it
        self._copied: dict[tuple[str, int], object] = {}   # (tier, slot) -> event of the copy down that used it
        if not 0.0 <= bring_up <= 1.0:
            raise ValueError(f"prefix_cache_bring_up must be within [0, 1], got {bring_up}")
        self.bring_up = bring_up
        # what the tiers did (benchmarks): device slots reused (evictions), copies down, blocks
        # brought back up, and writes of a device slot (CUDA) that found its copy down still running
        self.counts = {"evictions": 0, "copies_down": 0, "brought_up": 0, "waits_on_copy_down": 0}
        self.lookup_tokens = 0                        # prompt tokens looked up
        self.hit_tokens = {"device": 0, "host": 0}    # of those, found in each tier

    # ---- lookups ---------------------------------------------------------------------------
    def match(self, prompt_ids: list[int]) -> tuple[list[bytes], list[str]]:
        """The longest chain of cached blocks at the start of the prompt, leaving at least its last
        token to compute. -> (hashes, tier name of each)."""
        limit = (len(prompt_ids) - 1) // self.block_size
        hashes, tiers = [], []
        for h in block_hashes(prompt_ids, self.block_size, limit):
            tier = "device" if h in self.device_tier.lru else "host" if h in self.host_tier.lru else None
            if tier is None:
                break
            hashes.append(h)
            tiers.append(tier)
        return hashes, tiers

    @property
    def async_loads(self) -> bool:
        """Host blocks are copied up on a stream of their own: a load may still be in flight."""
        return self._loads is not None

    def load(self, prompt_ids: list[int], out: torch.Tensor, key: str = "") -> PrefixHit:
        """Copy the cached prefix of `prompt_ids` into out[..., :n, :] (out: [L, 2, H, >= n, D], on
        the device) and count the lookup. -> what was found. Device blocks are gathered now, on
        the current stream; with a host tier on CUDA the host blocks' copies run on a stream of
        their own, after the work queued so far: call `ready([key])` before reading `out`."""
        hashes, tiers = self.match(prompt_ids)
        self.lookup_tokens += len(prompt_ids)
        if not hashes:
            return PrefixHit(0, 0, 0)
        B = self.block_size
        self._gather([(h, i) for i, (h, t) in enumerate(zip(hashes, tiers)) if t == "device"], out)
        up = [(h, i) for i, (h, t) in enumerate(zip(hashes, tiers)) if t == "host"]
        if up and self._loads is None:
            for h, i in up:
                out[..., i * B:(i + 1) * B, :].copy_(self.host_tier.data[self.host_tier.lru[h]])
        elif up:
            self._loads.wait_stream(torch.cuda.current_stream())   # `out` is made on that stream
            slots = [self.host_tier.lru[h] for h, _i in up]
            with torch.cuda.stream(self._loads):
                for (h, i), slot in zip(up, slots):
                    self._wait("host", slot)   # its copy down, if still in flight
                    out[..., i * B:(i + 1) * B, :].copy_(self.host_tier.data[slot], non_blocking=True)
                out.record_stream(self._loads)   # its memory is not reused before these copies end
                done = torch.cuda.Event()
                done.record(self._loads)
            self._reading.update((slot, done) for slot in slots)
            self._pending[key] = (done, out, up)
        for h in hashes:
            self._touch(h)
        if up and self._loads is None:
            self._bring_up(out, up)
        hit = PrefixHit(len(hashes) * B, tiers.count("device") * B, len(up) * B)
        self.hit_tokens["device"] += hit.device_tokens
        self.hit_tokens["host"] += hit.host_tokens
        return hit

    def loaded(self, key: str) -> bool:
        """The load `key`'s copies are done (no wait)."""
        pending = self._pending.get(key)
        return pending is None or pending[0].query()

    def ready(self, keys: list[str]) -> None:
        """The current stream waits for the copies of the loads `keys` (no host sync), and their
        host blocks go up to the device tier from where the copies landed."""
        for key in keys:
            pending = self._pending.pop(key, None)
            if pending is not None:
                done, out, up = pending
                torch.cuda.current_stream().wait_event(done)
                self._bring_up(out, up)

    def forget(self, key: str) -> None:
        """The request of load `key` is gone before its prefill: its copies are not waited for (its
        partial K/V is released only after them, record_stream) and its blocks not brought up."""
        self._pending.pop(key, None)

    def _gather(self, blocks: list[tuple[bytes, int]], out: torch.Tensor) -> None:
        """Device blocks (hash, block index in the prompt) into `out`, on the current stream: one
        gather when they are the prompt's first blocks (the usual case), else one copy each."""
        if not blocks:
            return
        B, data = self.block_size, self.device_tier.data
        if [i for _h, i in blocks] == list(range(len(blocks))):   # [n, L, 2, H, B, D] -> [L, 2, H, n * B, D]
            slots = torch.tensor([self.device_tier.lru[h] for h, _i in blocks], device=data.device)
            n = len(blocks) * B
            gathered = data.index_select(0, slots).permute(1, 2, 3, 0, 4, 5)
            out[..., :n, :].copy_(gathered.reshape(*out.shape[:3], n, out.shape[-1]))
        else:
            for h, i in blocks:
                out[..., i * B:(i + 1) * B, :].copy_(data[self.device_tier.lru[h]])

    def _bring_up(self, out: torch.Tensor, up: list[tuple[bytes, int]]) -> None:
        """Blocks copied up from the host tier (now in `out`) into the device tier too, unless it
        holds them already (an insert since); one the host tier dropped meanwhile is still right."""
        B, budget = self.block_size, self._bring_up_budget()
        for h, i in up:
            if budget > 0 and h not in self.device_tier.lru:
                self._to_device(h, out[..., i * B:(i + 1) * B, :])
                budget -= 1

    def _bring_up_budget(self) -> float:
        """Blocks one load or insert may bring back up to the device tier (1: no limit; a fraction
        above 0 allows at least one block, however small the tier)."""
        if self.bring_up >= 1.0:
            return float("inf")
        if self.bring_up <= 0.0:
            return 0
        return max(1, int(self.bring_up * self.device_tier.capacity))

    # ---- inserts ---------------------------------------------------------------------------
    def insert(self, token_ids: list[int], kv: torch.Tensor) -> None:
        """Keep the K/V ([L, 2, H, >= n, D], on the device) of every full block of `token_ids`: new
        blocks to the device tier (and down to the host tier), blocks only the host tier holds back
        up to the device tier from `kv`."""
        B, budget = self.block_size, self._bring_up_budget()
        for i, h in enumerate(block_hashes(token_ids, B)):
            if h in self.device_tier.lru:
                self._touch(h)
                continue
            block = kv[..., i * B:(i + 1) * B, :]
            if h in self.host_tier.lru:
                self._touch(h)
                if budget > 0:
                    self._to_device(h, block)
                    budget -= 1
                continue
            slot = self._device_slot()
            if slot is None:
                return
            self.device_tier.data[slot].copy_(block)
            self.device_tier.lru[h] = slot
            self._copy_down(h, slot)

    def _touch(self, h: bytes) -> None:
        for tier in (self.device_tier, self.host_tier):
            if h in tier.lru:
                tier.lru.move_to_end(h)

    def _to_device(self, h: bytes, on_device: torch.Tensor) -> None:
        """A block the host tier holds, also in the device tier now, from `on_device` (a copy of
        it already on the device: a load's, or a request's own K/V)."""
        slot = self._device_slot()
        if slot is None:   # no device tier at all: it stays in host memory
            return
        self.device_tier.data[slot].copy_(on_device)
        self.device_tier.lru[h] = slot
        self.counts["brought_up"] += 1

    def _device_slot(self) -> int | None:
        """A device slot to write now: a free one, else the least recently used block's (dropped:
        the host tier holds its copy, or it is gone)."""
        tier = self.device_tier
        if tier.free:
            slot = tier.free.pop()
        elif tier.lru:
            _h, slot = tier.lru.popitem(last=False)
            self.counts["evictions"] += 1
        else:
            return None
        copied = self._copied.get(("device", slot))
        if copied is not None and not copied.query():
            self.counts["waits_on_copy_down"] += 1
        self._wait("device", slot)   # a copy down still reading it
        return slot

    def _copy_down(self, h: bytes, slot: int) -> None:
        """The host tier's copy of device block `slot` (hash h), if it has a host tier."""
        host_slot = self._host_slot()
        if host_slot is None:
            return
        src, dst = self.device_tier.data[slot], self.host_tier.data[host_slot]
        self.host_tier.lru[h] = host_slot
        self.counts["copies_down"] += 1
        if self._copies is None:   # CPU: in order on the one stream
            dst.copy_(src)
            return
        # after everything queued so far (the block's own write; reads of the host slot's old
        # block, a load in flight's among them); pinned: asynchronous, on the copy engine while
        # the compute stream goes on
        self._copies.wait_stream(torch.cuda.current_stream())
        reading = self._reading.pop(host_slot, None)
        if reading is not None:
            self._copies.wait_event(reading)
        with torch.cuda.stream(self._copies):
            dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copies)
        self._copied["device", slot] = self._copied["host", host_slot] = copied

    def _host_slot(self) -> int | None:
        tier = self.host_tier
        if tier.free:
            return tier.free.pop()
        if not tier.lru:
            return None
        _h, slot = tier.lru.popitem(last=False)   # dropped from the host tier (the device may keep it)
        return slot

    def _wait(self, tier: str, slot: int) -> None:
        copied = self._copied.pop((tier, slot), None)
        if copied is not None:   # the compute stream waits for that copy (no host sync)
            torch.cuda.current_stream().wait_event(copied)

    # ---- figures ---------------------------------------------------------------------------
    def bytes_used(self) -> dict[str, int]:
        return {"device": self.device_tier.bytes_used, "host": self.host_tier.bytes_used}

    def check(self) -> None:
        """The invariants (tests)."""
        for tier in (self.device_tier, self.host_tier):
            slots = list(tier.lru.values())
            assert len(slots) == len(set(slots)) and not set(slots) & set(tier.free)
            assert len(slots) + len(tier.free) == tier.capacity
