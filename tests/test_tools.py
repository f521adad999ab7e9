"""Tools (issue 14 item 7): definitions and tool-call messages through the chat template (a
template that takes `tools`, and the documented fallback for one that does not, as the built-in
model's), tool_choice naming a tool or `required` constraining the output to a valid call, `auto`
parsing `<tool_call>` blocks, and the calls returned in `tool_calls` with finish TOOL_CALLS,
through the real server (built-in model)."""
from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from baton.v1 import baton_pb2 as pb
from baton_client import BatonClient
from engine.inputs import MessageInput, ToolCallInput, ToolInput, encode
from engine.tools import parse_tool_calls, template_takes_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = (ToolInput("get_weather", "Current weather in a city", json.dumps(WEATHER)),
         ToolInput("get_time", "Current time", json.dumps(TIME)))
PB_TOOLS = [pb.Tool(name=t.name, description=t.description, parameters_json_schema=t.parameters_json_schema)
            for t in TOOLS]
HISTORY = (("user", "Weather in Paris?"), ("assistant", ""), ("tool", '{"temp": 21}'), ("user", "And in Rome?"))
EXTRAS = (MessageInput(1, tool_calls=(ToolCallInput("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)),
          MessageInput(2, tool_call_id="call_1"))

# A template that takes tools (written here, in the Hermes convention): tools in the system turn,
# an assistant's calls as <tool_call> blocks, tool results with the id of the call they answer.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}, \"id\": \"{{ c.id }}\"}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %}[answers {{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _text(tokenizer, **kwargs) -> str:
    return tokenizer.decode(encode(tokenizer, "", HISTORY, **kwargs))


def test_fallback_renders_tools_calls_and_results(tokenizer):
    assert not template_takes_tools(tokenizer)   # the built-in template: the fallback
    text = _text(tokenizer, tools=TOOLS, extras=EXTRAS)
    assert "You may call functions" in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text


def test_native_template_gets_tools_calls_and_ids(tokenizer):
    native = tokenizer   # the session's tokenizer, its template swapped for this test only
    saved = native.chat_template
    native.chat_template = NATIVE_TEMPLATE
    try:
        assert template_takes_tools(native)
        text = _text(native, tools=TOOLS, extras=EXTRAS)
    finally:
        native.chat_template = saved
    assert '"name": "get_weather"' in text and '"description": "Current time"' in text
    assert '"arguments": {"city": "Paris", "unit": "celsius"}, "id": "call_1"' in text
    assert '{"temp": 21}[answers call_1]' in text and "You may call functions" not in text


def test_parse_tool_calls_keeps_only_known_well_formed_calls():
    text = ('Sure. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{broken</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>')
    calls = parse_tool_calls(text, {"get_time", "get_weather"})
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})]
    assert len({c.id for c in calls}) == 2


# ---- through the real server -------------------------------------------------------------------
def _chat(**fields) -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]
    return pb.GenerateRequest(messages=fields.pop("messages", messages), tools=fields.pop("tools", PB_TOOLS),
                              params=pb.GenerationParams(max_new_tokens=fields.pop("max_new_tokens", 80),
                                                         **fields.pop("params", {})), **fields)


@pytest.fixture(scope="module")
def stub(server):
    with BatonClient(server.target) as client:
        yield client.stub


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["get_weather", "get_time", "required"])
def test_forced_choice_returns_a_valid_call(stub, choice):
    messages = list(stub.Generate(_chat(tool_choice=choice), timeout=120))
    last = messages[-1]
    assert last.finish_reason == pb.TOOL_CALLS, "".join(m.text for m in messages)
    assert len(last.tool_calls) == 1 and all(not m.tool_calls for m in messages[:-1])
    call = last.tool_calls[0]
    assert call.name == choice or (choice == "required" and call.name in ("get_weather", "get_time"))
    jsonschema.validate(json.loads(call.arguments_json), WEATHER if call.name == "get_weather" else TIME)
    assert call.id.startswith("call_")


@pytest.mark.slow
def test_auto_parses_calls_and_none_does_not(stub):
    # The model's text is forced (by a regex) into a call in the Hermes convention; the server parses it.
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    forced = {"response_format": pb.ResponseFormat(regex=call.replace("{", r"\{").replace("}", r"\}"))}
    for choice in ("", "auto"):
        last = list(stub.Generate(_chat(tool_choice=choice, params=forced), timeout=120))[-1]
        assert last.finish_reason == pb.TOOL_CALLS
        assert [(c.name, json.loads(c.arguments_json)) for c in last.tool_calls] == [("get_time", {"zone": "CET"})]
    messages = list(stub.Generate(_chat(tool_choice="none", params=forced), timeout=120))
    assert messages[-1].finish_reason == pb.EOS and not messages[-1].tool_calls
    assert "".join(m.text for m in messages) == call


@pytest.mark.slow
def test_tool_messages_round_trip(stub, tokenizer):
    history = [pb.ChatMessage(role=r, content=c) for r, c in HISTORY]
    history[1].tool_calls.append(pb.ToolCall(id="call_1", name="get_weather",
                                             arguments_json='{"city": "Paris", "unit": "celsius"}'))
    history[2].tool_call_id = "call_1"
    last = list(stub.Generate(_chat(messages=history, max_new_tokens=4), timeout=120))[-1]
    assert last.finish_reason in (pb.LENGTH, pb.EOS, pb.TOOL_CALLS)
    assert last.usage.prompt_tokens == len(encode(tokenizer, "", HISTORY, tools=TOOLS, extras=EXTRAS))
    bad = _chat(messages=[pb.ChatMessage(role="user", content="hi", tool_call_id="x")])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("messages[0].tool_call_id:"), err.value.details()
