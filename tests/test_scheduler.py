"""Unit tests of engine/scheduler.py: pure Python, no model.

The engine is simulated: after `schedule(now)`, a row admitted by prefill gets its first token from
the prefill, then every row of `decode` gets one token; a row that reaches its max_new_tokens is
finished with `Scheduler.finish(req, LENGTH)`, as LLMEngine does.
"""
from __future__ import annotations

import random

import pytest

from engine.request import FinishReason, Request, RequestState, SamplingParams
from engine import scheduler as scheduler_module
from engine.errors import DuplicateRequest, HostPoolFull, RequestFinished, UnknownRequest
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

KVB = 10  # kv_bytes_per_token used throughout


def make_sched(**overrides) -> Scheduler:
    cfg = dict(max_batch_size=4, max_prefill_tokens=10_000, kv_budget_tokens=100_000, max_row_tokens=10_000,
               kv_bytes_per_token=KVB, host_budget_bytes=10**12, aging_seconds=0.0)
    cfg.update(overrides)
    if "max_row_tokens" not in overrides:  # a full row must fit the budget (SchedulerConfig checks)
        cfg["max_row_tokens"] = min(cfg["max_row_tokens"], cfg["kv_budget_tokens"])
    return Scheduler(SchedulerConfig(**cfg))


def make_req(rid: str, plen: int = 4, prio: int = 0, max_new: int = 8, t: float = 0.0) -> Request:
    """Requests get increasing arrival_seq in creation order, so create them in arrival order."""
    return Request(rid, list(range(1, plen + 1)), SamplingParams(max_new_tokens=max_new),
                   priority=prio, arrival_time=t)


def execute(s: Scheduler, out: SchedulerOutput, rng: random.Random | None = None) -> list[Request]:
    """What the engine does with a schedule: tokens from the prefill, then one decode of every row.
    With `rng`, as the engine with host-tier cache hits: some newcomers are held (their cached
    prefix coming up from host memory) and held ones land, at random, and are prefilled then."""
    finished: list[Request] = []
    completed = [r for r, _start, end in out.chunks if end == len(r.prompt_ids)]
    prefilled = list(out.prefill)
    if rng is not None:
        landed = [r for r in s.loading if rng.random() < 0.5]
        for r in landed:
            s.release(r)
        held = [r for r in prefilled if rng.random() < 0.3]
        for r in held:
            s.hold(r)
        prefilled = [r for r in prefilled if r not in held] + landed
    for r in (*prefilled, *completed):
        r.output_ids.append(0)
        if len(r.output_ids) >= r.params.max_new_tokens:
            finished.append(r)
    for r in out.decode:
        if r in finished or r.prefilled < len(r.prompt_ids) or r in s.loading:   # not a row yet
            continue
        r.output_ids.append(0)
        if len(r.output_ids) >= r.params.max_new_tokens:
            finished.append(r)
    for r in finished:
        s.finish(r, FinishReason.LENGTH)
    return finished


def step(s: Scheduler, now: float = 0.0, pressure: bool = False) -> SchedulerOutput:
    out = s.schedule(now, pressure=pressure)
    execute(s, out)
    return out


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


# ---- admission order -------------------------------------------------------------------------
def test_admission_higher_priority_first_fifo_within_priority():
    s = make_sched(max_batch_size=1)
    reqs = [make_req("a", prio=0), make_req("b", prio=2), make_req("c", prio=1), make_req("d", prio=2),
            make_req("e", prio=0)]
    for r in reqs:
        s.add(r)
    order = []
    for _ in range(100):
        out = step(s)
        order += ids(out.prefill)
        if not s.by_id:
            break
    assert order == ["b", "d", "c", "a", "e"]
    assert all(r.state == RequestState.FINISHED and r.finish_reason == FinishReason.LENGTH for r in reqs)


def test_all_admitted_in_one_step_in_priority_order():
    s = make_sched()
    for r in [make_req("a", prio=0), make_req("b", prio=1), make_req("c", prio=1), make_req("d", prio=5)]:
        s.add(r)
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["d", "b", "c", "a"]
    assert ids(out.decode) == ["d", "b", "c", "a"]
    assert not out.park and not out.restore and not out.free
    assert all(r.state == RequestState.RUNNING for r in out.prefill)
    assert s.waiting == []


def test_max_batch_size_respected():
    s = make_sched(max_batch_size=3)
    reqs = [make_req(f"r{i}", max_new=3) for i in range(7)]
    for r in reqs:
        s.add(r)
    out = step(s)
    assert ids(out.prefill) == ["r0", "r1", "r2"]
    assert len(s.running) == 3 and len(s.waiting) == 4
    for _ in range(50):
        out = step(s)
        assert len(out.decode) <= 3
        if not s.by_id:
            break
    assert not s.by_id


