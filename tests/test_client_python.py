"""The Python client (clients/python/baton_client) through the real server: every GenerationOptions
field reaches the server as its GenerationParams field, Completion folds the new response fields,
and AsyncBatonClient answers exactly as BatonClient does for each call of the shared surface."""
from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from baton.v1 import baton_pb2 as pb
from baton_client import AsyncBatonClient, BatonClient, GenerationOptions

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server):
    with BatonClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy completion of PROMPT (12 tokens, EOS ignored): the reference the option tests change."""
    return client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, ignore_eos=True))


def test_options_map_to_every_params_field():
    options = GenerationOptions(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, repetition_penalty=1.1, seed=42, stop=("x",),
        ignore_eos=True, min_new_tokens=2, stop_token_ids=(5, 6), presence_penalty=0.5, frequency_penalty=-0.5,
        min_p=0.1, logprobs=True, top_logprobs=4, truncate_prompt_tokens=9, include_stop_sequence=True,
        logit_bias={11: -3.0}, response_format={"regex": "[a-z]+"})
    expected = pb.GenerationParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, repetition_penalty=1.1, seed=42, stop=["x"],
        ignore_eos=True, min_new_tokens=2, stop_token_ids=[5, 6], presence_penalty=0.5, frequency_penalty=-0.5,
        min_p=0.1, logprobs=True, top_logprobs=4, truncate_prompt_tokens=9, include_stop_sequence=True,
        logit_bias={11: -3.0}, response_format=pb.ResponseFormat(regex="[a-z]+"))
    assert options.to_pb() == expected
    assert not GenerationOptions().to_pb().HasField("response_format")
    assert not GenerationOptions().to_pb().HasField("seed")


@pytest.mark.parametrize("fmt", [{}, {"json_schema": "{}", "regex": "a"}])
def test_response_format_needs_exactly_one_kind(fmt):
    with pytest.raises(ValueError, match="response_format"):
        GenerationOptions(response_format=fmt).to_pb()


def test_logprobs_are_folded_one_per_token(client, greedy):
    done = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, ignore_eos=True, top_logprobs=3))
    assert done.token_ids == greedy.token_ids
    assert [lp.token_id for lp in done.logprobs] == done.token_ids
    for lp in done.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        # Greedy: the chosen token is the most likely one, and the top list is sorted.
        assert lp.top[0].token_id == lp.token_id and math.isclose(lp.top[0].logprob, lp.logprob, abs_tol=1e-5)
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
    plain = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=4, logprobs=True))
    assert len(plain.logprobs) == len(plain.token_ids) and all(not lp.top for lp in plain.logprobs)
    assert client.complete(PROMPT, options=GenerationOptions(max_new_tokens=4)).logprobs == []


def test_stop_token_ids_and_min_new_tokens(client, greedy):
    stop_id = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_id)
    done = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, stop_token_ids=(stop_id,)))
    assert done.finish_reason == "EOS" and done.token_ids == greedy.token_ids[:first + 1]
    # min_new_tokens masks the stop ids (as HF's MinNewTokensLengthLogitsProcessor does) until it is reached.
    min_new = first + 2
    later = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, stop_token_ids=(stop_id,),
                                                              min_new_tokens=min_new))
    assert len(later.token_ids) >= min_new and stop_id not in later.token_ids[:min_new]
    assert later.token_ids[:first] == greedy.token_ids[:first]


def test_stop_sequence_reported_and_included(client, greedy):
    words = greedy.text.split()
    stop = next(w for w in words[1:] if w.isalpha() and len(w) > 2)   # a word past the start
    cut = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, stop=(stop,)))
    kept = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=12, stop=(stop,),
                                                             include_stop_sequence=True))
    assert cut.finish_reason == kept.finish_reason == "STOP_SEQUENCE"
    assert cut.stop_sequence == kept.stop_sequence == stop
    assert not cut.text.endswith(stop) and kept.text == cut.text + stop


def test_truncation_is_reported(client):
    prompt_len = len(client.tokenize(PROMPT))
    done = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=2, truncate_prompt_tokens=3))
    assert done.prompt_tokens == 3 and done.truncated_prompt_tokens == prompt_len - 3


def test_logit_bias_forces_a_token(client, greedy):
    forced = next(t for t in range(1000, 2000) if t not in greedy.token_ids)
    done = client.complete(PROMPT, options=GenerationOptions(max_new_tokens=3, logit_bias={forced: 100.0}))
    assert done.token_ids == [forced] * 3


@pytest.mark.parametrize("options,field", [
    (GenerationOptions(presence_penalty=2.5), "params.presence_penalty"),
    (GenerationOptions(frequency_penalty=-3.0), "params.frequency_penalty"),
    (GenerationOptions(min_p=1.5), "params.min_p"),
    (GenerationOptions(top_logprobs=21), "params.top_logprobs"),
    (GenerationOptions(response_format={"json_schema": "{not json"}), "params.response_format"),
])
def test_out_of_range_options_reach_the_server(client, options, field):
    """The server's own validation names the field: proof that the option was sent as that field."""
    with pytest.raises(grpc.RpcError) as info:
        client.complete(PROMPT, options=options)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
    assert field in info.value.details()


