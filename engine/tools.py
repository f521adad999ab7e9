"""Tools: definitions and tool-call messages into the chat template, tool calls out of the completion.

Convention (Hermes, as Qwen2.5 / Hermes / many others): a call is
`<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>` in the assistant's text.

- Rendering: when the model's chat template uses `tools`, the definitions go to
  `apply_chat_template(tools=...)` in the OpenAI shape ({"type": "function", "function": {...}}),
  assistant messages carry `tool_calls` and `role: tool` messages their `tool_call_id`, as
  transformers templates expect. Otherwise (documented fallback) a system message lists the tools
  as JSON with the convention above; an assistant's calls become `<tool_call>` blocks in its text
  and a tool result a user message `<tool_response>...</tool_response>` (a template without tools
  may know no `tool` role).
- tool_choice `required` or a tool's name: the output is constrained (structured output) to one
  call of a named tool with arguments valid for its schema (`call_format`).
- tool_choice `auto` (the default with tools) and the constrained choices: the finished completion
  is parsed for `<tool_call>` blocks (`parse_tool_calls`); `none`: never parsed.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"

FALLBACK_PROMPT = ("You may call functions. The available functions, as JSON Schema:\n{tools}\n"
                   "To call one, answer with\n<tool_call>\n{{\"name\": <function name>, \"arguments\": "
                   "<arguments as a JSON object>}}\n</tool_call>")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


def _schema(text: str) -> dict:
    return json.loads(text) if text else {"type": "object"}


def tool_dicts(tools) -> list[dict]:
    """ToolInputs in the OpenAI / transformers shape."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": _schema(t.parameters_json_schema)}} for t in tools]


def template_takes_tools(tokenizer) -> bool:
    """The chat template renders tool definitions (it reads a `tools` variable)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return re.search(r"\btools\b", template) is not None


def chat_with_tools(chat: list[dict], tools, calls: dict[int, tuple], call_ids: dict[int, str],
                    native: bool) -> list[dict]:
    """The template's messages: `chat` (role, content[, name]) with the assistants' `calls` and the
    tool results' `call_ids` by message index; with `native` False, the fallback rendering."""
    out = []
    for i, message in enumerate(chat):
        message = dict(message)
        if native:
            if i in calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": json.loads(c.arguments_json or "{}")}}
                                         for c in calls[i]]
            if i in call_ids:
                message["tool_call_id"] = call_ids[i]
        else:
            if i in calls:
                blocks = "\n".join(OPEN + json.dumps({"name": c.name, "arguments": json.loads(c.arguments_json or "{}")})
                                   + CLOSE for c in calls[i])
                message["content"] = (message["content"] + "\n" if message["content"] else "") + blocks
            if message["role"] == "tool":
                message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        out.append(message)
    if tools and not native:
        listing = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tool_dicts(tools)))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def call_format(tools, tool_choice: str) -> tuple[str, str] | None:
    """The structured-output format that forces one call (tool_choice `required`: of any tool; a
    name: of that tool), as ("tool_call", JSON Schema of the call object); None otherwise."""
    if tool_choice not in ("required",) and tool_choice not in {t.name for t in tools}:
        return None
    chosen = [t for t in tools if tool_choice in ("required", t.name)]
    calls = [{"type": "object", "properties": {"name": {"const": t.name},
                                               "arguments": _schema(t.parameters_json_schema)},
              "required": ["name", "arguments"]} for t in chosen]
    return "tool_call", json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})


def parse_tool_calls(text: str, names: set[str]) -> list[ToolCall]:
    """The `<tool_call>` blocks of a completion that hold {"name": a known tool, "arguments": object};
    others are left as text."""
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):   # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if not isinstance(arguments, dict):
            continue
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(arguments)))
    return calls