def test_kv_budget_respected_row_needs_num_tokens_plus_one():
    # budget 21: a (10 tokens -> needs 11) + b (10 -> 11) = 22 > 21
    s = make_sched(kv_budget_tokens=21)
    a, b = make_req("a", plen=10), make_req("b", plen=10)
    s.add(a)
    s.add(b)
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["a"]
    assert s.kv_tokens_running == 11
    # exactly at the budget is allowed
    s2 = make_sched(kv_budget_tokens=22)
    s2.add(make_req("a", plen=10))
    s2.add(make_req("b", plen=10))
    out2 = s2.schedule(0.0)
    assert ids(out2.prefill) == ["a", "b"]
    assert s2.kv_tokens_running == 22


def test_kv_budget_counts_generated_tokens():
    s = make_sched(kv_budget_tokens=20)
    a = make_req("a", plen=5, max_new=100)
    s.add(a)
    step(s)  # prefill token + one decode token -> num_tokens = 5 + 1
    step(s)  # -> 5 + 2
    assert a.num_tokens == 7
    assert s.kv_tokens_running == 8
    s.add(make_req("b", plen=12))  # needs 13: 8 + 13 = 21 > 20
    out = s.schedule(0.0)
    assert out.prefill == ()
    s.add(make_req("c", plen=11))  # lower in FIFO order, it does not skip ahead of b
    out = s.schedule(0.0)
    assert out.prefill == ()


def test_strict_order_nobody_skips_ahead():
    # a big high-priority request that does not fit blocks the small lower-priority one behind it
    s = make_sched(kv_budget_tokens=30)
    s.add(make_req("run", plen=10, prio=5, max_new=100))
    step(s)
    s.add(make_req("big", plen=25, prio=5))
    s.add(make_req("small", plen=2, prio=0))
    out = s.schedule(0.0)
    assert out.prefill == () and out.park == ()


def test_max_prefill_tokens_padded_longest_times_count():
    s = make_sched(max_prefill_tokens=30)
    for rid, plen in [("a", 10), ("b", 5), ("c", 12), ("d", 1)]:
        s.add(make_req(rid, plen=plen))
    out = s.schedule(0.0)
    # a+b: longest 10 * 2 = 20 <= 30; + c: longest 12 * 3 = 36 > 30 -> c and the rest wait
    assert ids(out.prefill) == ["a", "b"]
    execute(s, out)
    out = s.schedule(0.0)
    # c + d: 12 * 2 = 24 <= 30
    assert ids(out.prefill) == ["c", "d"]


def test_max_prefill_tokens_packed_counts_the_sum():
    """A packed prefill forward pads nothing: the bound counts the prompts' tokens."""
    s = make_sched(max_prefill_tokens=30, prefill_padded=False)
    for rid, plen in [("a", 10), ("b", 5), ("c", 12), ("d", 4)]:
        s.add(make_req(rid, plen=plen))
    out = s.schedule(0.0)
    # a+b+c = 27 <= 30 (padded it would be 12 * 3 = 36); + d = 31 > 30 -> d waits
    assert ids(out.prefill) == ["a", "b", "c"]
    execute(s, out)
    assert ids(s.schedule(0.0).prefill) == ["d"]


def test_max_prefill_tokens_exact_bound_allowed():
    s = make_sched(max_prefill_tokens=30)
    for rid in "abc":
        s.add(make_req(rid, plen=10))
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["a", "b", "c"]  # 10 * 3 == 30


def test_max_prefill_tokens_always_admits_at_least_one():
    s = make_sched(max_prefill_tokens=8)
    s.add(make_req("huge", plen=50))
    s.add(make_req("small", plen=1))
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["huge"]
    execute(s, out)
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["small"]


def test_max_prefill_tokens_does_not_limit_restores():
    s = make_sched(max_batch_size=2, max_prefill_tokens=10)
    a, b = make_req("a", plen=8, max_new=50), make_req("b", plen=8, max_new=40)
    s.add(a)
    step(s)
    s.add(b)
    step(s)
    hi = make_req("hi", plen=8, prio=9, max_new=1)
    s.add(hi)
    out = step(s)  # evicts b (fewer tokens left than a)
    assert ids(out.park) == ["b"] and ids(out.prefill) == ["hi"]
    assert hi.state == RequestState.FINISHED
    s.finish(a, FinishReason.EOS)
    c = make_req("c", plen=8)
    s.add(c)
    out = s.schedule(0.0)
    # b is restored and c prefilled in the same step; the restore does not count against the prefill bound
    assert ids(out.restore) == ["b"] and ids(out.prefill) == ["c"]


# ---- preemption ------------------------------------------------------------------------------
def _full_batch(s: Scheduler, specs) -> list[Request]:
    reqs = [make_req(rid, plen=plen, prio=prio, max_new=1000) for rid, plen, prio in specs]
    for r in reqs:
        s.add(r)
    step(s)
    assert all(r.state == RequestState.RUNNING for r in reqs)
    return reqs


