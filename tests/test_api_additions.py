"""The v1 additions for chat backends through the real server (built-in model, CPU): each new
field validated with a status naming it, truncation,
log-probabilities equal to HF's, stop token ids, min_new_tokens and the reported stop sequence."""
from __future__ import annotations

import grpc
import pytest
import torch

from baton.v1 import baton_pb2 as pb
from baton_client import BatonClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(server):
    with BatonClient(server.target) as client:
        yield client.stub


def _run(stub, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(stub.Generate(request, timeout=120))


def _error(stub, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _run(stub, request)
    return info.value


def _req(prompt="Hello", tools=(), tool_choice="", messages=(), **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="" if messages else prompt, messages=list(messages),
                              params=pb.GenerationParams(max_new_tokens=params.pop("max_new_tokens", 4), **params),
                              tools=list(tools), tool_choice=tool_choice)


NAN = float("nan")
INVALID = [
    (dict(top_logprobs=21), "params.top_logprobs"),
    (dict(presence_penalty=2.5), "params.presence_penalty"),
    (dict(frequency_penalty=NAN), "params.frequency_penalty"),
    (dict(min_p=1.5), "params.min_p"),
    (dict(min_p=-0.1), "params.min_p"),
    (dict(min_p=NAN), "params.min_p"),
    (dict(logit_bias={49152: 1.0}), "params.logit_bias[49152]"),      # vocab is 49152 ids
    (dict(logit_bias={5: 101.0}), "params.logit_bias[5]"),
    (dict(logit_bias={5: NAN}), "params.logit_bias[5]"),
    (dict(stop_token_ids=[10 ** 6]), "params.stop_token_ids[0]"),
    (dict(min_new_tokens=10, max_new_tokens=5), "params.min_new_tokens"),
    (dict(truncate_prompt_tokens=512), "params.truncate_prompt_tokens"),   # the context is 512
    (dict(response_format=pb.ResponseFormat(json_schema="{not json")), "params.response_format.json_schema"),
    (dict(response_format=pb.ResponseFormat(json_schema='{"type": "foo"}')), "params.response_format.json_schema"),
    (dict(response_format=pb.ResponseFormat(json_object=False)), "params.response_format.json_object"),
    (dict(response_format=pb.ResponseFormat(regex="[a-")), "params.response_format.regex"),
    (dict(response_format=pb.ResponseFormat(grammar="root ::= ")), "params.response_format.grammar"),
    (dict(response_format=pb.ResponseFormat(regex="a"), ignore_eos=True), "params.ignore_eos"),
    (dict(n=5), "params.n"),                                                  # the server's batch is 4 rows
    (dict(tool_choice="some_tool"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[pb.Tool(name="")]), "tools[0].name"),
    (dict(tools=[pb.Tool(name="f", parameters_json_schema="{")]), "tools[0].parameters_json_schema"),
    (dict(tools=[pb.Tool(name="f")]), "tools"),                                   # a raw prompt: no template
    (dict(messages=[pb.ChatMessage(role="user", content="", tool_calls=[pb.ToolCall(name="f")])]),
     "messages[0].tool_calls"),
    (dict(messages=[pb.ChatMessage(role="assistant", content="", tool_calls=[pb.ToolCall(name="f", arguments_json="[1]")])]),
     "messages[0].tool_calls[0].arguments_json"),
    (dict(tools=[pb.Tool(name="f")], tool_choice="f", messages=[pb.ChatMessage(role="user", content="hi")],
          response_format=pb.ResponseFormat(regex="a")), "tool_choice"),
]


@pytest.mark.parametrize("fields,name", INVALID, ids=[n + str(i) for i, (_, n) in enumerate(INVALID)])
def test_bad_values_are_invalid_argument_naming_the_field(stub, fields, name):
    err = _error(stub, _req(**fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(name + ":"), err.details()


def test_n_of_one_and_message_name_are_accepted(stub):
    for n in (0, 1):
        assert _run(stub, _req(n=n))[-1].finish_reason == pb.LENGTH
    named = _req(messages=[pb.ChatMessage(role="user", content="Hi", name="alice")])
    assert _run(stub, named)[-1].finish_reason in (pb.LENGTH, pb.EOS)


def _greedy_hf(hf_model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits).float().log_softmax(-1)


def test_truncation_keeps_the_last_tokens_after_the_template(stub, smollm2):
    hf_model, tokenizer, _spec = smollm2
    history = [pb.ChatMessage(role="user", content="Tell me about rivers. " * 120),
               pb.ChatMessage(role="assistant", content="Rivers flow. " * 80),
               pb.ChatMessage(role="user", content="Now count: 1, 2, 3,")]
    templated = tokenizer(tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in history],
                                                        add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]
    assert len(templated) > 512                    # longer than the server's context
    err = _error(stub, _req(messages=history, max_new_tokens=8))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("messages:")
    messages = _run(stub, _req(messages=history, max_new_tokens=8, ignore_eos=True, truncate_prompt_tokens=100))
    last = messages[-1]
    assert last.usage.prompt_tokens == 100
    assert last.usage.truncated_prompt_tokens == len(templated) - 100
    expected, _ = _greedy_hf(hf_model, templated[-100:], 8)
    assert [t for m in messages for t in m.token_ids] == expected
    short = _run(stub, _req(prompt="Hi", truncate_prompt_tokens=100))[-1]   # shorter than N: nothing cut
    assert short.usage.truncated_prompt_tokens == 0 and short.usage.prompt_tokens == len(tokenizer("Hi")["input_ids"])


def test_logprobs_stop_ids_and_stop_sequence_through_the_server(stub, smollm2):
    hf_model, tokenizer, _spec = smollm2
    prompt = "The three primary colors are"
    messages = _run(stub, _req(prompt=prompt, max_new_tokens=10, ignore_eos=True, top_logprobs=3))
    expected, reference = _greedy_hf(hf_model, tokenizer(prompt)["input_ids"], 10)
    assert [t for m in messages for t in m.token_ids] == expected
    for m in messages:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
    logprobs = [lp for m in messages for lp in m.logprobs]
    for pos, lp in enumerate(logprobs):
        assert lp.logprob == pytest.approx(float(reference[pos, lp.token_id]), abs=1e-4)
        assert [t.token_id for t in lp.top][0] == lp.token_id and len(lp.top) == 3
        torch.testing.assert_close(torch.tensor([t.logprob for t in lp.top]), reference[pos].topk(3).values,
                                   rtol=0, atol=1e-4)
    # The third greedy token as a stop id ends the completion there, with EOS; min_new_tokens 4 moves it on.
    stop_id = expected[2]
    last = _run(stub, _req(prompt=prompt, max_new_tokens=10, stop_token_ids=[stop_id]))
    assert [t for m in last for t in m.token_ids] == expected[:3] and last[-1].finish_reason == pb.EOS
    later = _run(stub, _req(prompt=prompt, max_new_tokens=10, stop_token_ids=[stop_id], min_new_tokens=4))
    assert len([t for m in later for t in m.token_ids]) > 3
    text = tokenizer.decode(expected, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    for include in (False, True):
        out = _run(stub, _req(prompt=prompt, max_new_tokens=10, ignore_eos=True, stop=[stop],
                              include_stop_sequence=include))
        assert out[-1].finish_reason == pb.STOP_SEQUENCE and out[-1].stop_sequence == stop
        cut = text.index(stop) + (len(stop) if include else 0)
        assert "".join(m.text for m in out) == text[:cut]
