"""The one command loop (engine/loop.py) through each transport: the same script of commands
gives the same streams, replies and errors in a thread of this process and in the engine
process, and the same tokens as driving the engine directly. Plus the wire codec itself."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from engine import errors, loop
from engine.api import EngineClient
from engine.config import EngineConfig
from engine.inputs import GenerateInput
from engine.outputs import EngineStats
from engine.process import EngineProcess
from engine.request import (
    FinishReason,
    PreemptAction,
    Request,
    RequestOutput,
    RequestState,
    RequestStats,
    SamplingParams,
)
from tests.conftest import drive, make_engine

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]


def _inputs() -> list[GenerateInput]:
    # r1 is long: it is still running when the script cancels it
    return [GenerateInput(request_id=f"r{i}", prompt=p, max_new_tokens=n, ignore_eos=True)
            for i, (p, n) in enumerate(zip(PROMPTS, (12, 100, 24)))]


def _script(handle) -> dict:
    """Submit, suspend and resume one, cancel one, poke at unknown and finished ids, ask for stats."""
    done = {inp.request_id: threading.Event() for inp in _inputs()}
    streams: dict[str, list[RequestOutput]] = {rid: [] for rid in done}

    def sink(out: RequestOutput) -> None:
        streams[out.request_id].append(out)
        if out.finished:
            done[out.request_id].set()

    for inp in _inputs():
        handle.submit(inp, sink)
    suspended = handle.preempt("r2", PreemptAction.SUSPEND, priority=3).result(30)
    resumed = handle.preempt("r2", PreemptAction.RESUME, None).result(30)
    cancel_state = handle.preempt("r1", PreemptAction.CANCEL, None).result(30)
    for event in done.values():
        assert event.wait(120)
    with pytest.raises(errors.UnknownRequest):
        handle.preempt("nobody", PreemptAction.SUSPEND, None).result(30)
    with pytest.raises(errors.RequestFinished):
        handle.preempt("r0", PreemptAction.RESUME, None).result(30)
    stats = handle.fresh_stats().result(30)
    return {
        "replies": (suspended, resumed, cancel_state),
        "tokens": {rid: [t for e in s for t in e.token_ids] for rid, s in streams.items()},
        "finals": {rid: (s[-1].finish_reason, s[-1].completion_tokens) for rid, s in streams.items()},
        "first_state": {rid: s[0].state for rid, s in streams.items()},
        "states_r2": [e.state for e in streams["r2"] if e.state is not None],
        "stats": (stats.rows_on_device, stats.rows_parked, stats.requests_waiting, stats.kv_bytes_on_host),
        "overlapped_steps": stats.overlapped_steps,
    }


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(llama_dir):
    """The tokens of requests r0 and r2 driven through the engine directly (no loop)."""
    import torch

    from engine import model_loader
    engine, limits = make_engine(model_loader.load(llama_dir, torch.device("cpu"), torch.float32),
                                 max_batch_size=2, max_seq_len=128)
    outputs = drive(engine, limits, {0: _inputs()})
    return {rid: outputs[rid].token_ids for rid in ("r0", "r2")}


# "thread-overlap": steady steps launch the next decode before their events (the CUDA default),
# so the script's commands meet decodes in flight, which the loop drains first.
@pytest.mark.parametrize("transport", ["thread", "process", "thread-overlap"])
def test_the_same_script_gives_the_same_events_through_each_transport(transport, llama_dir, reference):
    overlap = transport.endswith("-overlap")
    config = EngineConfig(model=llama_dir, device="cpu", max_batch_size=2, max_seq_len=128, warmup=False,
                          overlap_decode=overlap)
    handle = EngineClient(config) if transport.startswith("thread") else EngineProcess(config)
    handle.start()
    try:
        got = _script(handle)
    finally:
        handle.stop()
    assert got["replies"] == (RequestState.SUSPENDED, RequestState.QUEUED, RequestState.FINISHED) or \
        got["replies"] == (RequestState.SUSPENDED, RequestState.PREEMPTED, RequestState.FINISHED)
    assert got["first_state"] == {"r0": RequestState.QUEUED, "r1": RequestState.QUEUED, "r2": RequestState.QUEUED}
    assert got["finals"]["r0"] == (FinishReason.LENGTH, 12)
    assert got["finals"]["r2"] == (FinishReason.LENGTH, 24)
    assert got["finals"]["r1"][0] == FinishReason.CANCELLED
    assert {rid: got["tokens"][rid] for rid in ("r0", "r2")} == reference   # parking changes no token
    assert RequestState.SUSPENDED in got["states_r2"] and got["states_r2"][-1] == RequestState.FINISHED
    assert got["stats"] == (0, 0, 0, 0)
    assert (got["overlapped_steps"] > 0) == overlap
    assert not handle.alive


def test_every_message_round_trips_through_the_codec():
    request = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.5, stop=("x",), seed=7),
                      priority=-2, owner="alice")
    commands = [loop.Add(request), loop.Abort("r"), loop.Preempt(1, "r", PreemptAction.SUSPEND, 4, None),
                loop.StatsQuery(2), loop.Stop()]
    for command in commands[1:]:
        assert loop.decode_command(loop.encode(command)) == command
    decoded = loop.decode_command(loop.encode(commands[0])).request   # Request compares by identity
    assert dataclasses.asdict(decoded) == dataclasses.asdict(request)
    final = RequestOutput("r", text="hi", token_ids=(4, 5), state=RequestState.FINISHED,
                          finish_reason=FinishReason.EOS, prompt_tokens=3, completion_tokens=2,
                          stats=RequestStats(0.1, 0.0, 1, 10, 10, 0.2))
    events = [loop.Outputs((RequestOutput("r", state=RequestState.QUEUED, queue_position=1), final),
                           EngineStats(rows_on_device=1, waiting_since=3.5)),
              loop.Reply(1, state=RequestState.SUSPENDED), loop.Reply(2, error=("UnknownRequest", "no"))]
    for event in events:
        assert loop.decode_event(loop.encode(event)) == event
    with pytest.raises(Exception):   # a message of the wrong kind fails at decode, not in the engine
        loop.decode_command(loop.encode(events[0]))