def test_preemption_victim_lowest_priority_latest_arrival():
    s = make_sched(max_batch_size=4)
    p1, a, b, p2 = _full_batch(s, [("p1", 4, 1), ("a", 4, 0), ("b", 6, 0), ("p2", 4, 2)])
    hi = make_req("hi", plen=3, prio=3, max_new=100)
    s.add(hi)
    tokens_b = b.num_tokens
    out = s.schedule(1.0)
    assert ids(out.park) == ["b"]          # lowest priority (0), and later than a
    assert ids(out.prefill) == ["hi"]
    assert out.restore == ()
    assert b.state == RequestState.PREEMPTED and b.num_preemptions == 1
    assert b in s.waiting and b not in s.running
    assert s.kv.host_bytes == tokens_b * KVB
    assert set(ids(out.decode)) == {"p1", "a", "p2", "hi"}
    execute(s, out)
    # the batch is still full: b stays parked and keeps its bytes
    out = step(s, 2.0)
    assert out.restore == () and b.state == RequestState.PREEMPTED
    assert s.kv.host_bytes == tokens_b * KVB
    # room frees: b comes back by restore, not prefill
    s.finish(hi, FinishReason.EOS)
    n_out = len(b.output_ids)
    out = s.schedule(3.0)
    assert ids(out.restore) == ["b"] and out.prefill == ()
    assert b.state == RequestState.RUNNING
    assert len(b.output_ids) == n_out
    assert s.kv.host_bytes == 0
    assert b.parked_seconds == pytest.approx(2.0)


def test_preemption_victim_on_ties_is_the_row_nearest_its_end():
    """Among rows of the lowest priority the one with the fewest tokens left in its budget is
    parked (then the latest arrival): parking the row that would finish last can stretch the
    batch's tail by its time parked (Scheduler._victim_order)."""
    s = make_sched(max_batch_size=3)
    reqs = [make_req(rid, plen=4, max_new=m) for rid, m in (("long", 900), ("short", 30), ("mid", 300))]
    for r in reqs:
        s.add(r)
    step(s)
    hi = make_req("hi", plen=3, prio=5, max_new=10)
    s.add(hi)
    out = s.schedule(1.0)
    assert ids(out.park) == ["short"] and ids(out.prefill) == ["hi"]
    execute(s, out)
    hi2 = make_req("hi2", plen=3, prio=5, max_new=10)
    s.add(hi2)
    out = s.schedule(2.0)
    assert ids(out.park) == ["mid"]


def test_a_queued_request_is_not_passed_over_by_rows_parked_after_it_arrived():
    """Among equal priorities the queue is ordered by how long each has waited, counted from a
    parked row's park (as aging counts it), not by arrival alone. By arrival, a row parked for a
    higher-priority arrival (it arrived before the queued request) took every freed slot ahead
    of a request that had been queued all along: in W3 with aging off one waited ~5 s and ended
    the batch late (docs/benchmarks.md note 27; benchmarks/replay_scheduler.py)."""
    s = make_sched(max_batch_size=2)
    a, b = make_req("a", max_new=50, t=0.0), make_req("b", max_new=40, t=0.0)
    queued = make_req("queued", max_new=50, t=0.0)
    for r in (a, b, queued):
        s.add(r)
    step(s, now=0.0)
    assert ids(s.running) == ["a", "b"] and ids(s.waiting) == ["queued"]
    for cycle in range(3):   # a high-priority request parks a row; when it ends, one slot frees
        hi = make_req(f"hi{cycle}", prio=5, max_new=2, t=1.0 + cycle)
        s.add(hi)
        out = step(s, now=1.0 + cycle)
        assert ids(out.prefill) == [f"hi{cycle}"] and len(out.park) == 1
        parked = out.park[0]
        out = step(s, now=1.5 + cycle)   # hi ends here; its slot is free from the next step
        out = step(s, now=1.6 + cycle)
        if queued.state == RequestState.RUNNING:
            break
        assert parked.state == RequestState.PREEMPTED
    assert queued.state == RequestState.RUNNING and cycle == 0, (cycle, ids(s.running), ids(s.waiting))


def test_preemption_evicts_as_many_as_needed_for_kv():
    s = make_sched(max_batch_size=8, kv_budget_tokens=40)
    a, b, c = _full_batch(s, [("a", 9, 0), ("b", 9, 0), ("c", 9, 1)])
    assert s.kv_tokens_running == 3 * 11  # 9 prompt + 1 generated with K/V + 1 headroom
    hi = make_req("hi", plen=15, prio=2)  # needs 16: 33 + 16 > 40; without b: 22 + 16 = 38 fits
    s.add(hi)
    out = s.schedule(0.0)
    assert ids(out.park) == ["b"]
    assert ids(out.prefill) == ["hi"]
    assert s.kv.host_bytes == b.num_tokens * KVB
    hi2 = make_req("hi2", plen=15, prio=2)  # would need a (prio 0) and c (prio 1) out: a goes, then c
    s.add(hi2)
    out = s.schedule(0.0)
    assert ids(out.park) == ["a", "c"]
    assert ids(out.prefill) == ["hi2"]
    assert s.kv.host_bytes == (a.num_tokens + b.num_tokens + c.num_tokens) * KVB


