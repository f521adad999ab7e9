"""Pure-Python scheduler: queueing, priorities, admission, preemption and the K/V budget.

No torch here. The scheduler owns every `Request.state` transition and answers one question per
engine step: which rows leave the batch (to host memory or for good), which requests enter it
(by prefill or by restoring parked K/V), and which rows decode.

Invariants:
- `running` never holds more than `max_batch_size` rows, nor more K/V tokens than the budget
  (counted by the ledger, engine/kv_ledger.py, the one place that knows what a row needs).
- A request is in exactly one of `waiting` (QUEUED or PREEMPTED), `suspended`, `running`.
- Preemption compares base priorities only (strictly higher evicts); aging only orders admission,
  so a long wait can never evict someone, and two requests cannot evict each other back and forth.
- Chunked prefill (`prefill_chunk_tokens` > 0): an admitted request is in `running` (it holds
  its place and its K/V budget) and in `prefilling` until its whole prompt is planned; each step
  plans at most `prefill_chunk_tokens` prompt tokens, in admission order (priority first), so a
  higher-priority arrival's prompt goes before the rest of a lower one's. A prompt that fits the
  step's remaining budget whole is prefilled in the grouped forward (`prefill`), a longer one in
  chunks; at most `max_prompts_in_chunks` prompts are in chunks at once (a prompt of higher
  priority than all of them may start anyway; one that may not waits, and a later prompt that
  fits the step's budget whole still goes). A row still prefilling is never parked: it is not a row yet; SUSPEND drops its partial
  K/V and it is prefilled again on RESUME.
- A request whose prompt starts with K/V the prefix cache holds in host memory is admitted as
  any other, then held (`hold`, in `running` and in `loading`) while those blocks are copied up;
  the engine prefills it once they have landed (`release`). Like a prompt still prefilling, it is
  no row yet: never parked, dropped and re-queued whole by SUSPEND. Held prompts count against
  the step's prefill bound (twice `max_prefill_tokens` with them: their copies run a step ahead).
- n completions (`Request.n` > 1): until its prompt is prefilled a request counts as n rows of
  the batch and n times its K/V (it is admitted whole or not at all); after the prefill the engine
  calls `fork`, which replaces it by n completion rows (`groups`). From then on each completion is
  a row of its own: preempted, parked, restored and finished on its own. Commands name the
  request: `members` turns its id into its unfinished rows (cancel, SUSPEND, RESUME and priority
  act on all of them; a SUSPEND parks all or, when the host pool cannot take them all, none).
- Parked K/V never exceed `host_budget_bytes`: when the host pool is full nobody is preempted (the
  newcomer waits its turn) and SUSPEND is refused.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from engine.errors import DuplicateRequest, HostPoolFull, RequestFinished, TooLarge, UnknownRequest
from engine.kv_ledger import KVLedger, tokens_needed
from engine.request import FinishReason, Request, RequestState, completion_row_id, completion_seed


FINISHED_IDS_KEPT = 10_000


@dataclass(frozen=True)
class SchedulerOutput:
    free: tuple[Request, ...]      # ended by a command: drop their row or parked K/V
    park: tuple[Request, ...]      # running rows whose K/V move to host memory now
    restore: tuple[Request, ...]   # parked requests whose K/V come back into the batch
    prefill: tuple[Request, ...]   # new requests: prefill, embed, then decode with the batch
    decode: tuple[Request, ...]    # every row of the batch after the changes above
    pressure: bool = False         # memory is above the high watermark
    chunks: tuple[tuple[Request, int, int], ...] = ()   # (request, start, end): prompt tokens to prefill
                                                        # into its partial K/V; embedded when end = prompt


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int                 # rows in the decode batch
    max_prefill_tokens: int             # prompt tokens one prefill forward computes (see prefill_padded)
    kv_budget_tokens: int               # K/V tokens all running rows may hold together
    max_row_tokens: int                 # K/V columns of one row (context limit)
    kv_bytes_per_token: int             # to account host-pool bytes
    host_budget_bytes: int              # parked K/V bytes allowed in host memory
    aging_seconds: float = 0.0          # +1 effective priority per this many seconds waiting (0 = off)
    kv_page_size: int = 1               # device K/V is allocated in pages of this many tokens
    prefill_chunk_tokens: int = 0       # prompt tokens planned per step (0 = whole prompts, no chunks)
    prefill_padded: bool = True         # a forward pads its prompts to the longest (HF); False: packed, their sum
    # prompts in chunks at once (each holds a partial K/V; the engine's chunk graphs have one
    # workspace, fused_prefill.StaticChunk); a higher-priority prompt may start past the limit
    max_prompts_in_chunks: int = 1

    def __post_init__(self) -> None:
        # A row may grow to max_row_tokens; if that cannot fit alone, it would block the queue forever.
        if self.kv_budget_tokens < self.max_row_tokens:
            raise ValueError(f"kv budget ({self.kv_budget_tokens} tokens) must hold at least one full row "
                             f"({self.max_row_tokens} tokens)")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.running: list[Request] = []
        self.waiting: list[Request] = []      # QUEUED or PREEMPTED, in arrival order
        self.suspended: list[Request] = []
        self.prefilling: list[Request] = []   # admitted (in running), prompt not yet all planned
        self.loading: list[Request] = []      # admitted (in running), its cached prefix coming up from host
        self.by_id: dict[str, Request] = {}
        self.groups: dict[str, list[Request]] = {}   # a forked request's id -> its completion rows
        self.kv = KVLedger(config.kv_budget_tokens, config.max_row_tokens, config.kv_bytes_per_token,
                           config.host_budget_bytes, config.kv_page_size)
        self._free: list[Request] = []
        self._park: list[Request] = []
        # Recently finished ids, so Preempt can answer FAILED_PRECONDITION rather than NOT_FOUND.
        self._finished: OrderedDict[str, None] = OrderedDict()

    # ---- commands (between steps) ----------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.by_id or request.request_id in self.groups:
            raise DuplicateRequest(f"request_id {request.request_id!r} is already in use")
        if request.n > 1 and (request.n > self.config.max_batch_size
                              or not self.kv.fits((), tokens_needed(request), request.n)):
            raise TooLarge(f"params.n: {request.n} completions of a {len(request.prompt_ids)}-token prompt "
                           f"cannot fit the batch ({self.config.max_batch_size} rows, "
                           f"{self.config.kv_budget_tokens} K/V tokens)")
        request.state = RequestState.QUEUED
        self._finished.pop(request.request_id, None)
        self.by_id[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request:
        request = self.by_id.get(request_id)
        if request is None and request_id in self._finished:
            raise RequestFinished(f"request_id {request_id!r} has already finished")
        if request is None:
            raise UnknownRequest(f"request_id {request_id!r} is not known")
        if request.state.is_finished:
            raise RequestFinished(f"request_id {request_id!r} has already finished")
        return request

    def members(self, request_id: str) -> list[Request]:
        """The rows a command on `request_id` acts on: a forked request's unfinished completion
        rows, else the request itself. Raises UnknownRequest / RequestFinished."""
        rows = self.groups.get(request_id)
        if rows is None:
            return [self.get(request_id)]
        return [r for r in rows if not r.state.is_finished]   # never empty: a group leaves when all finish

    def fork(self, request: Request) -> list[Request]:
        """A request of n completions whose prompt was just prefilled (RUNNING, counted as n rows)
        becomes n completion rows, each RUNNING with its own id, index and derived seed."""
        rows = [dataclasses.replace(request, request_id=completion_row_id(request.request_id, i), n=1, index=i,
                                    group=request.request_id, output_ids=[],
                                    params=dataclasses.replace(request.params,
                                                               seed=completion_seed(request.params.seed, i)))
                for i in range(request.n)]
        self.running.remove(request)
        self.running.extend(rows)
        del self.by_id[request.request_id]
        self.by_id.update((r.request_id, r) for r in rows)
        self.groups[request.request_id] = rows
        return rows

    def suspend_members(self, request_id: str, now: float) -> list[Request]:
        """SUSPEND a request: all its unfinished rows, or (host pool full) none of them."""
        rows = self.members(request_id)
        planned = 0
        for r in rows:
            if r.state == RequestState.RUNNING and not self._rowless(r):
                if not self.kv.host_can_take(r, already=planned):
                    raise HostPoolFull("host K/V pool is full; cannot suspend now")
                planned += self.kv.parked_bytes(r)
        return [self.suspend(r.request_id, now) for r in rows]

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Request:
        request = self.get(request_id)
        self._detach(request)
        self._free.append(request)
        self._set_finished(request, reason)
        return request

    def suspend(self, request_id: str, now: float) -> Request:
        request = self.get(request_id)
        if request.state == RequestState.SUSPENDED:
            return request
        if self._rowless(request):
            # Not a row yet: drop the partial K/V (via `free`) and prefill it again on RESUME.
            self.running.remove(request)
            for pool in (self.prefilling, self.loading):
                if request in pool:
                    pool.remove(request)
            self._free.append(request)
            request.prefilled = 0
            request.parked_since = now
        elif request.state == RequestState.RUNNING:
            if not self.kv.host_can_take(request):
                raise HostPoolFull("host K/V pool is full; cannot suspend now")
            self.running.remove(request)
            self._park_row(request, now)
        else:
            self.waiting.remove(request)
            if request.parked_since is None:
                request.parked_since = now
        request.state = RequestState.SUSPENDED
        self.suspended.append(request)
        return request

    def resume(self, request_id: str) -> Request:
        request = self.get(request_id)
        if request.state != RequestState.SUSPENDED:
            return request
        self.suspended.remove(request)
        parked = self.kv.is_parked(request.request_id)
        request.state = RequestState.PREEMPTED if parked else RequestState.QUEUED
        self.waiting.append(request)
        return request

    def set_priority(self, request_id: str, priority: int) -> Request:
        request = self.get(request_id)
        request.priority = priority
        return request

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Called after a step by the engine when a row meets a stopping criterion."""
        self._detach(request)
        self._set_finished(request, reason)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self, now: float, pressure: bool = False) -> SchedulerOutput:
        cfg = self.config
        if pressure and len(self.running) > 1:
            victim = self._victim(exclude=())
            if victim is not None and self.kv.host_can_take(victim):
                self._preempt(victim, now)
        # Rows grow by one token a step: park the lowest ones while the batch is over its budget.
        while not self.kv.fits(self.running, 0) and len(self.running) > 1:
            victim = self._victim(exclude=())
            if victim is None or not self.kv.host_can_take(victim):
                break
            self._preempt(victim, now)
        restore: list[Request] = []
        prefill: list[Request] = []
        prefill_longest = prefill_sum = 0   # of the prompts in this step's prefill forward
        held = sum(len(r.prompt_ids) for r in self.loading)   # prompts held for their host blocks
        chunked = cfg.prefill_chunk_tokens > 0
        pending = sum(len(r.prompt_ids) - r.prefilled for r in self.prefilling)
        for candidate in sorted(self.waiting, key=lambda r: self._admission_key(r, now)):
            if pressure and (self.running or prefill or restore):
                break  # under memory pressure admit nobody, except one when the batch is empty (progress)
            is_new = candidate.state == RequestState.QUEUED
            need = tokens_needed(candidate)
            if is_new and chunked and pending >= cfg.prefill_chunk_tokens and not self._outranks_prefilling(candidate):
                break  # this step's prefill budget is spoken for; it waits (holding no K/V budget)
            if is_new and not chunked and prefill and self._prefill_cost(len(prefill), prefill_longest, prefill_sum, candidate) > cfg.max_prefill_tokens:
                break  # keep this prefill forward bounded; the rest go next step
            if is_new and not chunked and held and held + prefill_sum + len(candidate.prompt_ids) > 2 * cfg.max_prefill_tokens:
                break  # prompts held for their host blocks: these and this step's stay within two forwards' worth
            if not self._fits(need, candidate.n):
                self._make_room_for(candidate, need, exclude=(*restore, *prefill), now=now)
            if not self._fits(need, candidate.n):
                break  # strict priority order: nobody behind it skips ahead
            self.waiting.remove(candidate)
            self._admit(candidate, now)
            if is_new and chunked:
                self.prefilling.append(candidate)
                pending += len(candidate.prompt_ids)
            elif is_new:
                candidate.prefilled = len(candidate.prompt_ids)
                prefill.append(candidate)
                prefill_longest = max(prefill_longest, len(candidate.prompt_ids))
                prefill_sum += len(candidate.prompt_ids)
            else:
                restore.append(candidate)
        chunks: list[tuple[Request, int, int]] = []
        if chunked:
            prefill, chunks = self._plan_chunks(now)
        out = SchedulerOutput(
            free=tuple(self._free), park=tuple(self._park), restore=tuple(restore),
            prefill=tuple(prefill), decode=tuple(self.running), pressure=pressure, chunks=tuple(chunks),
        )
        self._free.clear()
        self._park.clear()
        return out

    def _plan_chunks(self, now: float) -> tuple[list[Request], list[tuple[Request, int, int]]]:
        """This step's prompt tokens, at most `prefill_chunk_tokens`, in admission order. -> (whole
        prompts for the grouped forward, chunks (request, start, end) of the others)."""
        budget = self.config.prefill_chunk_tokens
        whole: list[Request] = []
        chunks: list[tuple[Request, int, int]] = []
        in_chunks = [r for r in self.prefilling if r.prefilled]   # their partial K/V exist
        for request in sorted(self.prefilling, key=lambda r: self._admission_key(r, now)):
            if budget <= 0:
                break
            start = request.prefilled
            end = min(len(request.prompt_ids), start + budget)
            if (start == 0 and end < len(request.prompt_ids) and len(in_chunks) >= self.config.max_prompts_in_chunks
                    and not all(request.priority > r.priority for r in in_chunks)):
                continue   # it would start a partial K/V while others are open: next step (a shorter one may fit whole)
            budget -= end - start
            request.prefilled = end
            if start == 0 and end == len(request.prompt_ids):
                whole.append(request)
            else:
                chunks.append((request, start, end))
                if start == 0:
                    in_chunks.append(request)
        self.prefilling = [r for r in self.prefilling if r.prefilled < len(r.prompt_ids)]
        return whole, chunks

    def _prefill_cost(self, count: int, longest: int, total: int, candidate: Request) -> int:
        """Prompt tokens the step's prefill forward computes with `candidate` added to its `count`
        prompts (`longest` the longest, `total` their sum): padded to the longest, or packed."""
        n = len(candidate.prompt_ids)
        return max(longest, n) * (count + 1) if self.config.prefill_padded else total + n

    def hold(self, request: Request) -> None:
        """The engine copies `request`'s cached prefix up from host memory before its prefill: it
        stays admitted but is no row yet (never parked) until `release`."""
        self.loading.append(request)

    def release(self, request: Request) -> None:
        """`request`'s prefix has landed: the engine prefills it this step."""
        self.loading.remove(request)

    def _rowless(self, request: Request) -> bool:
        """Admitted but not a row of the batch yet: its prompt is being prefilled in chunks, or its
        cached prefix is coming up from host memory."""
        return request in self.prefilling or request in self.loading

    def _outranks_prefilling(self, candidate: Request) -> bool:
        """A newcomer of higher priority than a prompt being prefilled goes before its remaining chunks."""
        return any(candidate.priority > r.priority for r in self.prefilling)

    def clear_pending(self) -> None:
        """Forget rows queued to be freed or parked (the engine reset the batch itself)."""
        self._free.clear()
        self._park.clear()

    # ---- views -----------------------------------------------------------------------------
    def queue_position(self, request: Request, now: float) -> int:
        """How many waiting requests would be admitted before `request` (one pass, no sort)."""
        if request not in self.waiting:
            return 0
        key = self._admission_key(request, now)
        return sum(1 for r in self.waiting if r is not request and self._admission_key(r, now) < key)

    @property
    def num_unfinished(self) -> int:
        return len(self.by_id)

    @property
    def kv_tokens_running(self) -> int:
        """Device K/V the running rows hold, in tokens (whole pages for the paged layout)."""
        return self.kv.device_pages(self.running) * self.kv.page_size

    @property
    def num_queued(self) -> int:
        """Waiting for their first admission (parked requests not counted)."""
        return sum(r.state == RequestState.QUEUED for r in self.waiting)

    def steady(self, ahead: int = 0) -> bool:
        """`schedule` (without memory pressure) would decode the running rows and nothing else: no
        request waiting, no row to free or park, no prompt in chunks, every row able to grow (each
        with `ahead` more tokens: sampled, not yet recorded)."""
        return (not self.waiting and not self._free and not self._park and not self.prefilling
                and not self.loading and self.kv.fits(self.running, 0, ahead=ahead))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._free or self._park)

    # ---- internals -------------------------------------------------------------------------
    def _admission_key(self, request: Request, now: float) -> tuple[float, float, int]:
        """Admission order: the higher effective priority first (the base priority, plus one level
        per `aging_seconds` waited); among equals, whoever has been waiting longer, counted from
        arrival or from the park that put it back in the queue (as aging counts), then arrival.
        Ordering equals by arrival alone let rows parked after a queued request came back before
        it every time: in W3 with aging off, each high-priority arrival parked a running row that
        then took the next free slot ahead of a low-priority request waiting since the start, which
        waited ~5 s and ended the batch late (docs/benchmarks.md note 27)."""
        since = request.parked_since if request.parked_since is not None else request.arrival_time
        effective = float(request.priority)
        if self.config.aging_seconds > 0:
            effective += (now - since) / self.config.aging_seconds
        return (-effective, since, request.arrival_seq)

    def _fits(self, need_tokens: int, rows: int = 1) -> bool:
        return (self.num_rows(self.running) + rows <= self.config.max_batch_size
                and self.kv.fits(self.running, need_tokens, rows))

    @staticmethod
    def num_rows(requests) -> int:
        """Rows of the batch these requests take (a request of n completions not yet forked: n)."""
        return sum(r.n for r in requests)

    @staticmethod
    def _victim_order(r: Request) -> tuple:
        """Whom to preempt first (smallest first): the lowest priority; on ties the row with the
        fewest tokens left in its budget, then the latest arrival. A parked row comes back when a
        slot frees, so parking the row that would end the batch last (the most tokens left) can
        stretch the whole batch's tail by its time parked; parking the one nearest its end cannot.
        W3 replayed through this scheduler (benchmarks/replay_scheduler.py, note 27): 528 decode
        steps with this rule, as many as its low-priority work alone; 534 parking the latest
        arrival; 660 parking the row with the most tokens left."""
        return r.priority, r.params.max_new_tokens - len(r.output_ids), -r.arrival_seq

    def _victim(self, exclude: tuple[Request, ...]) -> Request | None:
        """The one place that picks whom to preempt under memory pressure (see _victim_order)."""
        pool = [r for r in self.running if r not in exclude and not self._rowless(r)]
        return min(pool, key=self._victim_order) if pool else None

    def _make_room_for(self, candidate: Request, need: int, exclude: tuple[Request, ...], now: float) -> None:
        """Preempt strictly lower-priority rows, lowest first, but only if that makes `need` fit."""
        cfg = self.config
        victims, planned_host = [], 0
        pool = sorted((r for r in self.running if r not in exclude and not self._rowless(r)
                       and r.priority < candidate.priority), key=self._victim_order)

        def room() -> bool:
            staying = [r for r in self.running if r not in victims]
            return (self.num_rows(staying) + candidate.n <= cfg.max_batch_size
                    and self.kv.fits(staying, need, candidate.n))

        for victim in pool:
            if room():
                break
            if not self.kv.host_can_take(victim, already=planned_host):
                return
            victims.append(victim)
            planned_host += self.kv.parked_bytes(victim)
        if not room():
            return  # evicting everyone eligible would still not make room: evict nobody
        for victim in victims:
            self._preempt(victim, now)

    def _preempt(self, request: Request, now: float) -> None:
        self.running.remove(request)
        self._park_row(request, now)
        request.state = RequestState.PREEMPTED
        self.waiting.append(request)

    def _park_row(self, request: Request, now: float) -> None:
        self._park.append(request)
        self.kv.park(request)
        request.num_preemptions += 1
        request.parked_since = now

    def _admit(self, request: Request, now: float) -> None:
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        if request.parked_since is not None:
            request.parked_seconds += now - request.parked_since
            request.parked_since = None
        self.kv.unpark(request.request_id)
        request.state = RequestState.RUNNING
        self.running.append(request)

    def _detach(self, request: Request) -> None:
        for pool in (self.running, self.waiting, self.suspended, self.prefilling, self.loading):
            if request in pool:
                pool.remove(request)
        if request in self._park:  # parked this step but not yet copied out: nothing to copy now
            self._park.remove(request)
        self.kv.unpark(request.request_id)

    def _set_finished(self, request: Request, reason: FinishReason) -> None:
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        self.by_id.pop(request.request_id, None)
        self._finished[request.request_id] = None
        rows = self.groups.get(request.group) if request.group else None
        if rows is not None and all(r.state.is_finished for r in rows):
            del self.groups[request.group]   # its last completion: the request itself is finished
            self._finished[request.group] = None
        if len(self._finished) > FINISHED_IDS_KEPT:
            self._finished.popitem(last=False)
