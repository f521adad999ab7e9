"""Integration: the real server on a free port, driven through the real Python client."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest

from baton.v1 import baton_pb2 as pb
from baton_client import BatonClient, GenerationOptions
from tests.conftest import REPO, hf_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server):
    with BatonClient(server.target) as c:
        yield c


def _code(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_health_reflection_and_model_info(client, server):
    assert client.health("") == "SERVING"
    assert client.health("baton.v1.GenerationService") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"baton.v1.GenerationService", "grpc.health.v1.Health"} <= names
    info = client.model_info()
    assert info.model_name == "SmolLM2-135M-Instruct"
    assert info.max_context_length == 512 and info.max_batch_size == 4
    assert 2 in info.eos_token_ids and info.has_chat_template


def test_greedy_stream_matches_hf_and_arrives_incrementally(client, smollm2):
    hf_model, tokenizer, spec = smollm2
    prompt = "The three primary colors are"
    completion_ids, text = [], ""
    messages = list(client.generate(prompt, options=GenerationOptions(max_new_tokens=40)))
    for msg in messages:
        completion_ids.extend(msg.token_ids)
        text += msg.text
    expected = hf_reference(hf_model, tokenizer(prompt)["input_ids"], 40, spec.eos_token_ids)
    assert completion_ids == expected
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert messages[0].state == pb.QUEUED
    assert any(m.state == pb.RUNNING for m in messages)
    last = messages[-1]
    assert last.finish_reason in (pb.LENGTH, pb.EOS) and last.state == pb.FINISHED
    assert last.usage.completion_tokens == len(expected)
    assert all(m.request_id == messages[0].request_id for m in messages)
    assert sum(1 for m in messages if m.token_ids) >= 10   # tokens came in many messages, not one


def test_stream_is_not_buffered_to_the_end(client):
    """The first token reaches the client long before the last one is generated."""
    stamps = []
    for msg in client.generate("Write a long story about a dragon.",
                               options=GenerationOptions(max_new_tokens=120, ignore_eos=True)):
        if msg.token_ids:
            stamps.append(time.monotonic())
    assert len(stamps) > 20
    assert stamps[-1] - stamps[0] > 0.5 * (stamps[-1] - stamps[0] + 1e-9)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < (stamps[-1] - stamps[0]) / 2       # spread out, not one burst at the end


def test_chat_messages_and_server_assigned_id(client):
    done = client.complete(messages=[("user", "What is the capital of France?")],
                           options=GenerationOptions(max_new_tokens=30))
    assert "Paris" in done.text
    assert len(done.request_id) >= 16
    assert done.finish_reason in ("EOS", "LENGTH")


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", messages=[("user", "hi")]), "prompt"),
    (dict(prompt="word " * 600), "prompt"),
    (dict(messages=[("wizard", "hi")]), "messages[0].role"),
    (dict(prompt="hi", options=GenerationOptions(max_new_tokens=100000)), "params.max_new_tokens"),
    (dict(prompt="hi", options=GenerationOptions(temperature=-0.5)), "params.temperature"),
    (dict(prompt="hi", options=GenerationOptions(temperature=float("nan"))), "params.temperature"),
    (dict(prompt="hi", options=GenerationOptions(top_p=1.5)), "params.top_p"),
    (dict(prompt="hi", options=GenerationOptions(repetition_penalty=-1.0)), "params.repetition_penalty"),
    (dict(prompt="hi", options=GenerationOptions(stop=tuple(str(i) for i in range(1000)))), "params.stop"),
    (dict(prompt="hi", options=GenerationOptions(stop=("",))), "params.stop[0]"),
])
def test_bad_input_is_invalid_argument_naming_the_field(client, request_kwargs, field):
    err = _code(lambda: list(client.generate(**request_kwargs)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field + ":"), err.details()


def test_cancel_and_deadline_free_the_row(client, server):
    call = client.generate("Count to a thousand:", options=GenerationOptions(max_new_tokens=400, ignore_eos=True))
    got = 0
    for msg in call:
        got += len(msg.token_ids)
        if got >= 3:
            call.cancel()
            break
    assert server.wait_metric("baton_running_rows", 0) == 0
    err = _code(lambda: list(client.generate("Count to a thousand:", timeout=0.8,
                                             options=GenerationOptions(max_new_tokens=400, ignore_eos=True))))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.wait_metric("baton_running_rows", 0) == 0
    # the service is unaffected: the next request completes normally
    assert client.complete("Hello", options=GenerationOptions(max_new_tokens=4)).finish_reason == "LENGTH"


def test_concurrent_requests_each_match_their_solo_output(client):
    prompts = ["The ocean is", "My favourite food is", "In 1492,", "Python is a", "The moon", "Cats are"]
    solo = {p: client.complete(p, options=GenerationOptions(max_new_tokens=16)).token_ids for p in prompts}
    results: dict[str, list[int]] = {}

    def run(p: str) -> None:
        results[p] = client.complete(p, options=GenerationOptions(max_new_tokens=16)).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.05 * i)   # staggered arrivals into a batch of 4 slots
    for t in threads:
        t.join(120)
    assert results == solo


def test_preempt_suspend_resume_is_exact(client):
    options = GenerationOptions(max_new_tokens=40, ignore_eos=True)
    expected = client.complete("The history of Rome", options=options).token_ids
    call = client.generate("The history of Rome", options=options, request_id="susp-1")
    states, ids = [], []
    for msg in call:
        ids.extend(msg.token_ids)
        if msg.state:
            states.append(pb.RequestState.Name(msg.state))
        if len(ids) >= 5 and "SUSPENDED" not in states:
            assert client.preempt("susp-1", "suspend") == "SUSPENDED"
            time.sleep(0.3)
            assert client.preempt("susp-1", "resume") in ("PREEMPTED", "RUNNING")
    assert ids == expected
    assert "SUSPENDED" in states and states[-1] == "FINISHED"
    assert states.index("SUSPENDED") < len(states) - 1


def test_preempt_errors(client):
    assert _code(lambda: client.preempt("no-such-request", "cancel")).code() == grpc.StatusCode.NOT_FOUND
    done = client.complete("Hi", options=GenerationOptions(max_new_tokens=2), request_id="done-1")
    assert done.finish_reason == "LENGTH"
    err = _code(lambda: client.preempt("done-1", "suspend"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_preempt_cancel_ends_stream_with_cancelled(client):
    call = client.generate("Tell me everything", options=GenerationOptions(max_new_tokens=300, ignore_eos=True),
                           request_id="cancel-me")
    last, cancelled = None, False
    for msg in call:
        if msg.token_ids and not cancelled:
            assert client.preempt("cancel-me", "cancel") == "FINISHED"
            cancelled = True
        last = msg
    assert cancelled and last.finish_reason == pb.CANCELLED
    assert last.usage.completion_tokens < 300


def test_cli_generate_streams_an_answer(server):
    # The README's first command: no flags. The built-in model is an instruct model, so the CLI
    # sends the prompt as a user message and a real answer streams in (raw, it would end at once).
    out = subprocess.run([sys.executable, "-m", "service.cli", "generate", "--target", server.target,
                          "--max-new-tokens", "20", "Why is the sky blue?"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 20
    assert "20 completion tokens" in out.stderr
    raw = subprocess.run([sys.executable, "-m", "service.cli", "generate", "--target", server.target, "--raw",
                          "--max-new-tokens", "5", "The capital of France is"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert raw.returncode == 0 and "Paris" in raw.stdout, raw.stderr


def test_priority_change_preempts_through_grpc_and_stays_exact(client, server):
    """Fill the 4-row batch with priority-0 streams; a fifth waits. Raising its priority over gRPC
    preempts the latest low-priority row (its K/V go to host memory and come back); every output
    still equals its uninterrupted greedy run, and the host pool ends empty."""
    options = GenerationOptions(max_new_tokens=48, ignore_eos=True)
    prompts = [f"Story number {i}:" for i in range(5)]
    solo = {p: client.complete(p, options=options).token_ids for p in prompts}
    results, states = {}, {}

    def run(i: int) -> None:
        done = client.complete(prompts[i], options=options, request_id=f"prio-{i}")
        results[i], states[i] = done.token_ids, done.states

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert server.wait_metric("baton_running_rows", 4, timeout=60) == 4
    waiter = threading.Thread(target=run, args=(4,))
    waiter.start()
    time.sleep(0.3)
    assert client.preempt("prio-4", "priority", priority=10) in ("QUEUED", "RUNNING")
    for t in [*threads, waiter]:
        t.join(180)
    assert {i: results[i] for i in range(5)} == {i: solo[p] for i, p in enumerate(prompts)}
    assert any("PREEMPTED" in s for s in states.values())
    assert server.wait_metric("baton_kv_host_bytes", 0) == 0
    assert server.metric("baton_preemptions_total") >= 1