def test_equal_priority_never_preempts():
    s = make_sched(max_batch_size=2)
    _full_batch(s, [("a", 4, 1), ("b", 4, 1)])
    s.add(make_req("c", plen=4, prio=1))
    out = s.schedule(0.0)
    assert out.park == () and out.prefill == ()
    s.add(make_req("d", plen=4, prio=0))
    out = s.schedule(0.0)
    assert out.park == () and out.prefill == ()
    assert s.kv.host_bytes == 0


def test_no_ping_pong_between_two_priorities():
    s = make_sched(max_batch_size=1)
    lo = make_req("lo", prio=0, max_new=6)
    s.add(lo)
    step(s)
    hi = make_req("hi", prio=1, max_new=6)
    s.add(hi)
    seen_parks = []
    for _ in range(30):
        out = step(s)
        seen_parks += ids(out.park)
        if not s.by_id:
            break
    assert seen_parks == ["lo"]
    assert lo.finish_reason == hi.finish_reason == FinishReason.LENGTH
    assert len(lo.output_ids) == len(hi.output_ids) == 6
    assert s.kv.host_bytes == 0


def test_host_pool_full_no_preemption_and_suspend_refused():
    # after one step a row of 4 prompt + 2 generated has num_tokens 5 -> 50 bytes when parked
    s = make_sched(max_batch_size=2, host_budget_bytes=49)
    a, b = _full_batch(s, [("a", 4, 0), ("b", 4, 0)])
    s.add(make_req("hi", plen=4, prio=5))
    out = s.schedule(0.0)
    assert out.park == () and out.prefill == ()
    assert a.state == b.state == RequestState.RUNNING
    assert s.kv.host_bytes == 0
    with pytest.raises(HostPoolFull):
        s.suspend("a", 0.0)
    assert a.state == RequestState.RUNNING and a in s.running
    # a queued request can still be suspended: it has no K/V to park
    s.suspend("hi", 0.0)
    assert s.get("hi").state == RequestState.SUSPENDED


def test_host_pool_exactly_full_is_allowed():
    s = make_sched(max_batch_size=1, host_budget_bytes=50)
    (a,) = _full_batch(s, [("a", 4, 0)])
    assert a.num_tokens * KVB == 50  # 4 prompt + 2 generated, the last without K/V yet
    s.add(make_req("hi", plen=4, prio=5))
    out = s.schedule(0.0)
    assert ids(out.park) == ["a"] and s.kv.host_bytes == 50


def test_pressure_parks_lowest_row_and_admits_nothing():
    s = make_sched()
    p2, p0a, p0b = _full_batch(s, [("p2", 4, 2), ("p0a", 4, 0), ("p0b", 5, 0)])
    s.add(make_req("new", plen=4, prio=9))
    out = s.schedule(0.0, pressure=True)
    assert out.pressure is True
    assert ids(out.park) == ["p0b"]
    assert out.prefill == () and out.restore == ()
    assert p0b.state == RequestState.PREEMPTED
    assert s.kv.host_bytes == p0b.num_tokens * KVB
    assert set(ids(out.decode)) == {"p2", "p0a"}
    execute(s, out)
    out = s.schedule(0.0, pressure=True)
    assert ids(out.park) == ["p0a"]
    execute(s, out)
    # one row left: pressure never parks the last one
    out = s.schedule(0.0, pressure=True)
    assert out.park == () and ids(out.decode) == ["p2"]
    execute(s, out)
    # pressure gone: the newcomer first (priority 9), then the parked ones by restore
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["new"]
    assert ids(out.restore) == ["p0a", "p0b"]
    assert s.kv.host_bytes == 0


def test_pressure_respects_host_pool():
    s = make_sched(host_budget_bytes=1)
    _full_batch(s, [("a", 4, 0), ("b", 4, 0)])
    out = s.schedule(0.0, pressure=True)
    assert out.park == () and len(out.decode) == 2


# ---- suspend / resume / cancel ----------------------------------------------------------------
def test_suspend_running_parks_then_resume_restores():
    s = make_sched()
    a, b = _full_batch(s, [("a", 6, 0), ("b", 4, 0)])
    tokens = a.num_tokens
    assert s.suspend("a", 5.0) is a
    assert a.state == RequestState.SUSPENDED
    assert a in s.suspended and a not in s.running and a not in s.waiting
    assert s.kv.host_bytes == tokens * KVB
    assert s.suspend("a", 6.0) is a  # idempotent
    assert s.kv.host_bytes == tokens * KVB
    out = step(s, 7.0)
    assert ids(out.park) == ["a"]
    assert ids(out.decode) == ["b"]
    n_out = len(a.output_ids)
    for _ in range(3):
        out = step(s, 8.0)
        assert a not in out.decode and a not in out.restore
    assert len(a.output_ids) == n_out
    assert s.resume("a") is a
    assert a.state == RequestState.PREEMPTED and a in s.waiting
    out = s.schedule(10.0)
    assert ids(out.restore) == ["a"] and out.prefill == ()
    assert a.state == RequestState.RUNNING
    assert s.kv.host_bytes == 0
    assert a.parked_seconds == pytest.approx(5.0)


