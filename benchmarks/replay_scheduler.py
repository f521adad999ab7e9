"""W3 replayed step by step through the real scheduler, no model: `python -m benchmarks.replay_scheduler`.

W3 on the H200 took ~54 more decode steps than its low-priority work alone (579 against 525,
note 27), and its low-priority ratio missed the 0.95 target. This feeds W3's requests (and its
low-priority requests alone) to `engine.scheduler.Scheduler` with a modelled clock: each step
with rows costs `--step-ms`; a prefill forward costs `--prefill-fixed-ms` plus
`--prefill-us-per-token` per prompt token (H200 figures, note 27); every row gains one token a
step, prompts give their first token; arrivals come at their times on that clock. It reports
decode steps, the low-priority work's end, preemptions, the parked rows, and the low-priority
requests admitted last, under the scheduler's rules, two other preemption rules, and the
admission order before note 27 (equal priorities by arrival alone: there a request queued from
the start waited ~5 s behind rows parked after it, which is what it found). What it leaves out
is what the engine adds: memory pressure, the device's real times, the engine's own order of a
step.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import workloads
from engine.request import FinishReason, Request, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

RULES = {   # preemption order among rows of one priority (smallest first); "engine" = the scheduler's own
    "engine": None,
    "latest-arrival": lambda r: (r.priority, -r.arrival_seq),
    "most-tokens-left": lambda r: (r.priority, len(r.output_ids) - r.params.max_new_tokens, -r.arrival_seq),
}


def _admission_by_arrival(self, request: Request, now: float) -> tuple:
    """The admission order before note 27 (with aging off: priority, then arrival)."""
    return (-float(request.priority), request.arrival_seq)


def replay(reqs, args, rule=None, admission=None) -> dict:
    scheduler = Scheduler(SchedulerConfig(
        max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens, kv_budget_tokens=10**8,
        max_row_tokens=4096, kv_bytes_per_token=524288, host_budget_bytes=64 << 30, aging_seconds=0,
        kv_page_size=128, prefill_padded=False))
    if rule is not None:
        scheduler._victim_order = rule
    if admission is not None:
        scheduler._admission_key = admission.__get__(scheduler)
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    now, steps, made = 0.0, 0, []
    while pending or scheduler.has_work():
        while pending and reqs[pending[0]].arrival_s <= now:
            b = reqs[pending.pop(0)]
            made.append(Request(f"r{len(made)}", list(b.prompt_ids), SamplingParams(max_new_tokens=b.max_new_tokens,
                                                                                   ignore_eos=True),
                                priority=b.priority, arrival_time=now))
            scheduler.add(made[-1])
        if not scheduler.has_work():
            now = reqs[pending[0]].arrival_s
            continue
        out = scheduler.schedule(now)
        new = {id(r) for r in out.prefill}
        decoding = [r for r in scheduler.running if id(r) not in new]   # newcomers decode from the next step
        spent = 0.0
        if out.prefill:
            spent += (args.prefill_fixed_ms + args.prefill_us_per_token / 1000 * sum(len(r.prompt_ids) for r in out.prefill)) / 1000
        for r in out.prefill:
            r.first_token_time = now + spent
        if decoding:
            spent += args.step_ms / 1000
            steps += 1
        for r in list(out.prefill) + decoding:
            r.output_ids.append(1)
            if len(r.output_ids) >= r.params.max_new_tokens:
                scheduler.finish(r, FinishReason.LENGTH)
        now += spent
    low = [r for r in made if r.priority == min(q.priority for q in made)]
    late = sorted(low, key=lambda r: -r.first_token_time)[:4]
    return {"decode_steps": steps, "seconds": round(now, 3), "preemptions": sum(r.num_preemptions for r in made),
            "parked (times, seconds, max tokens)": sorted(((r.num_preemptions, round(r.parked_seconds, 2),
                                                            r.params.max_new_tokens) for r in low if r.num_preemptions),
                                                          reverse=True)[:8],
            "admitted last (first token s, max tokens)": [(round(r.first_token_time - r.arrival_time, 2),
                                                           r.params.max_new_tokens) for r in late]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--step-ms", type=float, default=16.0)
    p.add_argument("--prefill-fixed-ms", type=float, default=6.0)
    p.add_argument("--prefill-us-per-token", type=float, default=27.0)
    args = p.parse_args()
    w3 = workloads.w3(num_low=args.max_batch_size, num_high=16, high_every_s=0.5)
    alone = [r for r in w3 if r.priority == 0]
    print(json.dumps({"alone": replay(alone, args)}))
    for name, rule in RULES.items():
        print(json.dumps({f"w3, preemption rule {name}": replay(w3, args, rule)}))
    print(json.dumps({"w3, admission by arrival (before note 27)": replay(w3, args, admission=_admission_by_arrival)}))


if __name__ == "__main__":
    main()
