"""One engine step = schedule -> execute -> update.

`LLMEngine` is single-threaded (the engine thread in engine/api.py drives it). `step()` asks the
scheduler what changes, applies those changes to the K/V slab and runs at most two forwards (the
prefill of newcomers, then one decode of every row), then turns sampled tokens into stream events.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.detokenizer import IncrementalDetokenizer, fast_decoder
from engine.host_pool import HostPool
from engine.kv_slab import KVSlab
from engine.model_runner import ModelRunner
from engine.request import FinishReason, Request, RequestOutput, RequestState, stats_of
from engine.sampler import make_generator, sample
from engine.scheduler import Scheduler, SchedulerOutput

OutputSink = Callable[[RequestOutput], None]


@dataclass
class _Live:
    """Per-request engine state that is not scheduling data."""
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    sink: OutputSink
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""


def length_groups(requests, max_waste: float = 1.0) -> list[list[Request]]:
    """Split newcomers into prefill forwards of similar prompt length, so padding stays under
    `max_waste` of each forward's tokens (one long prompt must not pad thirty short ones).
    Measured on an H200 (7B shape): each eager forward costs ~55 ms of host overhead, so a tight
    bound (0.25) made many small forwards and doubled prefill time; 1.0 splits only wild mixes.
    On a CPU a forward costs its arithmetic, and padding is pure waste: 0.1 there (for 32 prompts
    of 32-512 tokens: 10.4 K padded tokens in 8 forwards instead of 16.3 K in one)."""
    groups: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt_ids)):
        group = groups[-1] if groups else None
        if group is not None:
            longest = len(request.prompt_ids)
            real = sum(len(r.prompt_ids) for r in group) + longest
            if longest * (len(group) + 1) <= real * (1 + max_waste):
                group.append(request)
                continue
        groups.append([request])
    return groups


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer,
                 eos_token_ids: tuple[int, ...], seed: int = 0, pressure: Callable[[], bool] = lambda: False,
                 pinned_arena_bytes: int = 0, prefill_max_waste: float = 1.0) -> None:
        self.runner = runner
        self.prefill_max_waste = prefill_max_waste
        self.slab: KVSlab = runner.slab
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self._decode = fast_decoder(tokenizer)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.host_kv: dict[str, torch.Tensor] = {}     # parked rows, [L, 2, H, n, D] each
        self._live: dict[str, _Live] = {}
        self._seeds = random.Random(seed)
        self._pressure = pressure
        # Parked rows: a pinned arena on CUDA (blocks of 64 tokens), plain memory on CPU.
        on_cuda = runner.device.type == "cuda"
        self.host_pool = HostPool(pinned_arena_bytes if on_cuda else 0, 64 * self.slab.bytes_per_token, pin=on_cuda)
        self.num_parked_total = 0          # rows parked since start (preemptions and suspends)
        self.bytes_offloaded = 0
        self.bytes_restored = 0
        self.seconds_prefill = 0.0         # wall time in prefill forwards + their sampling
        self.seconds_decode = 0.0          # wall time in decode forwards + their sampling
        self.seconds_offload = 0.0         # wall time of K/V copies to host (synchronised; parks are rare)
        self.seconds_restore = 0.0         # wall time of K/V copies back to the device
        # Called after each prefill group's events have gone to their sinks, mid-step: an engine
        # process sends them on at once (engine/process.py) instead of after the whole step.
        self.on_events: Callable[[], None] = lambda: None

    # ---- requests in -----------------------------------------------------------------------
    def add_request(self, request: Request, sink: OutputSink) -> None:
        self.scheduler.add(request)
        p = request.params
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else self._seeds.getrandbits(63)
            generator = make_generator(seed, self.runner.device)
        self._live[request.request_id] = _Live(IncrementalDetokenizer(self.tokenizer, p.stop, self._decode), generator, sink)
        sink(RequestOutput(request.request_id, state=RequestState.QUEUED,
                           queue_position=self.scheduler.queue_position(request, time.monotonic())))

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Request:
        request = self.scheduler.cancel(request_id, reason)
        self._emit_final(request)
        return request

    def suspend(self, request_id: str) -> Request:
        """Park now: a running row's K/V are copied out at the start of the next step."""
        request = self.scheduler.suspend(request_id, time.monotonic())
        self._live[request_id].sink(RequestOutput(request_id, state=RequestState.SUSPENDED))
        return request

    def resume(self, request_id: str) -> Request:
        request = self.scheduler.resume(request_id)
        self._live[request_id].sink(RequestOutput(request_id, state=request.state))
        return request

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        sched = self.scheduler.schedule(time.monotonic(), pressure=self._pressure())
        finished = self._execute(sched)
        self._update(sched, finished)

    def _execute(self, sched: SchedulerOutput) -> list[Request]:
        """Apply the schedule to the slab and run the forwards. Returns requests that finished."""
        for request in sched.free:
            self._drop_kv(request.request_id)
        self._park(sched.park)
        incoming = [len(r.prompt_ids) for r in sched.prefill] + [r.num_tokens for r in sched.restore]
        if incoming:
            self.slab.reserve(max(incoming))
        self._restore(sched.restore)
        finished: list[Request] = []
        for group in length_groups(sched.prefill, self.prefill_max_waste):
            started = time.monotonic()
            result = self.runner.prefill([r.prompt_ids for r in group])
            tokens = self._sample(group, result.logits)
            self.seconds_prefill += time.monotonic() - started
            for i, (request, token) in enumerate(zip(group, tokens)):
                if self._append(request, token):
                    finished.append(request)
                else:
                    self.slab.add_row(request.request_id, result.row_kv(i))
                    # its first token streams now, not after the other groups and the decode
                    self._send(request, state=RequestState.RUNNING)
            self.on_events()
        if self.slab.num_rows:
            by_id = {r.request_id: r for r in sched.decode}
            rows = [by_id[row_id] for row_id in self.slab.row_ids]
            started = time.monotonic()
            logits = self.runner.decode([r.output_ids[-1] for r in rows])
            tokens = self._sample(rows, logits)
            self.seconds_decode += time.monotonic() - started
            for request, token in zip(rows, tokens):
                if self._append(request, token):
                    finished.append(request)
        return finished

    def _park(self, requests: tuple[Request, ...]) -> None:
        """Copy these rows' K/V to host memory and take them out of the batch."""
        started = self._timed_start(bool(requests))
        for request in requests:
            kv = self.slab.take_row(request.request_id, self.host_pool.allocate)
            self.host_kv[request.request_id] = kv
            nbytes = kv.numel() * kv.element_size()
            request.bytes_offloaded += nbytes
            self.bytes_offloaded += nbytes
            self.num_parked_total += 1
        self.seconds_offload += self._timed_end(started)

    def _restore(self, requests: tuple[Request, ...]) -> None:
        """Embed parked K/V back into free rows (no recompute)."""
        started = self._timed_start(bool(requests))
        restored = []
        for request in requests:
            kv = self.host_kv.pop(request.request_id)
            self.slab.add_row(request.request_id, kv.to(self.runner.device, non_blocking=True))
            nbytes = kv.numel() * kv.element_size()
            request.bytes_restored += nbytes
            self.bytes_restored += nbytes
            restored.append(kv)
        self.seconds_restore += self._timed_end(started)   # synchronised: the copies are done
        for kv in restored:
            self.host_pool.release(kv)

    def _timed_start(self, active: bool) -> float | None:
        """Start timing a copy phase; on CUDA, drain queued work first so only the copy is timed."""
        if not active:
            return None
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        return time.monotonic()

    def _timed_end(self, started: float | None) -> float:
        if started is None:
            return 0.0
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        return time.monotonic() - started

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        lives = [self._live[r.request_id] for r in requests]
        # Seen ids are only needed (and only built) for rows with a repetition penalty.
        seen = [r.all_ids if r.params.has_penalty else [] for r in requests]
        return sample(logits, [r.params for r in requests], seen, [live.generator for live in lives])

    def _append(self, request: Request, token: int) -> bool:
        """Record one sampled token; return True when the request must stop."""
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
        request.output_ids.append(token)
        live = self._live[request.request_id]
        live.new_ids.append(token)
        live.new_text += live.detok.push([token])
        p = request.params
        if live.detok.stopped:
            request.finish_reason = FinishReason.STOP_SEQUENCE
        elif token in self.eos_token_ids and not p.ignore_eos:
            request.finish_reason = FinishReason.EOS
        elif len(request.output_ids) >= p.max_new_tokens or request.num_tokens + 2 > self.slab.max_len:
            request.finish_reason = FinishReason.LENGTH
        return request.finish_reason is not None

    def _update(self, sched: SchedulerOutput, finished: list[Request]) -> None:
        for request in finished:
            self._drop_kv(request.request_id)
            self.scheduler.finish(request, request.finish_reason)
        for request in sched.park:
            if request.state == RequestState.PREEMPTED:  # SUSPENDED was reported by suspend()
                self._send(request, state=request.state)
        done = {id(r) for r in finished}
        restored = {id(r) for r in sched.restore}
        for request in sched.restore:
            if id(request) not in done:
                self._send(request, state=RequestState.RUNNING)
        for request in sched.decode:   # newly prefilled rows included: their RUNNING went out already
            if id(request) not in done and id(request) not in restored:
                self._send(request)
        for request in finished:
            live = self._live[request.request_id]
            live.new_text += live.detok.flush()
            self._emit_final(request)

    def fail_batch(self, message: str, out_of_memory: bool = False) -> None:
        """An engine step raised: end the requests that were in the batch (their rows may be half
        updated) and any parked one whose K/V did not reach host memory; reset the slab. Queued
        and properly parked requests are untouched and run later."""
        broken = [r for r in list(self.scheduler.by_id.values())
                  if r.state == RequestState.RUNNING
                  or (r.state in (RequestState.PREEMPTED, RequestState.SUSPENDED)
                      and r.num_preemptions and r.request_id not in self.host_kv)]
        for request in broken:
            request.error = message
            self.scheduler.cancel(request.request_id, FinishReason.ERROR)
            self._emit_final(request, out_of_memory=out_of_memory)
        self.scheduler.clear_pending()   # their rows are removed right here
        for row_id in list(self.slab.row_ids):
            self.slab.remove_row(row_id)

    def close(self) -> None:
        """Release device memory now (slab, graphs), even if references to the engine linger."""
        self.runner.graphs = None
        self.slab.data = torch.empty(0, device=self.slab.data.device)
        self.host_kv.clear()

    # ---- events out ------------------------------------------------------------------------
    def _send(self, request: Request, state: RequestState | None = None) -> None:
        live = self._live[request.request_id]
        if not (live.new_ids or live.new_text or state is not None):
            return
        event = RequestOutput(request.request_id, text=live.new_text, token_ids=tuple(live.new_ids), state=state)
        live.new_ids, live.new_text = [], ""
        live.sink(event)

    def _emit_final(self, request: Request, out_of_memory: bool = False) -> None:
        live = self._live.pop(request.request_id)
        live.sink(RequestOutput(
            request.request_id, text=live.new_text, token_ids=tuple(live.new_ids),
            state=RequestState.FINISHED, finish_reason=request.finish_reason, error=request.error,
            out_of_memory=out_of_memory,
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.output_ids),
            stats=stats_of(request, time.monotonic())))

    def _drop_kv(self, request_id: str) -> None:
        if request_id in self.slab.row_ids:
            self.slab.remove_row(request_id)
        kv = self.host_kv.pop(request_id, None)
        if kv is not None:
            self.host_pool.release(kv)
