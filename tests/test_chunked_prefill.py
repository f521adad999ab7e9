"""Chunked prefill (--prefill-chunk-tokens): prompts are prefilled a chunk per step between decode
steps, in priority order, and the output is the same as HF `generate` on each request alone.

The exactness matrix (families x layouts x chunk sizes, with chunks that split a prompt mid-page
and mid-16-column block) shares one model load per family.
"""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from engine.request import PreemptAction, Request, RequestState, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from tests.conftest import CPU, drive, hf_reference, make_engine

LONG = "Once upon a time, in a land far away, there lived a king who had three daughters. " * 3
PROMPTS = [LONG, "The capital of France is", "Why is the sky blue? Explain it to a child in two sentences.",
           "1, 2, 3,", LONG + "The youngest", "def fibonacci(n):"]


# ---- the plan (scheduler, no model) --------------------------------------------------------------
def _sched(chunk: int, **kw) -> Scheduler:
    cfg = dict(max_batch_size=8, max_prefill_tokens=10_000, kv_budget_tokens=100_000, max_row_tokens=10_000,
               kv_bytes_per_token=1, host_budget_bytes=10**9, prefill_chunk_tokens=chunk)
    return Scheduler(SchedulerConfig(**{**cfg, **kw}))


def _req(rid: str, n: int, prio: int = 0) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=4), priority=prio)


def test_plan_spends_the_chunk_budget_in_admission_order():
    s = _sched(chunk=100)
    s.add(_req("long", 250))
    s.add(_req("short", 30))
    out = s.schedule(0.0)
    assert out.prefill == () and [(r.request_id, b, e) for r, b, e in out.chunks] == [("long", 0, 100)]
    assert [r.request_id for r in s.running] == ["long"]          # "short" waits: the budget is spent
    out = s.schedule(0.0)
    assert [(r.request_id, b, e) for r, b, e in out.chunks] == [("long", 100, 200)]
    out = s.schedule(0.0)
    # the last 50 of "long", then "short" whole (a prompt that fits the rest goes to the grouped forward)
    assert [(r.request_id, b, e) for r, b, e in out.chunks] == [("long", 200, 250)]
    assert [r.request_id for r in out.prefill] == ["short"]
    assert s.prefilling == []


def test_higher_priority_prompt_goes_before_the_rest_of_a_lower_one():
    s = _sched(chunk=64)
    s.add(_req("low", 300, prio=0))
    s.schedule(0.0)
    s.add(_req("high", 100, prio=5))
    out = s.schedule(0.0)
    assert [(r.request_id, b, e) for r, b, e in out.chunks] == [("high", 0, 64)]
    out = s.schedule(0.0)
    assert [(r.request_id, b, e) for r, b, e in out.chunks] == [("high", 64, 100), ("low", 64, 92)]


def test_one_prompt_in_chunks_at_a_time_unless_a_higher_priority_one_comes():
    """max_prompts_in_chunks (1): a long prompt does not start its chunks while another prompt's
    are open (the engine's chunk graphs have one workspace), even with budget left over, and a
    higher-priority one starts anyway."""
    s = _sched(chunk=100)
    s.add(_req("a", 150))
    s.schedule(0.0)                                   # a: 0-100
    s.add(_req("b", 300))
    out = s.schedule(0.0)
    # a's last 50; b, admitted, would start a second partial K/V in the same forward: it waits
    assert [(r.request_id, x, y) for r, x, y in out.chunks] == [("a", 100, 150)] and out.prefill == ()
    out = s.schedule(0.0)
    assert [(r.request_id, x, y) for r, x, y in out.chunks] == [("b", 0, 100)]
    s.add(_req("d", 300))
    s.add(_req("high", 300, prio=5))
    out = s.schedule(0.0)
    assert [(r.request_id, x, y) for r, x, y in out.chunks] == [("high", 0, 100)]
    out = s.schedule(0.0)                             # d (priority 0) waits for b and high
    assert [(r.request_id, x, y) for r, x, y in out.chunks] == [("high", 100, 200)]
    s2 = _sched(chunk=100, max_prompts_in_chunks=2)
    s2.add(_req("a", 150))
    s2.schedule(0.0)
    s2.add(_req("b", 300))
    out = s2.schedule(0.0)
    assert [(r.request_id, x, y) for r, x, y in out.chunks] == [("a", 100, 150), ("b", 0, 50)]


def test_rows_still_prefilling_are_never_preempted_and_suspend_drops_their_partial_kv():
    s = _sched(chunk=10, max_batch_size=2)
    s.add(_req("a", 40))
    s.schedule(0.0)
    s.add(_req("hi", 4, prio=9))
    s.add(_req("hi2", 4, prio=9))
    out = s.schedule(0.0)
    assert out.park == ()                      # "a" is not a row yet: nothing to park
    s.suspend("a", 0.0)
    out = s.schedule(0.0)
    assert [r.request_id for r in out.free] == ["a"]       # the engine drops its partial K/V
    assert s.by_id["a"].state == RequestState.SUSPENDED and s.by_id["a"].prefilled == 0
    assert s.resume("a").state == RequestState.QUEUED      # prefilled again from the start