def test_suspend_queued_no_park_resume_then_prefill():
    s = make_sched()
    q = make_req("q")
    s.add(q)
    s.suspend("q", 0.0)
    assert q.state == RequestState.SUSPENDED and q in s.suspended and q not in s.waiting
    out = s.schedule(1.0)
    assert out.park == () and out.prefill == ()
    assert s.kv.host_bytes == 0
    s.resume("q")
    assert q.state == RequestState.QUEUED and q in s.waiting
    out = s.schedule(3.0)
    assert ids(out.prefill) == ["q"] and out.restore == ()
    assert q.parked_seconds == pytest.approx(3.0)


def test_suspend_preempted_keeps_kv_resume_restores():
    s = make_sched(max_batch_size=1)
    (lo,) = _full_batch(s, [("lo", 4, 0)])
    hi = make_req("hi", prio=1, max_new=3)
    s.add(hi)
    out = step(s)
    assert ids(out.park) == ["lo"]
    bytes_lo = lo.num_tokens * KVB
    s.suspend("lo", 0.0)
    assert lo.state == RequestState.SUSPENDED and lo in s.suspended and lo not in s.waiting
    assert s.kv.host_bytes == bytes_lo
    drain_steps = 0
    while hi.state != RequestState.FINISHED:
        out = step(s)
        assert out.restore == ()
        drain_steps += 1
        assert drain_steps < 10
    out = s.schedule(0.0)
    assert out.restore == ()  # still suspended
    s.resume("lo")
    assert lo.state == RequestState.PREEMPTED
    out = s.schedule(0.0)
    assert ids(out.restore) == ["lo"]
    assert s.kv.host_bytes == 0


def test_resume_of_not_suspended_is_noop():
    s = make_sched()
    (a,) = _full_batch(s, [("a", 4, 0)])
    assert s.resume("a").state == RequestState.RUNNING
    q = make_req("q")
    s.add(q)
    assert s.resume("q").state == RequestState.QUEUED


def test_suspend_then_resume_in_same_window_parks_and_restores():
    s = make_sched()
    (a,) = _full_batch(s, [("a", 4, 0)])
    s.suspend("a", 0.0)
    s.resume("a")
    out = s.schedule(0.0)
    # K/V are copied out and back in the same step; the accounting ends balanced
    assert ids(out.park) == ["a"] and ids(out.restore) == ["a"]
    assert a.state == RequestState.RUNNING and ids(out.decode) == ["a"]
    assert s.kv.host_bytes == 0


@pytest.mark.parametrize("where", ["running", "queued", "suspended_running", "suspended_queued", "preempted"])
def test_cancel_everywhere(where):
    s = make_sched(max_batch_size=1)
    if where in ("running", "suspended_running", "preempted"):
        (r,) = _full_batch(s, [("r", 4, 0)])
        if where == "suspended_running":
            s.suspend("r", 0.0)
            step(s)
        elif where == "preempted":
            s.add(make_req("hi", prio=3, max_new=100))
            out = step(s)
            assert ids(out.park) == ["r"]
    else:
        r = make_req("r")
        s.add(r)
        if where == "suspended_queued":
            s.suspend("r", 0.0)
    assert s.get("r") is r
    assert s.cancel("r") is r
    assert r.state == RequestState.FINISHED and r.finish_reason == FinishReason.CANCELLED
    assert "r" not in s.by_id
    assert r not in s.running and r not in s.waiting and r not in s.suspended
    assert s.kv.host_bytes == 0
    out = s.schedule(0.0)
    assert ids(out.free) == ["r"]
    assert r not in out.decode and r not in out.prefill and r not in out.restore
    out = s.schedule(0.0)
    assert out.free == ()
    with pytest.raises(RequestFinished):
        s.cancel("r")


def test_cancel_after_suspend_before_copy_drops_park():
    s = make_sched()
    (a,) = _full_batch(s, [("a", 4, 0)])
    s.suspend("a", 0.0)
    assert s.kv.host_bytes > 0
    s.cancel("a")
    out = s.schedule(0.0)
    assert ids(out.free) == ["a"] and out.park == ()
    assert s.kv.host_bytes == 0


def test_cancel_with_error_reason():
    s = make_sched()
    s.add(make_req("a"))
    r = s.cancel("a", FinishReason.ERROR)
    assert r.finish_reason == FinishReason.ERROR


def test_get_unknown_not_found():
    s = make_sched()
    for call in (lambda: s.get("nope"), lambda: s.cancel("nope"), lambda: s.suspend("nope", 0.0),
                 lambda: s.resume("nope"), lambda: s.set_priority("nope", 1)):
        with pytest.raises(UnknownRequest):
            call()


def test_add_duplicate_id_rejected():
    s = make_sched()
    s.add(make_req("a"))
    with pytest.raises(DuplicateRequest):
        s.add(make_req("a"))


