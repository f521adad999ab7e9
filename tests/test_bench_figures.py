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


def test_w5_gains_per_round_and_their_median():
    from benchmarks.bench import w5_gains
    # two rounds, each against its own off and full device store: the squeezed variant keeps 80%
    # then 50% of the gain by the per-turn medians, 90% then 70% by the mean of all requests
    def run(off, full, squeezed, by_mean):
        return {"off": (off, off), "device_full": (full, full), "device_host_squeezed16": (squeezed, by_mean)}
    out = {}
    for rep, r in enumerate((run(0.2, 0.1, 0.12, 0.11), run(0.3, 0.1, 0.2, 0.16))):
        for name, (p50s, mean) in r.items():
            out[f"w5_paged_{name}_r{rep}"] = {"mean_ttft_p50_turns_2_on_s": p50s, "mean_ttft_turns_2_on_s": mean}
    got = w5_gains(out, "paged", ["off", "device_full", "device_host_squeezed16"], repeats=2)
    key = "w5_paged_device_host_squeezed16_gain_over_full_gain"
    assert [round(x, 6) for x in got[key + "_rounds"]] == [0.8, 0.5] and abs(got[key] - 0.65) < 1e-9
    assert [round(x, 6) for x in got[key + "_by_mean_rounds"]] == [0.9, 0.7] and abs(got[key + "_by_mean"] - 0.8) < 1e-9
    # one round: no per-round list, and no gain where the cache did not help at all
    single = {k[:-3]: v for k, v in out.items() if k.endswith("_r0")}
    assert set(w5_gains(single, "paged", ["off", "device_full", "device_host_squeezed16"], 1)) == {key, key + "_by_mean"}
    single["w5_paged_device_full"] = dict(single["w5_paged_off"])
    assert w5_gains(single, "paged", ["off", "device_full", "device_host_squeezed16"], 1) == {}