def test_penalties_and_min_p_in_range_are_accepted(client):
    done = client.complete(PROMPT, options=GenerationOptions(
        max_new_tokens=6, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0, min_p=0.05,
        temperature=0.8, seed=7))
    assert done.finish_reason == "LENGTH" and len(done.token_ids) == 6


def test_sync_tokenize_with_messages(client):
    messages = [("user", "Hi there")]
    ids = client.tokenize(messages=messages)
    assert len(ids) > len(client.tokenize("Hi there"))   # the chat template adds its markers
    pieces = client.tokenize_pieces(messages=messages)
    assert [i for i, _ in pieces] == ids and all(piece for _, piece in pieces)
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize("Hi", messages=messages)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_has_the_sync_surface(client, server, greedy):
    messages = [("system", "Be brief."), ("user", "Hi there")]

    async def run():
        async with AsyncBatonClient(server.target) as aclient:
            await aclient.wait_ready(timeout=30)
            out = {
                "health": await aclient.health(),
                "health_service": await aclient.health("baton.v1.GenerationService"),
                "info": await aclient.model_info(),
                "ids": await aclient.tokenize(PROMPT),
                "chat_ids": await aclient.tokenize(messages=messages),
                "pieces": await aclient.tokenize_pieces(messages=messages),
                "done": await aclient.complete(PROMPT, options=GenerationOptions(
                    max_new_tokens=12, ignore_eos=True, logprobs=True)),
            }
            with pytest.raises(grpc.RpcError) as info:
                await aclient.preempt("async-no-such-id", "cancel")
            out["not_found"] = info.value.code()
            with pytest.raises(grpc.RpcError) as info:   # auth is off: naming a caller is refused
                await aclient.preempt("async-no-such-id", "cancel", caller="someone")
            out["caller"] = info.value
            out["preempted"] = await _async_suspend_resume(aclient)
            return out

    out = asyncio.run(run())
    assert out["health"] == out["health_service"] == "SERVING"
    assert out["info"] == client.model_info()
    assert out["ids"] == client.tokenize(PROMPT)
    assert out["chat_ids"] == client.tokenize(messages=messages)
    assert out["pieces"] == client.tokenize_pieces(messages=messages)
    assert out["done"].token_ids == greedy.token_ids and len(out["done"].logprobs) == 12
    assert out["not_found"] == grpc.StatusCode.NOT_FOUND
    assert out["caller"].code() == grpc.StatusCode.INVALID_ARGUMENT and "caller" in out["caller"].details()
    states, completion = out["preempted"]
    assert states[0] == "SUSPENDED" and states[1] in ("PREEMPTED", "QUEUED", "RUNNING")
    assert "SUSPENDED" in completion.states and completion.finish_reason == "LENGTH"


async def _async_suspend_resume(aclient: AsyncBatonClient):
    """Suspend and resume a running request through the asyncio client; returns (states, completion)."""
    from baton_client import Completion
    call = aclient.generate("Write a long story about a dragon.", request_id="async-susp-1",
                            options=GenerationOptions(max_new_tokens=40, ignore_eos=True))
    completion, states = Completion(), []
    async for msg in call:
        completion.add(msg)
        if len(completion.token_ids) >= 2 and not states:
            states.append(await aclient.preempt("async-susp-1", "suspend"))
            states.append(await aclient.preempt("async-susp-1", "resume"))
    return states, completion


def test_async_wait_ready_times_out_without_a_server():
    from tests.conftest import free_port

    async def run():
        async with AsyncBatonClient(f"127.0.0.1:{free_port()}") as aclient:
            await aclient.wait_ready(timeout=0.5)

    with pytest.raises(TimeoutError):
        asyncio.run(run())