@pytest.mark.parametrize("how", ["finish", "cancel"])
def test_get_finished_is_failed_precondition(how):
    s = make_sched()
    if how == "finish":
        (a,) = _full_batch(s, [("a", 4, 0)])
        s.finish(a, FinishReason.EOS)
    else:
        s.add(make_req("a"))
        s.cancel("a")
    assert "a" not in s.by_id and s.num_unfinished == 0
    for call in (lambda: s.get("a"), lambda: s.cancel("a"), lambda: s.suspend("a", 0.0),
                 lambda: s.resume("a"), lambda: s.set_priority("a", 1)):
        with pytest.raises(RequestFinished):
            call()


def test_finished_ids_forgotten_beyond_limit_and_reusable(monkeypatch):
    monkeypatch.setattr(scheduler_module, "FINISHED_IDS_KEPT", 3)
    s = make_sched()
    for i in range(5):
        s.add(make_req(f"f{i}"))
        s.cancel(f"f{i}")
    for i in (0, 1):
        with pytest.raises(UnknownRequest):
            s.get(f"f{i}")
    for i in (2, 3, 4):
        with pytest.raises(RequestFinished):
            s.get(f"f{i}")
    # a finished id may be used again by a new request
    r = make_req("f4")
    s.add(r)
    assert s.get("f4") is r and r.state == RequestState.QUEUED


# ---- aging and set_priority -----------------------------------------------------------------
def test_aging_old_low_priority_admitted_before_new_high():
    s = make_sched(max_batch_size=1, aging_seconds=10.0)
    old = make_req("old", prio=0, t=0.0)
    new = make_req("new", prio=2, t=25.0)
    s.add(old)
    s.add(new)
    out = s.schedule(25.0)  # old: 0 + 25/10 = 2.5 > 2
    assert ids(out.prefill) == ["old"]
    assert s.queue_position(new, 25.0) == 0


def test_aging_not_yet_enough():
    s = make_sched(max_batch_size=1, aging_seconds=10.0)
    s.add(make_req("old", prio=0, t=0.0))
    s.add(make_req("new", prio=2, t=15.0))
    out = s.schedule(15.0)  # old: 1.5 < 2
    assert ids(out.prefill) == ["new"]


def test_aging_never_preempts():
    s = make_sched(max_batch_size=1, aging_seconds=10.0)
    run = make_req("run", prio=1, max_new=1000, t=0.0)
    s.add(run)
    step(s, 0.0)
    old = make_req("old", prio=0, t=0.0)
    s.add(old)
    for now in (10.0, 100.0, 1000.0, 10_000.0):
        out = step(s, now)
        assert out.park == () and out.prefill == ()
        assert run.state == RequestState.RUNNING and old.state == RequestState.QUEUED


def test_aging_off_by_default():
    s = make_sched(max_batch_size=1)
    s.add(make_req("old", prio=0, t=0.0))
    s.add(make_req("new", prio=1, t=1000.0))
    assert ids(s.schedule(1000.0).prefill) == ["new"]


def test_set_priority_reorders_waiting():
    s = make_sched(max_batch_size=1)
    a, b, c = make_req("a"), make_req("b"), make_req("c")
    for r in (a, b, c):
        s.add(r)
    assert s.set_priority("c", 5) is c
    assert s.queue_position(c, 0.0) == 0
    s.set_priority("a", -1)
    order = []
    for _ in range(100):
        order += ids(step(s).prefill)
        if not s.by_id:
            break
    assert order == ["c", "b", "a"]


def test_set_priority_raised_waiting_request_preempts():
    s = make_sched(max_batch_size=1)
    (run,) = _full_batch(s, [("run", 4, 1)])
    w = make_req("w", prio=0)
    s.add(w)
    assert s.schedule(0.0).park == ()
    s.set_priority("w", 2)
    out = s.schedule(0.0)
    assert ids(out.park) == ["run"] and ids(out.prefill) == ["w"]


# ---- bugs found -------------------------------------------------------------------------------
def test_running_rows_outgrowing_kv_budget_are_parked():
    s = make_sched(max_batch_size=4, kv_budget_tokens=20)
    a, b = make_req("a", plen=9, max_new=50), make_req("b", plen=9, max_new=50)
    s.add(a)
    s.add(b)
    out = s.schedule(0.0)
    assert ids(out.prefill) == ["a", "b"]
    assert s.kv_tokens_running == 20  # at admission: 10 + 10, exactly the budget
    execute(s, out)  # each row gains one K/V column: 11 + 11 = 22 > 20
    for _ in range(3):
        s.schedule(0.0)
        # the scheduler's own invariant: running rows never hold more than the budget
        assert s.kv_tokens_running <= 20
        execute(s, SchedulerOutput((), (), (), (), tuple(s.running)))


