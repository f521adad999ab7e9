"""One engine step = schedule -> execute -> update, and the step's events returned as a value.

`LLMEngine` is single-threaded: the command loop (engine/loop.py) drives it, in a thread of the
server or in the engine process. Commands (`add_request`, `abort`, `preempt`) return the events
they cause; `step()` returns a `StepOutput`. Nothing leaves the engine by callback.

A step runs in phases, and `step_phases()` yields each phase's events as soon as it is done, so
a prefill group's first tokens can reach their streams before the batch's decode runs:
  1. membership: rows ended by a command are dropped, rows chosen by the scheduler are parked in
     host memory, parked rows are restored (no recompute);
  2. one phase per prefill group: newcomers of similar length are prefilled together, on their
     own, and their K/V embedded into the batch (Baton's prefill/decode separation);
  3. decode: one token for every row of the batch; finished rows leave at once. On CUDA a steady
     step launches the next step's decode before it detokenises and emits this one's tokens,
     and the next step is that decode alone (`overlap_decode`, see `step_phases`; `drain`); with
     `pipeline_decode` it launches it before it even reads this one's tokens (`_finish_decode`).

n completions (params.n > 1): the prompt is prefilled once, in its prefill group like any other;
then the request is forked into n completion rows (Scheduler.fork), the prompt's K/V embedded
into each row (a copy per row, in both layouts: rows never share K/V, so each is parked, restored
and freed on its own), and the first token of each row sampled from the same logits with the
row's own sampling state. Each row then decodes, stops and finishes on its own; its events go out
under the request's id with its `index`, and the request's stream ends with its last completion.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer, fast_decoder
from engine.errors import NotOwner
from engine.grammar import Grammars, RowGrammar
from engine.host_pool import HostPool, ParkedKV
from engine.kv_slab import KVSlab
from engine.model_runner import ModelRunner
from engine.prefix_cache import PrefixCache
from engine.outputs import EngineStats, StepOutput
from engine.request import (FinishReason, PreemptAction, Request, RequestOutput, RequestState, TokenLogprob,
                            stats_of)
from engine.sampler import PendingSample, Sampler, make_generator
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tensor_parallel import (CacheInsert, CacheLoad, Chunk, Decode, Drop, Embed, EmbedChunked, PackedPrefill, Park,
                                    Prefill, Reserve, Restore, Shards, share_ids)

Events = tuple[RequestOutput, ...]


@dataclass
class _Live:
    """Per-request engine state that is not scheduling data."""
    detok: IncrementalDetokenizer
    generator: torch.Generator | None     # only for a sampled request with its own seed
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)   # with params.logprobs: one per new id
    grammar: RowGrammar | None = None     # with params.response_format


@dataclass
class _Counters:
    steps: int = 0
    step_errors: int = 0
    parks: int = 0                 # rows parked since start (preemptions and suspends)
    bytes_offloaded: int = 0
    bytes_restored: int = 0
    seconds_prefill: float = 0.0
    seconds_decode: float = 0.0
    seconds_offload: float = 0.0
    seconds_restore: float = 0.0
    prefill_tokens: int = 0
    prefill_chunks: int = 0
    overlapped_steps: int = 0
    pipelined_steps: int = 0       # of those, launched from the sampled ids on the device (pipeline_decode)


def length_groups(requests, max_waste: float = 1.0) -> list[list[Request]]:
    """Split newcomers into prefill forwards of similar prompt length, so padding stays under
    `max_waste` of each forward's tokens (one long prompt must not pad thirty short ones).
    A GPU forward is dominated by per-forward host overhead, so a loose bound (1.0) that splits
    only wild mixes suits it; on a CPU padding is pure arithmetic waste, so a tight one (0.1)."""
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
                 pinned_arena_bytes: int = 0, prefill_max_waste: float = 1.0,
                 prefix_cache: PrefixCache | None = None, grammars: Grammars | None = None,
                 shards: Shards | None = None, decode_before_prefill: bool = True,
                 overlap_decode: bool = False, pipeline_decode: bool = False) -> None:
        """`grammars`: compiles structured-output requests' grammars (None: none may come).
        `shards`: tensor parallelism; every K/V operation and forward is sent to the other ranks
        before this rank runs it (engine/tensor_parallel.py). `decode_before_prefill`,
        `overlap_decode`: see step_phases; `pipeline_decode` (with overlap_decode): see _finish_decode."""
        self.decode_before_prefill = decode_before_prefill
        self.overlap_decode = overlap_decode
        self.pipeline_decode = overlap_decode and pipeline_decode
        # The next step's decode, launched early by a steady step (see step_phases): (rows, logits, seconds)
        self._inflight: tuple[list[Request], torch.Tensor, float] | None = None
        self._stashed: Events = ()   # events of a decode drained inside a command, out with the next step
        self.runner = runner
        self.slab: KVSlab = runner.slab
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.prefill_max_waste = prefill_max_waste
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(runner.device, seed, tuple(eos_token_ids))
        self.grammars = grammars
        self._decode_text = fast_decoder(tokenizer)
        self._live: dict[str, _Live] = {}
        self._pressure = pressure
        self._counts = _Counters()
        self._partial: dict[str, torch.Tensor] = {}   # chunked prefill: K/V of prompts not yet whole
        self._loading: dict[str, Request] = {}   # held while their cached prefix comes up from host (in order)
        self.prefix_cache = prefix_cache
        self.shards = shards
        # Parked rows: a pinned arena on CUDA (blocks of 64 tokens), plain memory on CPU.
        on_cuda = runner.device.type == "cuda"
        self.parked = ParkedKV(HostPool(pinned_arena_bytes if on_cuda else 0, 64 * self.slab.bytes_per_token,
                                        pin=on_cuda))

    # ---- commands (between steps) -----------------------------------------------------------
    def add_request(self, request: Request) -> RequestOutput:
        """Queue a request; raises DuplicateRequest. -> its QUEUED event."""
        self.scheduler.add(request)
        self._live[request.request_id] = self._new_live(request)
        return RequestOutput(request.request_id, state=RequestState.QUEUED,
                             queue_position=self.scheduler.queue_position(request, time.monotonic()))

    def _new_live(self, request: Request) -> _Live:
        p = request.params
        generator = (make_generator(p.seed, self.runner.device)
                     if not p.greedy and p.seed is not None and request.n == 1 else None)
        grammar = self.grammars.for_request(*p.response_format) if p.response_format else None   # compiles off-step
        return _Live(IncrementalDetokenizer(self.tokenizer, p.stop, self._decode_text, p.include_stop_sequence),
                     generator, grammar=grammar)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Events:
        """End a request now, all its completions (rows or parked K/V are freed at the next step).
        -> their final events (the last one ends the stream). Raises UnknownRequest / RequestFinished."""
        with self._drained() as drained:
            rows = self.scheduler.members(request_id)
        return drained + tuple(self._final(self.scheduler.cancel(r.request_id, reason)) for r in rows)

    def preempt(self, request_id: str, action: PreemptAction, priority: int | None = None,
                owner: str | None = None) -> tuple[RequestState, Events]:
        """One Preempt call: -> (the request's state after it, the events it caused). Raises
        UnknownRequest, RequestFinished, NotOwner or HostPoolFull; on a raise nothing changed.
        A request of n completions: the call acts on all its unfinished completions (one state
        event each, with its index); the state returned is the first one's."""
        with self._drained() as drained:
            state, events = self._preempt(request_id, action, priority, owner)
        return state, drained + events

    def _preempt(self, request_id: str, action: PreemptAction, priority: int | None,
                 owner: str | None) -> tuple[RequestState, Events]:
        rows = self.scheduler.members(request_id)
        if owner is not None and rows[0].owner != owner:
            raise NotOwner(f"request_id {request_id!r} belongs to another caller")
        if action == PreemptAction.SUSPEND:   # first: a refused SUSPEND must leave the priority alone
            rows = self.scheduler.suspend_members(request_id, time.monotonic())
        if priority is not None:
            for row in rows:
                self.scheduler.set_priority(row.request_id, priority)
        if action == PreemptAction.SUSPEND:
            return rows[0].state, tuple(self._event(r, state=RequestState.SUSPENDED) for r in rows)
        if action == PreemptAction.RESUME:
            rows = [self.scheduler.resume(r.request_id) for r in rows]
            return rows[0].state, tuple(self._event(r, state=r.state) for r in rows)
        if action == PreemptAction.CANCEL:
            return RequestState.FINISHED, self.abort(request_id)
        return rows[0].state, ()

    def has_work(self) -> bool:
        # a decode launched early is finished even when its rows have all stopped meanwhile (a
        # pipelined step after their last tokens), so nothing stays in flight while the loop idles
        return self.scheduler.has_work() or bool(self._stashed) or self._inflight is not None

    def drain(self) -> Events:
        """Finish the decode step a steady step launched early, if any (see step_phases): sample
        it, append each row's token, end the rows that stop. -> their events. The command loop
        calls this before a command that acts on running requests, so that their K/V and their
        outputs agree (a parked row must hold the token its K/V was computed for) and the events
        go out at once; `abort` and `preempt` drain too, for callers that do not."""
        if self._inflight is None:
            return ()
        launched, self._inflight = self._inflight, None
        return self._finish_decode(*launched, overlap=False)

    @contextlib.contextmanager
    def _drained(self) -> Iterator[Events]:
        """A command's first move: drain; the events go before the command's own, or, if the
        command raises, out with the next step."""
        drained = self.drain()
        try:
            yield drained
        except BaseException:
            self._stashed += drained
            raise

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> StepOutput:
        phases = tuple(phase for phase in self.step_phases() if phase)
        return StepOutput(phases=phases, stats=self.stats())

    def step_phases(self) -> Iterator[Events]:
        """Run one step, yielding each phase's events when the phase is done. The caller runs the
        iterator to its end before the next command (a step is never interleaved with commands).

        With `decode_before_prefill` (on CUDA by default) a step that has prefill work launches the
        running rows' decode step first (a CUDA graph: the host is free at once) and samples it
        after the prefill: the host issues the prefill forward (eager, ~20-40 ms of host time on
        an H200, note 26) while the GPU runs the decode step, instead of after it. The rows that
        this step's prefill adds take their first decode step in the next one (their first token
        comes from the prefill, as always).

        With `overlap_decode` (on CUDA by default) a steady step launches the next step's decode
        as soon as its tokens are sampled, before it detokenises them, checks stop sequences and
        builds and sends their events: the GPU decodes while the host does that (~1 ms a step of
        idle GPU otherwise, note 28). Steady: nothing for the scheduler to do (no request waiting,
        no row to free or park, no prompt in chunks, no memory pressure) and no row of the step
        stopping or able to stop on its text (stop sequences, grammars). The next step is then
        that decode alone; if anything arrived meanwhile it only finishes it, and the step after
        schedules as usual. Commands that act on running requests drain it first (`drain`).
        Each row's tokens are the same either way: rows are independent in a decode step."""
        if self._stashed:
            stashed, self._stashed = self._stashed, ()
            yield stashed
        if self._inflight is not None:   # this step is the decode the last one launched early
            launched, self._inflight = self._inflight, None
            yield self._finish_decode(*launched, overlap=True)
            self._counts.steps += 1
            return
        sched = self.scheduler.schedule(time.monotonic(), pressure=self._pressure())
        yield self._membership(sched)
        whole, cached, held = list(sched.prefill), [], set()
        if self.prefix_cache is not None:   # a cached prefix: embed it, prefill only the rest
            for request in whole:
                hashes, tiers = self.prefix_cache.match(request.prompt_ids)
                if hashes:
                    cached.append(request)
                    # host blocks copied up on their own stream: it is prefilled once they have
                    # landed (a later step, unless it is this step's only prefill work), so the link
                    # works while the GPU decodes and prefills others (note 30)
                    if self.prefix_cache.async_loads and "host" in tiers:
                        held.add(request.request_id)
            whole = [r for r in whole if r not in cached]
        chunks = list(sched.chunks)
        # the hits' cached prefixes load (a host tier's copies) while the decode runs; a prompt that
        # starts its chunks this step keeps the chunk graphs' workspace (a hit needs it one step)
        starting = any(start == 0 for _r, start, _e in chunks)
        for request in cached:   # a held request holds no chunk workspace meanwhile
            self._partial_kv(request, 0, workspace=not starting and request.request_id not in held)
            if request.request_id in held:
                self.scheduler.hold(request)
                self._loading[request.request_id] = request
        hits = [(r, 0, len(r.prompt_ids)) for r in cached if r.request_id not in held]
        hits += self._landed(alone=not (whole or hits or chunks))
        launched = None
        if self.decode_before_prefill and self.slab.num_rows and (whole or hits or chunks):
            launched = self._launch_decode()
        if self.runner.packed is not None:   # packed: the step's prefill work in one forward
            now, late = self._hold_first_chunks(whole, hits, chunks)
            if whole or hits or now:
                yield self._prefill(whole, hits + now)
            if late:
                yield self._prefill([], late)
        else:   # the HF forward pads, so similar lengths together; a chunk or rest is a forward of its own
            for request, start, end in hits:
                yield self._prefill_chunk(request, start, end)
            for group in length_groups(whole, self.prefill_max_waste):
                yield self._prefill(group)
            for request, start, end in chunks:
                yield self._prefill_chunk(request, start, end)
        if launched is not None:
            yield self._finish_decode(*launched, overlap=True)
        elif self.slab.num_rows:
            yield self._finish_decode(*self._launch_decode(), overlap=True)
        self._counts.steps += 1

    def _landed(self, alone: bool) -> list[tuple[Request, int, int]]:
        """Held requests whose cached prefix has come up from host memory, in the order they were
        held, for this step's prefill (their computed tokens within `max_prefill_tokens`; at least
        one). When the step has no other prefill work, the first is taken even if its copies are
        still in flight (the prefill then waits for them on the GPU, as a hit always did)."""
        taken, budget = [], self.scheduler.config.max_prefill_tokens
        for request_id, request in list(self._loading.items()):
            if taken and budget <= 0:
                break
            if self.prefix_cache.loaded(request_id) or (alone and not taken):
                del self._loading[request_id]
                self.scheduler.release(request)
                taken.append((request, 0, len(request.prompt_ids)))
                budget -= len(request.prompt_ids) - request.cached_prompt_tokens
        return taken

    def _hold_first_chunks(self, whole: list[Request], hits: list, chunks: list) -> tuple[list, list]:
        """-> (chunks for this step's forward, chunks for a second one). A chunk that starts a
        prompt looks the prefix cache up when its partial K/V is made; while this step's forward
        will insert prompts into the cache, it waits for a second forward, so it may still find a
        prefix it shares with them (a system prompt)."""
        inserting = whole or hits or any(end == len(r.prompt_ids) for r, _, end in chunks)
        if self.prefix_cache is None or not inserting:
            return chunks, []
        now, late = [], []
        for chunk in chunks:
            (now if chunk[0].request_id in self._partial else late).append(chunk)
        return now, late

    @torch.inference_mode()
    def _membership(self, sched: SchedulerOutput) -> Events:
        for request in sched.free:
            self._drop_kv(request.request_id)
        self._park(sched.park)
        incoming = [len(r.prompt_ids) for r in sched.prefill] + [r.num_tokens for r in sched.restore]
        if incoming:
            self._mirror(Reserve(max(incoming)))
            self.slab.reserve(max(incoming))
        self._restore(sched.restore)
        # SUSPENDED rows were reported by the SUSPEND command itself.
        parked = [self._event(r, state=r.state) for r in sched.park if r.state == RequestState.PREEMPTED]
        return (*parked, *(self._event(r, state=RequestState.RUNNING) for r in sched.restore))

    @torch.inference_mode()
    def _prefill(self, group: list[Request], rest: list[tuple[Request, int, int]] = ()) -> Events:
        """One forward for the group's prompts, then each prompt's first token. Two paths: the HF
        forward into a temporary K/V, each row then embedded; or, where the runner has it
        (engine/fused_prefill.py), packed prompts written straight into pages, so each prompt is
        already a row: one whose first token ends it leaves again, and n completions each take a
        copy of the prompt's row, which then goes. The packed forward also takes the step's
        chunks and rests after cached prefixes, `rest` ((request, start, end) prompt tokens, into
        the request's partial K/V; the last one of a prompt gives its first token, as
        `_prefill_chunk`)."""
        started = time.monotonic()
        prompts = [r.prompt_ids for r in group]
        in_pages = self.runner.packed is not None
        if in_pages:
            row_ids = [r.request_id for r in group]
            chunks = []   # (request, start, end, partial K/V) with tokens left to compute
            for request, start, end in rest:
                partial, start = self._partial_kv(request, start)
                if start < end:
                    chunks.append((request, start, end, partial))
            if not group and not chunks:   # every token of these chunks came from the cache
                return ()
            if self.prefix_cache is not None:   # the cached prefixes' copies into the partial K/V
                self.prefix_cache.ready([r.request_id for r, _a, _b, _kv in chunks])
            self._mirror(PackedPrefill(prompts, row_ids, [(r.request_id, len(r.prompt_ids), r.prompt_ids[a:b], a)
                                                          for r, a, b, _ in chunks]))
            logits = self.runner.packed.prefill(prompts, row_ids, [(kv, r.prompt_ids[a:b], a)
                                                                   for r, a, b, kv in chunks])
            # after the group's rows (a follower reads a PackedPrefill's rows until the next
            # other operation, such as a finished chunk's EmbedChunked)
            finished = []
            for j, (request, start, end, partial) in enumerate(chunks):
                self._count_chunk(request, start, end)
                if end == len(request.prompt_ids):
                    finished.append((request, partial, logits[len(group) + j:len(group) + j + 1]))
            logits = logits[:len(group)]

            def prompt_kv(i: int) -> torch.Tensor:
                return self.slab.row_kv(group[i].request_id)
        else:
            self._mirror(Prefill(prompts))
            result = self.runner.prefill(prompts)
            logits, prompt_kv = result.logits, result.row_kv
            finished = []
        events = self._prefilled_whole(group, logits, prompt_kv, in_pages) if group else []
        for request, partial, last in finished:
            events.extend(self._prefilled_in_chunks(request, partial, last))
        self._counts.seconds_prefill += time.monotonic() - started
        return tuple(events)

    def _prefilled_whole(self, group: list[Request], logits: torch.Tensor, prompt_kv, in_pages: bool) -> list:
        """The group's prompts are prefilled (`logits` [m, V] of their last tokens; `prompt_kv(i)`
        the K/V of prompt i): each prompt's first token, and its rows."""
        prompts = [r.prompt_ids for r in group]
        self._counts.prefill_tokens += sum(len(p) for p in prompts)
        rows, source = [], []   # the batch rows these prompts become, and the prompt of each
        for i, request in enumerate(group):
            forked = self._fork(request)
            rows.extend(forked)
            source.extend([i] * len(forked))
        if len(rows) > len(group):   # n completions: each row samples from its prompt's logits
            logits = logits.index_select(0, torch.tensor(source).to(logits.device, non_blocking=True))
        tokens = self._sample(rows, logits)
        if self.prefix_cache is not None:
            for i, request in enumerate(group):
                self._mirror(CacheInsert(request.prompt_ids, row_id=request.request_id) if in_pages
                             else CacheInsert(request.prompt_ids, index=i))
                self.prefix_cache.insert(request.prompt_ids, prompt_kv(i))
        events = []
        for row, i, token in zip(rows, source, tokens):
            if self._append(row, token):
                events.append(self._finish(row))   # a row already in pages leaves with it
                continue
            if not (in_pages and row is group[i]):   # in pages already: the prompt's own row
                self._mirror(Embed(row.request_id, i))
                self.slab.add_row(row.request_id, prompt_kv(i))   # n completions: a copy per row
            events.append(self._flush(row, state=RequestState.RUNNING))
        if in_pages:   # the prompt rows of n completions have served their copies
            for request in group:
                if request.n > 1:
                    self._mirror(Drop(request.request_id))
                    self.slab.remove_row(request.request_id)
        return events

    def _fork(self, request: Request) -> list[Request]:
        """A prefilled request's batch rows: itself, or its n completion rows (each with its own
        detokenizer, stop matching, generator from its derived seed, and grammar state)."""
        if request.n == 1:
            return [request]
        rows = self.scheduler.fork(request)
        del self._live[request.request_id]
        for row in rows:
            self._live[row.request_id] = self._new_live(row)
        return rows

    @torch.inference_mode()
    def _prefill_chunk(self, request: Request, start: int, end: int) -> Events:
        """Prompt tokens [start, end) into the request's partial K/V; after the last chunk, its
        first token and, unless that ends it, its row (embedded like a whole prefill)."""
        started = time.monotonic()
        prompt = request.prompt_ids
        kv, start = self._partial_kv(request, start)
        if start >= end:   # this chunk's tokens all came from the cache
            return ()
        if self.prefix_cache is not None:
            self.prefix_cache.ready([request.request_id])
        self._mirror(Chunk(request.request_id, len(prompt), prompt[start:end], start))
        logits = self.runner.prefill_chunk(kv, prompt[start:end], start)
        self._count_chunk(request, start, end)
        events = self._prefilled_in_chunks(request, kv, logits) if end == len(prompt) else ()
        self._counts.seconds_prefill += time.monotonic() - started
        return events

    def _partial_kv(self, request: Request, start: int, workspace: bool = True) -> tuple[torch.Tensor, int]:
        """The partial K/V of a prompt prefilled in chunks (made at its first chunk, with the cached
        prefix copied in), and where this chunk's computed tokens start (past the cached ones)."""
        prompt = request.prompt_ids
        kv = self._partial.get(request.request_id)
        if kv is None:
            kv = self._partial[request.request_id] = self.runner.new_partial_kv(len(prompt), workspace)
            if self.prefix_cache is not None:   # copy the cached prefix in; never the last token
                self._mirror(CacheLoad(request.request_id, prompt))
                hit = self.prefix_cache.load(prompt, kv[:, :, 0], request.request_id)
                request.cached_prompt_tokens = hit.tokens
                request.cached_prompt_tokens_host = hit.host_tokens
        return kv, max(start, request.cached_prompt_tokens)

    def _drop_partial(self, request_id: str) -> None:
        self._loading.pop(request_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.forget(request_id)   # a load still pending: never brought up
        partial = self._partial.pop(request_id, None)
        if partial is not None:
            self.runner.release_partial(partial)

    def _count_chunk(self, request: Request, start: int, end: int) -> None:
        if end - start < len(request.prompt_ids):   # part of a prompt (a chunk, or the rest after a cached prefix)
            self._counts.prefill_chunks += 1
        self._counts.prefill_tokens += end - start

    def _prefilled_in_chunks(self, request: Request, kv: torch.Tensor, logits: torch.Tensor) -> Events:
        """A prompt's last chunk is done (`logits` [1, V] of its last token): its first token and,
        unless that ends it, its row, embedded from the partial K/V like a whole prefill."""
        prompt = request.prompt_ids
        self._drop_partial(request.request_id)   # its workspace is reused only after these copies (stream order)
        prompt_kv = kv[:, :, 0, :, :len(prompt)]
        if self.prefix_cache is not None:
            self._mirror(CacheInsert(prompt, partial=request.request_id))
            self.prefix_cache.insert(prompt, prompt_kv)
        rows = self._fork(request)
        if len(rows) > 1:
            logits = logits.index_select(0, torch.zeros(len(rows), dtype=torch.long, device=logits.device))
        tokens = self._sample(rows, logits)
        events = []
        for row, token in zip(rows, tokens):
            if self._append(row, token):
                events.append(self._finish(row))
            else:
                # followers: the partial K/V are the request's; with n > 1 each row gets a copy
                self._mirror(EmbedChunked(row.request_id, len(prompt),
                                          source=request.request_id if len(rows) > 1 else ""))
                self.slab.reserve(len(prompt))
                self.slab.add_row(row.request_id, prompt_kv)   # n completions: a copy per row
                events.append(self._flush(row, state=RequestState.RUNNING))
        if len(rows) > 1:   # the rows have ids of their own: the followers' partial K/V can go
            self._mirror(Drop(request.request_id))
        return tuple(events)

    @torch.inference_mode()
    def _launch_decode(self, sampled: torch.Tensor | None = None) -> tuple[list[Request], torch.Tensor, float]:
        """Issue one decode step for every row in the batch now; `sampled`: the rows' input ids
        on the device, the last step's draw in the same rows' order (see _finish_decode), else
        each row's last output id. -> (the rows, their logits (on CUDA still being computed), the
        seconds this took: counted when the step is finished, so that the phase in between (the
        prefill) does not read as decode time)."""
        by_id = self.scheduler.by_id   # not the schedule's decode list: it predates the rows forked this step
        rows = [by_id[row_id] for row_id in self.slab.row_ids]
        started = time.monotonic()
        if sampled is None:
            input_ids = [r.output_ids[-1] for r in rows]
            self._mirror(Decode(input_ids))
        else:
            input_ids = sampled
            self._mirror(Decode([], on_device=True))
            if self.shards is not None:
                share_ids(sampled)
        logits = self.runner.decode(input_ids)
        return rows, logits, time.monotonic() - started

    @torch.inference_mode()
    def _finish_decode(self, rows: list[Request], logits: torch.Tensor, launch_seconds: float,
                       overlap: bool = False) -> Events:
        """Sample the step, append each row's token, end the rows that stop. -> their events.
        With `overlap` the next decode is launched once the tokens are appended, if the engine is
        then steady and no row may stop (see step_phases): judged with this step's tokens counted,
        so the ledger's budget covers the next decode's K/V column as schedule() would.

        With `pipeline_decode` as well, a steady step launches the next decode before the host
        has read this step's tokens: it takes the sampled ids where they are, on the device, so
        the GPU goes from this step's sampling straight into the next step while the host waits
        for the ids' copy and does its bookkeeping (~0.6-0.9 ms a step of idle GPU otherwise,
        note 33). It is judged before the tokens are known: the engine steady with one more
        token counted for every row, every row the same as the batch's, and none that stops on a
        count. A row may still stop on its token (EOS, a stop id, a stop sequence, its grammar):
        its extra step is computed and dropped (`_still_live`); its K/V write lands in its own
        slot, which is freed only after (every later write to that page is queued behind it on
        the same stream)."""
        rows, logits = self._still_live(rows, logits)
        if not rows:
            return ()
        started = time.monotonic()
        launched = self._launch_sample(rows, logits)
        pipelined = overlap and self.pipeline_decode and self._pipelinable(rows)
        if pipelined:
            self._inflight = self._launch_decode(launched[0].tokens)
            self._counts.overlapped_steps += 1
            self._counts.pipelined_steps += 1
        tokens = self._collect_sample(rows, launched)
        self._counts.seconds_decode += launch_seconds + time.monotonic() - started
        for request, token in zip(rows, tokens):
            self._record(request, token)
        by_count = [self._count_rule(r, t) for r, t in zip(rows, tokens)]   # per row alone: evaluated once
        if not pipelined and overlap and self._steady() and all(
                reason is None and self._no_text_rules(r) for r, reason in zip(rows, by_count)):
            self._inflight = self._launch_decode()
            self._counts.overlapped_steps += 1
        events = []
        for request, token, reason in zip(rows, tokens, by_count):
            event = self._finish(request) if self._stops(request, token, reason) else self._flush(request)
            if event is not None:
                events.append(event)
        return tuple(events)

    def _steady(self, ahead: int = 0) -> bool:
        """Nothing for the scheduler to do before the next decode (see step_phases), with `ahead`
        more tokens counted for every running row (tokens sampled but not yet recorded)."""
        return (self.overlap_decode and bool(self.slab.num_rows) and not self._partial
                and self.scheduler.steady(ahead) and not self._pressure())

    def _pipelinable(self, rows: list[Request]) -> bool:
        """May the next decode be launched before this step's tokens are read (see
        _finish_decode)? The batch is these rows in this order (their sampled ids are the next
        step's inputs), and none of them stops on a count. Rules on a token's value or text
        (EOS, stop ids, stop sequences, a grammar's end or error) are known only after: such a
        row's extra step is dropped. A grammar row is fine too: the next step's forward needs only
        its id, and its sampling, later, takes the mask of the state after this step's token."""
        return (self._steady(ahead=1) and self.slab.row_ids == [r.request_id for r in rows]
                and all(len(r.output_ids) + 1 < r.params.max_new_tokens
                        and self.scheduler.kv.can_grow(r, ahead=1) for r in rows))

    def _still_live(self, rows: list[Request], logits: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """A pipelined step's rows without those that stopped on the step before it (their extra
        step is dropped), and their logits."""
        if all(r.finish_reason is None for r in rows):
            return rows, logits
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None]
        index = torch.tensor(keep, dtype=torch.long).to(logits.device, non_blocking=True)
        return [rows[i] for i in keep], logits.index_select(0, index)

    def _no_text_rules(self, request: Request) -> bool:
        """No stopping rule of this row needs its text (stop sequences, a grammar): with none of
        the rules on counts met, it surely takes another decode step."""
        return not request.params.stop and self._live[request.request_id].grammar is None

    def fail_batch(self, exc: BaseException) -> Events:
        """A step raised: end the requests that were in the batch (their rows may be half updated)
        and any parked one whose K/V did not reach host memory; reset the slab. Queued and properly
        parked requests are untouched and run later. -> the final events of those ended.
        Under tensor parallelism raises ShardLost instead: a rank died, or the ranks may be out
        of step (one may wait in a collective that this rank will never join)."""
        self._counts.step_errors += 1
        self._inflight = None                  # its rows are ended below with the rest
        if self.shards is not None:
            raise self.shards.lost(exc) from exc
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()   # give back what the failed step's temporaries held
        message = f"engine step failed: {exc!r}"
        broken = [r for r in list(self.scheduler.by_id.values())
                  if r.state == RequestState.RUNNING
                  or (r.state in (RequestState.PREEMPTED, RequestState.SUSPENDED)
                      and r.num_preemptions and r.request_id not in self.parked)]
        events, self._stashed = list(self._stashed), ()
        for request in broken:
            request.error = message
            self.scheduler.cancel(request.request_id, FinishReason.ERROR)
            events.append(self._final(request, out_of_memory=out_of_memory))
        self.scheduler.clear_pending()   # their rows are removed right here
        for request_id in list(self._partial):
            self._drop_partial(request_id)
        for row_id in list(self.slab.row_ids):
            self.slab.remove_row(row_id)
        return tuple(events)

    def stats(self) -> EngineStats:
        c, kv = self._counts, self.scheduler.kv
        return EngineStats(
            rows_on_device=self.slab.num_rows, rows_parked=kv.num_parked,
            requests_waiting=self.scheduler.num_queued, kv_bytes_on_device=self.slab.used_bytes,
            kv_bytes_on_host=kv.host_bytes, steps=c.steps, step_errors=c.step_errors, preemptions=c.parks,
            bytes_offloaded=c.bytes_offloaded, bytes_restored=c.bytes_restored,
            seconds_prefill=c.seconds_prefill, seconds_decode=c.seconds_decode,
            seconds_offload=c.seconds_offload, seconds_restore=c.seconds_restore,
            kv_relocations=self.slab.num_relocations,
            kv_pages_used=self.slab.num_pages_used, kv_pages_free=self.slab.num_pages_free,
            prefill_tokens=c.prefill_tokens, prefill_chunks=c.prefill_chunks, overlapped_steps=c.overlapped_steps,
            pipelined_steps=c.pipelined_steps,
            **self._prefix_stats())

    def _prefix_stats(self) -> dict:
        cache = self.prefix_cache
        if cache is None:
            return {}
        used = cache.bytes_used()
        return dict(prefix_lookup_tokens=cache.lookup_tokens, prefix_hit_tokens_device=cache.hit_tokens["device"],
                    prefix_hit_tokens_host=cache.hit_tokens["host"], prefix_bytes_device=used["device"],
                    prefix_bytes_host=used["host"])

    def close(self) -> None:
        """Release device memory now (slab, graphs), even if references to the engine linger."""
        self._inflight = None
        self.runner.graphs = None
        self.slab.data = torch.empty(0, device=self.slab.data.device)
        self.parked.clear()
        if self.shards is not None:
            self.shards.close()

    def _mirror(self, message) -> None:
        """Tensor parallelism: the other ranks run this operation on their shards too."""
        if self.shards is not None:
            self.shards.send(message)

    # ---- K/V moves --------------------------------------------------------------------------
    def _park(self, requests: tuple[Request, ...]) -> None:
        """Copy these rows' K/V to host memory and take them out of the batch."""
        started = self._timed_start(bool(requests))
        for request in requests:
            self._mirror(Park(request.request_id))
            kv = self.slab.take_row(request.request_id, self.parked.allocate)
            self.parked.put(request.request_id, kv)
            nbytes = kv.numel() * kv.element_size()
            request.bytes_offloaded += nbytes
            self._counts.bytes_offloaded += nbytes
            self._counts.parks += 1
        self._counts.seconds_offload += self._timed_end(started)

    def _restore(self, requests: tuple[Request, ...]) -> None:
        """Embed parked K/V back into free rows (no recompute)."""
        started = self._timed_start(bool(requests))
        restored = []
        for request in requests:
            kv = self.parked.pop(request.request_id)
            self._mirror(Restore(request.request_id))
            self.slab.add_row(request.request_id, kv.to(self.runner.device, non_blocking=True))
            nbytes = kv.numel() * kv.element_size()
            request.bytes_restored += nbytes
            self._counts.bytes_restored += nbytes
            restored.append(kv)
        self._counts.seconds_restore += self._timed_end(started)   # synchronised: the copies are done
        for kv in restored:
            self.parked.release(kv)

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

    def _drop_kv(self, request_id: str) -> None:
        self._mirror(Drop(request_id))
        self._drop_partial(request_id)
        if request_id in self.slab.row_ids:
            self.slab.remove_row(request_id)
        self.parked.drop(request_id)

    # ---- tokens -----------------------------------------------------------------------------
    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        return self._collect_sample(requests, self._launch_sample(requests, logits))

    def _launch_sample(self, requests: list[Request], logits: torch.Tensor) -> tuple[PendingSample, object]:
        """Queue the draw of one token per row. -> (the sampler's PendingSample, the grammar
        constraint it applied, if any)."""
        # Seen ids are only needed (and only built) for rows with a repetition penalty.
        seen = [r.all_ids if r.params.has_penalty else [] for r in requests]
        live = [self._live[r.request_id] for r in requests]
        grammars = [lv.grammar for lv in live]
        constrained = self.grammars.constrain(grammars, logits.device) if any(grammars) else None
        pending = self.sampler.launch(logits, [r.params for r in requests], seen,
                                      [lv.generator for lv in live], [r.output_ids for r in requests],
                                      None if constrained is None else constrained.mask)
        return pending, constrained

    def _collect_sample(self, requests: list[Request], launched: tuple[PendingSample, object]) -> list[int]:
        """Wait for a queued draw (`_launch_sample`) to reach the host. -> the rows' tokens."""
        pending, constrained = launched
        sampled = pending.result()
        if constrained is not None:
            constrained.accept(sampled.tokens)
        for request, logprob in zip(requests, sampled.logprobs):
            if logprob is not None:
                self._live[request.request_id].new_logprobs.append(logprob)
        return sampled.tokens

    def _append(self, request: Request, token: int) -> bool:
        """Record one sampled token; return True when the request must stop."""
        self._record(request, token)
        return self._stops(request, token, self._count_rule(request, token))

    def _record(self, request: Request, token: int) -> None:
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.output_ids.append(token)
        self._live[request.request_id].new_ids.append(token)

    def _stops(self, request: Request, token: int, by_count: FinishReason | None) -> bool:
        """After `_record`: detokenise the token and apply the stopping rules, `by_count` being
        `_count_rule`'s verdict. -> True when the request must stop (its finish_reason set)."""
        live = self._live[request.request_id]
        live.new_text += live.detok.push([token])
        if live.grammar is not None and live.grammar.error is not None:
            request.error, request.finish_reason = live.grammar.error, FinishReason.ERROR
        elif live.detok.stopped:
            request.finish_reason = FinishReason.STOP_SEQUENCE
        else:
            request.finish_reason = by_count
        return request.finish_reason is not None

    def _count_rule(self, request: Request, token: int) -> FinishReason | None:
        """The stopping rules that need no text: EOS or a stop token (past min_new_tokens), then
        max_new_tokens or no room to grow (in context: the row's own tokens, no other row's)."""
        p = request.params
        if ((token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids) \
                and len(request.output_ids) >= p.min_new_tokens:
            return FinishReason.EOS
        if len(request.output_ids) >= p.max_new_tokens or not self.scheduler.kv.can_grow(request):
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request) -> RequestOutput:
        """A row met a stopping rule: it leaves the batch now. -> its final event."""
        if self.prefix_cache is not None and request.request_id in self.slab.row_ids:
            # its whole history (prompt and output so far) for the next turn of a conversation
            history = request.all_ids[:request.num_tokens]
            self._mirror(CacheInsert(history, row_id=request.request_id))
            self.prefix_cache.insert(history, self.slab.row_kv(request.request_id))
        self._drop_kv(request.request_id)
        self.scheduler.finish(request, request.finish_reason)
        live = self._live[request.request_id]
        live.new_text += live.detok.flush()
        return self._final(request)

    # ---- events -----------------------------------------------------------------------------
    def _flush(self, request: Request, state: RequestState | None = None) -> RequestOutput | None:
        """The tokens and text gathered since the last event (and a state change), if any."""
        live = self._live[request.request_id]
        if not (live.new_ids or live.new_text or state is not None):
            return None
        event = RequestOutput(request.stream_id, text=live.new_text, token_ids=tuple(live.new_ids), state=state,
                              logprobs=tuple(live.new_logprobs), index=request.index)
        live.new_ids, live.new_text, live.new_logprobs = [], "", []
        return event

    def _event(self, request: Request, state: RequestState) -> RequestOutput:
        """A state change of a request (a completion row: of that completion, with its index)."""
        return RequestOutput(request.stream_id, state=state, index=request.index)

    def _final(self, request: Request, out_of_memory: bool = False) -> RequestOutput:
        """A completion's last event; the request's stream ends with the last completion's (state
        FINISHED). Usage: the prompt's tokens (prefilled once, shared by all completions) and
        this completion's own tokens."""
        live = self._live.pop(request.request_id)
        stream_open = bool(request.group) and request.group in self.scheduler.groups
        return RequestOutput(
            request.stream_id, text=live.new_text, token_ids=tuple(live.new_ids), index=request.index,
            stream_open=stream_open, state=None if stream_open else RequestState.FINISHED,
            finish_reason=request.finish_reason, error=request.error,
            out_of_memory=out_of_memory,
            prompt_tokens=len(request.prompt_ids), completion_tokens=len(request.output_ids),
            stats=stats_of(request, time.monotonic()), logprobs=tuple(live.new_logprobs),
            stop_sequence=live.detok.matched, truncated_prompt_tokens=request.truncated_prompt_tokens,
            cached_prompt_tokens=request.cached_prompt_tokens,
            cached_prompt_tokens_host=request.cached_prompt_tokens_host)
