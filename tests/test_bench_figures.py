"""The benchmark's derived figures from hand-made token timelines (what docs/benchmarks.md reports)."""
from __future__ import annotations

from benchmarks.bench import itl_by_step_prefill


def test_itl_is_split_by_the_prefill_of_the_step_that_ended_it():
    # one stream: intervals of 10 ms (no prefill), 40 ms (a 512-token graphed prefill in that
    # step), 90 ms (a 2,000-token eager one), 10 ms
    records = {0: {"times": [0.0, 0.010, 0.050, 0.140, 0.150], "step_prefill": [0, 0, 512, 2000, 0]},
               # a stream whose tokens were not tagged (the gRPC path) is left out, not guessed
               1: {"times": [0.0, 1.0]}}
    got = itl_by_step_prefill(records)
    assert got["itl_prefill_none"]["share"] == 0.5
    assert abs(got["itl_prefill_none"]["p99_s"] - 0.010) < 1e-9
    assert got["itl_prefill_graphed"]["share"] == 0.25 and abs(got["itl_prefill_graphed"]["p50_s"] - 0.040) < 1e-9
    assert got["itl_prefill_eager"]["share"] == 0.25 and abs(got["itl_prefill_eager"]["p50_s"] - 0.090) < 1e-9
    assert itl_by_step_prefill({1: {"times": [0.0, 1.0]}}) == {}


def test_delivery_while_requests_arrive_is_the_offered_rate_when_it_keeps_up():
    from benchmarks.bench import late_delivery
    # one arrival a second for 9 s, each stream 10 tokens at 0.1 s apart from its arrival: 10
    # tokens a second in the steady state; then a run where every stream starts 5 s late in a
    # queue that grows (arrival i served from 2 i s): fewer tokens while requests still arrive
    keeps_up = {i: {"arrival": float(i), "times": [i + 0.1 * (k + 1) for k in range(10)]} for i in range(10)}
    late = {i: {"arrival": float(i), "times": [2 * i + 0.1 * (k + 1) for k in range(10)]} for i in range(10)}
    assert abs(late_delivery(keeps_up)["late_arrivals_tok_per_s"] - 10) < 0.8
    assert late_delivery(late)["late_arrivals_tok_per_s"] < 7
    assert late_delivery({0: {"arrival": 0.0, "times": [1.0]}}) == {}