def test_no_preemption_when_it_cannot_make_room():
    s = make_sched(max_batch_size=4, kv_budget_tokens=30)
    x, a = _full_batch(s, [("x", 18, 10), ("a", 3, 0)])  # x holds 20, a holds 5 -> 25
    c = make_req("c", plen=14, prio=5)  # needs 15: even without a, 20 + 15 > 30; x outranks c
    s.add(c)
    out = s.schedule(0.0)
    assert out.prefill == ()
    assert out.park == ()  # actual: ("a",) - a parked although c still cannot run
    assert a.state == RequestState.RUNNING


# ---- randomized invariants --------------------------------------------------------------------
def check_invariants(s: Scheduler, reqs: list[Request], admitted: bool = False) -> None:
    """`admitted`: the last schedule took someone into the batch."""
    cfg = s.config
    for pool in (s.running, s.waiting, s.suspended, s.prefilling, s.loading):
        assert len(pool) == len(set(map(id, pool)))
    for r in s.prefilling:   # admitted, prompt not all planned yet
        assert r in s.running and r.prefilled < len(r.prompt_ids)
    for r in s.loading:      # admitted, held for its cached prefix: no row yet
        assert r in s.running and r not in s.prefilling and not r.output_ids
    for r in s.running:
        assert r in s.prefilling or r.prefilled == len(r.prompt_ids)
    for r in reqs:
        where = [r in s.running, r in s.waiting, r in s.suspended]
        if r.state == RequestState.FINISHED:
            assert sum(where) == 0 and r.request_id not in s.by_id
        else:
            assert sum(where) == 1, (r.request_id, r.state, where)
            assert s.by_id[r.request_id] is r
            if r in s.running:
                assert r.state == RequestState.RUNNING
            elif r in s.waiting:
                assert r.state in (RequestState.QUEUED, RequestState.PREEMPTED)
            else:
                assert r.state == RequestState.SUSPENDED
            if r.state == RequestState.QUEUED:
                assert r.output_ids == []
            if r.state == RequestState.PREEMPTED:
                assert r.output_ids
    assert set(s.by_id) == {r.request_id for r in reqs if r.state != RequestState.FINISHED}
    assert len(s.running) <= cfg.max_batch_size
    if admitted:
        # admission never overshoots the budget (growing rows are parked at the next schedule)
        assert s.kv_tokens_running <= cfg.kv_budget_tokens
    parked_kv = [r for r in reqs
                 if r.state in (RequestState.PREEMPTED, RequestState.SUSPENDED) and r.output_ids]
    assert s.kv.host_bytes == sum(r.num_tokens * cfg.kv_bytes_per_token for r in parked_kv)
    assert 0 <= s.kv.host_bytes <= cfg.host_budget_bytes


