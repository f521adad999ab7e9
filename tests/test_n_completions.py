"""n completions from one prefill (params.n), in the engine: the prompt is prefilled once (counted
once in EngineStats.prefill_tokens), greedy completions equal HF generate, completion i of a seeded
request equals a separate request with seed + i, in both K/V layouts and through chunked prefill;
the scheduler counts n rows; cancel, SUSPEND and RESUME act on every completion."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from engine import model_loader
from engine.errors import TooLarge
from engine.inputs import GenerateInput, InvalidInput, build_request
from engine.request import FinishReason, PreemptAction, RequestState
from tests.conftest import CPU, drive, hf_reference, make_engine

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)


def _by_index(collected) -> dict[int, list]:
    """A request's events, split by completion."""
    out = defaultdict(list)
    for event in collected.events:
        out[event.index].append(event)
    return out


def _tokens(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def _prompt_len(engine, prompt=PROMPT) -> int:
    return len(engine.tokenizer(prompt)["input_ids"])


PACKED = dict(kv_layout="paged", kv_page_size=16, fused_decode=True)   # prefill straight into pages


@pytest.mark.parametrize("overrides", [dict(kv_layout="slab"), dict(kv_layout="paged", kv_page_size=16), PACKED],
                         ids=["slab", "paged", "packed"])
def test_greedy_n3_prefills_once_and_equals_hf(tiny_llama, overrides):
    hf_model, tokenizer, _spec = tiny_llama
    engine, limits = make_engine(tiny_llama, **overrides)
    assert (engine.runner.packed is not None) == (overrides is PACKED)
    out = drive(engine, limits, {0: [GenerateInput(request_id="g", prompt=PROMPT, max_new_tokens=12,
                                                   ignore_eos=True, n=3)]})["g"]
    expected = hf_reference(hf_model, tokenizer(PROMPT)["input_ids"], 12, ())
    completions = _by_index(out)
    assert sorted(completions) == [0, 1, 2]
    for i in range(3):
        assert _tokens(completions[i]) == expected
        last = completions[i][-1]
        assert last.finish_reason == FinishReason.LENGTH and last.completion_tokens == 12
        assert last.prompt_tokens == _prompt_len(engine)
    finals = [e for e in out.events if e.completion_finished]
    assert [e.stream_open for e in finals] == [True, True, False]   # the stream ends with the last one
    assert out.events[-1].finished and out.events[-1].state == RequestState.FINISHED
    assert engine.stats().prefill_tokens == _prompt_len(engine)      # one prefill for three completions
    assert engine.stats().rows_on_device == 0 and not engine.scheduler.groups


def _sampled(request_id: str, seed: int, n: int = 0) -> GenerateInput:
    return GenerateInput(request_id=request_id, prompt=PROMPT, max_new_tokens=16, temperature=0.9, top_k=50,
                         seed=seed, ignore_eos=True, n=n)


@pytest.mark.parametrize("overrides", [dict(kv_layout="slab"), dict(kv_layout="paged", kv_page_size=16),
                                       dict(kv_layout="slab", prefill_chunk_tokens=2), PACKED],
                         ids=["slab", "paged", "chunked", "packed"])
def test_seeded_completion_i_equals_a_request_with_seed_plus_i(tiny_llama, overrides):
    engine, limits = make_engine(tiny_llama, **overrides)
    one = drive(engine, limits, {0: [_sampled("n", 41, n=3)]})["n"]
    assert engine.stats().prefill_tokens == _prompt_len(engine)
    separate = drive(engine, limits, {0: [_sampled(f"s{i}", 41 + i) for i in range(3)]})
    assert engine.stats().prefill_tokens == 4 * _prompt_len(engine)  # three more prefills
    completions = _by_index(one)
    for i in range(3):
        assert _tokens(completions[i]) == separate[f"s{i}"].token_ids
        assert "".join(e.text for e in completions[i]) == separate[f"s{i}"].text
    assert len({tuple(_tokens(completions[i])) for i in range(3)}) == 3   # sampled: they differ


def test_completions_stop_on_their_own(smollm2):
    """Stop rules apply per completion: each ends where its separate twin ends, with its reason."""
    engine, limits = make_engine(smollm2)

    def inp(request_id, seed, n=0):
        return GenerateInput(request_id=request_id, prompt="List three fruits:", max_new_tokens=20,
                             temperature=1.0, top_k=20, seed=seed, stop=("\n",), n=n)

    one = drive(engine, limits, {0: [inp("n", 5, n=4)]})["n"]
    separate = drive(engine, limits, {0: [inp(f"s{i}", 5 + i) for i in range(4)]})
    completions = _by_index(one)
    lengths, reasons = set(), set()
    for i in range(4):
        twin = separate[f"s{i}"]
        assert _tokens(completions[i]) == twin.token_ids
        assert "".join(e.text for e in completions[i]) == twin.text
        last = completions[i][-1]
        assert (last.finish_reason, last.stop_sequence) == (twin.final.finish_reason, twin.final.stop_sequence)
        lengths.add(len(twin.token_ids))
        reasons.add(last.finish_reason)
    assert len(lengths) > 2 and reasons == {FinishReason.LENGTH, FinishReason.STOP_SEQUENCE}   # each on its own


def test_scheduler_counts_n_rows(tiny_llama):
    """A request of n completions takes n rows: with a batch of 4, n=3 and a single request cannot
    all run; n larger than the batch is refused."""
    engine, limits = make_engine(tiny_llama)          # max_batch_size 4
    engine.add_request(build_request(GenerateInput(request_id="a", prompt=PROMPT, max_new_tokens=8,
                                                   ignore_eos=True, n=3), engine.tokenizer, limits))
    engine.add_request(build_request(GenerateInput(request_id="b", prompt=PROMPT, max_new_tokens=8,
                                                   ignore_eos=True, n=2), engine.tokenizer, limits))
    engine.step()
    assert engine.stats().rows_on_device == 3 and engine.stats().requests_waiting == 1
    with pytest.raises(TooLarge):
        engine.add_request(build_request(GenerateInput(request_id="c", prompt=PROMPT, n=5),
                                         engine.tokenizer, limits))
    checked = replace(limits, max_batch_size=4)
    with pytest.raises(InvalidInput, match=r"^params\.n:"):
        build_request(GenerateInput(prompt=PROMPT, n=5), engine.tokenizer, checked)
    with pytest.raises(InvalidInput, match=r"^params\.n:"):
        build_request(GenerateInput(prompt=PROMPT, n=-1), engine.tokenizer, checked)


def test_cancel_ends_every_completion(tiny_llama):
    engine, limits = make_engine(tiny_llama)

    def on_step(step, eng, out):
        if step == 3:
            return eng.abort("c")

    out = drive(engine, limits, {0: [GenerateInput(request_id="c", prompt=PROMPT, max_new_tokens=50,
                                                   ignore_eos=True, n=3)]}, on_step=on_step)["c"]
    finals = [e for e in out.events if e.completion_finished]
    assert sorted(e.index for e in finals) == [0, 1, 2]
    assert all(e.finish_reason == FinishReason.CANCELLED for e in finals)
    assert [e.finished for e in finals] == [False, False, True]
    engine.step()   # frees the rows
    assert engine.stats().rows_on_device == 0 and not engine.scheduler.by_id and not engine.scheduler.groups


def test_suspend_and_resume_act_on_every_completion(tiny_llama):
    hf_model, tokenizer, _spec = tiny_llama
    engine, limits = make_engine(tiny_llama)
    states = {}

    def on_step(step, eng, out):
        if step == 3:
            state, events = eng.preempt("r", PreemptAction.SUSPEND)
            states["suspend"] = (state, sorted(e.index for e in events), {e.state for e in events})
            return events
        if step == 4:   # the step after the SUSPEND parked both rows (drive stops when nothing can run)
            stats = eng.stats()
            states["parked"] = (stats.rows_on_device, stats.rows_parked)
            state, events = eng.preempt("r", PreemptAction.RESUME, priority=3)
            states["resume"] = state
            return events

    out = drive(engine, limits, {0: [GenerateInput(request_id="r", prompt=PROMPT, max_new_tokens=10,
                                                   ignore_eos=True, n=2)]}, on_step=on_step)["r"]
    assert states["suspend"] == (RequestState.SUSPENDED, [0, 1], {RequestState.SUSPENDED})
    assert states["parked"] == (0, 2)
    assert states["resume"] == RequestState.PREEMPTED
    expected = hf_reference(hf_model, tokenizer(PROMPT)["input_ids"], 10, ())
    completions = _by_index(out)
    assert _tokens(completions[0]) == _tokens(completions[1]) == expected   # restored, not recomputed
    assert engine.stats().prefill_tokens == _prompt_len(engine)


# ---- through the real server -------------------------------------------------------------------
@pytest.mark.slow
def test_served_n2_streams_both_completions_with_usage(server, smollm2):
    import grpc

    from baton.v1 import baton_pb2 as pb
    from baton_client import BatonClient, GenerationOptions

    prompt_len = len(smollm2[1]("Count: 1, 2, 3,")["input_ids"])
    with BatonClient(server.target) as client:
        messages = list(client.generate("Count: 1, 2, 3,", options=GenerationOptions(
            max_new_tokens=6, ignore_eos=True, n=2), timeout=120))
        assert {m.index for m in messages} == {0, 1}
        finals = [m for m in messages if m.finish_reason]
        assert sorted(m.index for m in finals) == [0, 1] and finals[-1] is messages[-1]
        assert [m.state for m in messages if m.state == pb.FINISHED] == [pb.FINISHED]   # once, at the end
        for m in finals:
            assert (m.usage.prompt_tokens, m.usage.completion_tokens) == (prompt_len, 6)
        tokens = {i: [t for m in messages if m.index == i for t in m.token_ids] for i in (0, 1)}
        assert tokens[0] == tokens[1] and len(tokens[0]) == 6           # greedy: the same completion twice

        sampled = GenerationOptions(max_new_tokens=8, temperature=0.9, top_k=50, seed=11, ignore_eos=True)
        done = client.complete("Once upon a time", options=replace(sampled, n=3))
        assert [c.index for c in done.choices] == [0, 1, 2]
        assert done.prompt_tokens == len(smollm2[1]("Once upon a time")["input_ids"])   # once, not 3 times
        assert done.completion_tokens == 24 and all(c.completion_tokens == 8 for c in done.choices)
        assert (done.text, done.token_ids, done.finish_reason) == (
            done.choices[0].text, done.choices[0].token_ids, done.choices[0].finish_reason)
        for i, choice in enumerate(done.choices):
            alone = client.complete("Once upon a time", options=replace(sampled, seed=11 + i))
            assert (choice.token_ids, choice.text, choice.finish_reason) == (
                alone.token_ids, alone.text, alone.finish_reason)

        call = client.generate("Count: 1, 2, 3,", request_id="n-cancel", timeout=120,
                               options=GenerationOptions(max_new_tokens=400, ignore_eos=True, n=2))
        first = next(call)                                              # QUEUED: the request exists
        assert first.state == pb.QUEUED
        assert client.preempt("n-cancel", "cancel") == "FINISHED"
        rest = list(call)
        cancelled = [m for m in rest if m.finish_reason == pb.CANCELLED]
        assert sorted(m.index for m in cancelled) == [0, 1] and rest[-1] is cancelled[-1]
        with pytest.raises(grpc.RpcError) as info:
            client.preempt("n-cancel", "cancel")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