# ---- exactness (model) ---------------------------------------------------------------------------
def _arrivals():
    lengths, steps = [24, 18, 30, 9, 12, 20], [0, 0, 1, 3, 3, 6]
    arrivals: dict[int, list[GenerateInput]] = {}
    for i, (prompt, n, step) in enumerate(zip(PROMPTS, lengths, steps)):
        arrivals.setdefault(step, []).append(GenerateInput(request_id=f"r{i}", prompt=prompt, max_new_tokens=n,
                                                           ignore_eos=True))
    return arrivals


def _expected(loaded, arrivals) -> dict[str, list[int]]:
    hf_model, tokenizer, _ = loaded
    return {inp.request_id: hf_reference(hf_model, tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            for inputs in arrivals.values() for inp in inputs}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_case(request, tiny_model_dir):
    loaded = model_loader.load(tiny_model_dir(request.param), CPU, torch.float32)
    return loaded, _expected(loaded, _arrivals())


LAYOUTS = {"slab": dict(kv_layout="slab"), "paged16": dict(kv_layout="paged", kv_page_size=16)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [7, 40])
def test_chunked_prefill_matches_hf(family_case, layout, chunk):
    """Chunks of 7 split prompts mid-page (pages of 16) and mid-16-column mask block; 40 lets short
    prompts go whole through the grouped forward beside a long prompt's chunks."""
    loaded, expected = family_case
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=160, prefill_chunk_tokens=chunk,
                                 **LAYOUTS[layout])
    outputs = drive(engine, limits, _arrivals())
    assert {rid: out.token_ids for rid, out in outputs.items()} == expected
    stats = engine.stats()
    assert stats.prefill_chunks > 0
    assert stats.prefill_tokens == sum(len(loaded[1](p)["input_ids"]) for p in PROMPTS)
    assert engine._partial == {} and engine.slab.num_rows == 0 and stats.kv_pages_used == 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_running_rows_decode_every_step_while_a_long_prompt_is_chunked(family_case, layout):
    """No stream waits more than one chunk: every step that runs a chunk also decodes the rows."""
    loaded, expected = family_case
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=160, prefill_chunk_tokens=8,
                                 **LAYOUTS[layout])
    arrivals = {0: [GenerateInput(request_id="r1", prompt=PROMPTS[1], max_new_tokens=18, ignore_eos=True)],
                2: [GenerateInput(request_id="r0", prompt=PROMPTS[0], max_new_tokens=24, ignore_eos=True)]}
    tokens_per_step: list[int] = []

    def watch(step, eng, out):
        if step >= 3:
            tokens_per_step.append(len(out["r1"].token_ids))

    outputs = drive(engine, limits, arrivals, on_step=watch)
    steps_while_r1_ran = [b - a for a, b in zip(tokens_per_step, tokens_per_step[1:]) if b < 18]
    assert steps_while_r1_ran and all(n == 1 for n in steps_while_r1_ran)
    assert engine.stats().prefill_chunks >= 5           # r0's prompt took several steps
    assert outputs["r0"].token_ids == expected["r0"] and outputs["r1"].token_ids == expected["r1"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_suspend_and_cancel_while_prefilling(family_case, layout):
    """SUSPEND mid-prompt drops the partial K/V and RESUME prefills it again; CANCEL mid-prompt
    frees it; the other requests' tokens do not change."""
    loaded, expected = family_case
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=160, prefill_chunk_tokens=6,
                                 **LAYOUTS[layout])
    arrivals = {0: [GenerateInput(request_id="r0", prompt=PROMPTS[0], max_new_tokens=24, ignore_eos=True),
                    GenerateInput(request_id="r4", prompt=PROMPTS[4], max_new_tokens=12, ignore_eos=True),
                    GenerateInput(request_id="r1", prompt=PROMPTS[1], max_new_tokens=18, ignore_eos=True)]}
    seen = {}

    def commands(step, eng, out):
        if step == 2:
            seen["partial_before"] = set(eng._partial)
            eng.preempt("r0", PreemptAction.SUSPEND)
            return eng.abort("r4")
        if step == 4:
            seen["partial_after"] = set(eng._partial)
            return eng.preempt("r0", PreemptAction.RESUME)[1]

    outputs = drive(engine, limits, arrivals, on_step=commands)
    assert "r0" in seen["partial_before"] and seen["partial_after"] == set()
    assert outputs["r4"].final.finish_reason.name == "CANCELLED"
    assert outputs["r0"].token_ids == expected["r0"] and outputs["r1"].token_ids == expected["r1"]
    assert engine._partial == {} and engine.stats().kv_pages_used == 0