def _random_run(seed: int) -> None:
    rng = random.Random(seed)
    # A consistent config: one row (at most 20 prompt + 12 new tokens) always fits the K/V budget alone.
    # (With kv_budget_tokens < one full row, a row that outgrew the budget and was then parked can never
    # be restored and blocks the queue for good; see the report.)
    cfg = dict(max_batch_size=rng.randint(1, 5), max_prefill_tokens=rng.choice([8, 20, 60, 1000]),
               max_row_tokens=32, kv_budget_tokens=rng.choice([32, 45, 80, 10_000]),
               kv_bytes_per_token=rng.choice([1, 7]), aging_seconds=rng.choice([0.0, 0.0, 5.0]),
               prefill_chunk_tokens=rng.choice([0, 0, 3, 7, 50]), prefill_padded=rng.random() < 0.5)
    cfg["host_budget_bytes"] = rng.choice([0, 30, 100, 10**9]) * cfg["kv_bytes_per_token"]
    s = make_sched(**cfg)
    holds = rng.random() < 0.5   # the engine holds some newcomers for their host blocks
    reqs: list[Request] = []
    cancelled_since: list[Request] = []
    suspended_since: list[Request] = []
    now = 0.0
    out = None
    n_ops = rng.randint(20, 120)
    for _ in range(n_ops):
        now += rng.choice([0.0, 0.5, 3.0])
        live = [r for r in reqs if r.state != RequestState.FINISHED]
        op = rng.choices(["add", "schedule", "suspend", "resume", "cancel", "prio", "pressure"],
                         weights=[4, 8, 1.5, 1.5, 1, 1, 1])[0]
        if op == "add" or not live and op != "schedule":
            r = make_req(f"r{len(reqs)}", plen=rng.randint(1, 20), prio=rng.randint(0, 3),
                         max_new=rng.randint(1, 12), t=now)
            reqs.append(r)
            s.add(r)
        elif op in ("schedule", "pressure"):
            budget_before_schedule = s.kv_tokens_running
            prefilling_before = list(s.prefilling)
            prefilled_before = {id(r): r.prefilled for r in s.prefilling}
            running_before = set(map(id, s.running))
            out = s.schedule(now, pressure=(op == "pressure"))
            planned = s.config.prefill_chunk_tokens
            if planned:   # at most the chunk budget of prompt tokens, in admission order
                assert sum(len(r.prompt_ids) for r in out.prefill) + sum(e - b for _, b, e in out.chunks) <= planned
                # a prompt starts its chunks (a partial K/V) only while fewer than the limit are
                # open, or with a higher priority than every open one
                open_ = [r for r in prefilling_before if prefilled_before[id(r)] > 0]
                for r, b, e in out.chunks:
                    if b == 0 and e < len(r.prompt_ids):
                        assert len(open_) < s.config.max_prompts_in_chunks or \
                            all(r.priority > o.priority for o in open_), (r.request_id, [o.request_id for o in open_])
                        open_.append(r)
            assert set(map(id, out.free)) == set(map(id, cancelled_since))
            cancelled_since.clear()
            assert not set(map(id, out.park)) & set(map(id, s.loading))   # a held request is never parked
            for v in out.park:
                if v in suspended_since:
                    continue
                assert v.state in (RequestState.PREEMPTED, RequestState.SUSPENDED, RequestState.RUNNING)
                over_budget = budget_before_schedule > s.config.kv_budget_tokens
                if v.state == RequestState.PREEMPTED and not out.pressure and v in s.waiting and not over_budget:
                    # only a strictly higher base priority may evict (or the batch outgrowing its budget)
                    evictors = (*out.prefill, *out.restore, *s.waiting, *s.prefilling, *(c[0] for c in out.chunks))
                    assert any(w.priority > v.priority for w in evictors)
            for r in (*out.prefill, *out.restore):
                assert r.state == RequestState.RUNNING
            assert list(out.decode) == s.running
            if out.pressure and out.decode != out.prefill + out.restore:
                # (an empty batch may admit one; prompts admitted before go on being prefilled)
                assert out.restore == () and all(r in prefilling_before for r in out.prefill)
            suspended_since.clear()
            check_invariants(s, reqs, admitted=bool(set(map(id, s.running)) - running_before))
            execute(s, out, rng if holds else None)
            out = None
        else:
            r = rng.choice(live)
            if op == "suspend":
                was = r.state
                was_prefilling = r in s.prefilling or r in s.loading
                try:
                    s.suspend(r.request_id, now)
                except HostPoolFull:
                    assert was == RequestState.RUNNING
                    assert r.state == RequestState.RUNNING
                else:
                    assert r.state == RequestState.SUSPENDED
                    suspended_since.append(r)
                    if was_prefilling:   # its partial K/V are dropped, not parked
                        cancelled_since.append(r)
                        assert r.prefilled == 0
            elif op == "resume":
                was = r.state
                s.resume(r.request_id)
                if was == RequestState.SUSPENDED:
                    assert r.state == (RequestState.PREEMPTED if r.output_ids else RequestState.QUEUED)
                else:
                    assert r.state == was
            elif op == "cancel":
                s.cancel(r.request_id)
                cancelled_since.append(r)
                assert r.finish_reason == FinishReason.CANCELLED
            else:
                s.set_priority(r.request_id, rng.randint(0, 3))
        check_invariants(s, reqs)
    # drive to completion
    for r in list(s.suspended):
        s.resume(r.request_id)
    for _ in range(2000):
        if not s.has_work():
            break
        now += 1.0
        running_before = set(map(id, s.running))
        out = s.schedule(now)
        check_invariants(s, reqs, admitted=bool(set(map(id, s.running)) - running_before))
        execute(s, out, rng if holds else None)
        check_invariants(s, reqs)
    assert not s.by_id and not s.running and not s.waiting and not s.suspended
    assert all(r.state == RequestState.FINISHED for r in reqs)
    for r in reqs:
        if r.finish_reason == FinishReason.LENGTH:
            assert len(r.output_ids) == r.params.max_new_tokens
        else:
            assert r.finish_reason == FinishReason.CANCELLED
            assert len(r.output_ids) <= r.params.max_new_tokens
    assert s.kv.host_bytes == 0


@pytest.mark.parametrize("block", range(4))
def test_randomized_invariants(block):
    for seed in range(block * 100, block * 100 + 100):
        _random_run(seed)


def test_pressure_with_an_empty_batch_still_admits_one():
    """Memory pressure must not livelock the engine: with no running row, one request is admitted."""
    s = make_sched()
    for i in range(3):
        s.add(make_req(f"w{i}"))
    out = s.schedule(0.0, pressure=True)
    assert [r.request_id for r in out.prefill] == ["w0"]
    out = s.schedule(0.0, pressure=True)
    assert out.prefill == () and out.restore == ()


def test_memory_watermarks_leave_the_kv_pool_out():
    """A pool taking 85% of free memory must not by itself read as pressure (the trap that held a
    4,096-context slab to one row on an H200): 140 GB device, 14 GB weights, 106 GB pool, 2 GB of
    activations in use -> 16/34 of the memory outside the pool is taken."""
    from engine.memory import used_fraction_outside
    GB = 1 << 30
    assert used_fraction_outside(140 * GB, 18 * GB, 106 * GB) == pytest.approx(16 / 34)
    assert used_fraction_outside(140 * GB, 18 * GB, 0) == pytest.approx(122 / 140)
    assert used_fraction_outside(140 * GB, 0, 140 * GB) == 1.0
