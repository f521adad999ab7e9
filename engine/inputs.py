"""Validation of a generation request and its conversion to token ids.

Every check names the offending field with the same path the public API uses (e.g.
`params.temperature`), so the service can return INVALID_ARGUMENT with a useful message before
any engine work is done.
"""
from __future__ import annotations

import dataclasses
import json
import math
import uuid
from dataclasses import dataclass, field

from engine.request import Request, SamplingParams
from engine.tools import call_format, chat_with_tools, template_takes_tools, tool_dicts

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 20
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
TOOL_CHOICES = ("auto", "none", "required")


class InvalidInput(ValueError):
    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


class UnsupportedInput(InvalidInput):
    """A valid field whose behaviour this server does not implement (UNIMPLEMENTED, never ignored)."""


@dataclass(frozen=True)
class ToolInput:
    name: str
    description: str = ""
    parameters_json_schema: str = ""


@dataclass(frozen=True)
class ToolCallInput:
    id: str
    name: str
    arguments_json: str = ""


@dataclass(frozen=True)
class MessageInput:
    """The parts of a ChatMessage beyond (role, content), by message index; only set ones are listed."""
    index: int
    name: str = ""
    tool_call_id: str = ""            # role "tool": the call it answers
    tool_calls: tuple[ToolCallInput, ...] = ()   # role "assistant": the calls it made


@dataclass(frozen=True)
class ResponseFormatInput:
    kind: str                         # "json_schema" | "json_object" | "regex" | "grammar"
    value: str = ""                   # json_object: "" (set to true); anything else is refused


# Between an owner and its request id in the engine's key. A whitespace character: never part of
# an owner name (one word of the tokens file) nor of a request id (printable only).
OWNER_SEPARATOR = "\x1f"


def request_key(owner: str, request_id: str) -> str:
    """The engine's id for `owner`'s request `request_id`: ids live in their owner's namespace,
    so two callers' "x" are two requests. No owner (auth off): the id itself."""
    return f"{owner}{OWNER_SEPARATOR}{request_id}" if owner else request_id


def public_id(key: str) -> str:
    """The id its owner knows a request by (the inverse of request_key)."""
    return key.rpartition(OWNER_SEPARATOR)[2]


@dataclass(frozen=True)
class GenerateInput:
    """A generation request as the API states it, before validation."""
    request_id: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    owner: str = ""                # the caller (auth on): the namespace of its request_id
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    truncate_prompt_tokens: int = 0
    include_stop_sequence: bool = False
    n: int = 0
    response_format: ResponseFormatInput | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    tools: tuple[ToolInput, ...] = ()
    tool_choice: str = ""
    message_extras: tuple[MessageInput, ...] = ()


@dataclass(frozen=True)
class Limits:
    max_seq_len: int              # prompt + completion tokens per request
    default_max_new_tokens: int
    max_new_tokens_limit: int
    vocab_size: int = 0           # width of the logits (token ids must be below it); 0 = unchecked
    max_batch_size: int = 0       # rows of the decode batch: the most completions (params.n) of one request; 0 = unchecked


def _check_finite(name: str, value: float) -> None:
    if math.isnan(value) or math.isinf(value):
        raise InvalidInput(name, f"must be a finite number, got {value}")


def tool_call_format(tools: tuple[ToolInput, ...], tool_choice: str) -> tuple[str, str] | None:
    """The response format that forces one tool call (tool_choice `required` or a tool's name)."""
    return call_format(tools, tool_choice) if tools else None


def check_params(inp: GenerateInput, limits: Limits) -> SamplingParams:
    _check_finite("params.temperature", inp.temperature)
    if inp.temperature < 0:
        raise InvalidInput("params.temperature", f"must be >= 0, got {inp.temperature}")
    _check_finite("params.top_p", inp.top_p)
    if not 0 <= inp.top_p <= 1:
        raise InvalidInput("params.top_p", f"must be in [0, 1], got {inp.top_p}")
    if inp.top_k < 0:
        raise InvalidInput("params.top_k", f"must be >= 0, got {inp.top_k}")
    _check_finite("params.repetition_penalty", inp.repetition_penalty)
    if inp.repetition_penalty < 0:
        raise InvalidInput("params.repetition_penalty", f"must be >= 0, got {inp.repetition_penalty}")
    if inp.max_new_tokens < 0 or inp.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidInput("params.max_new_tokens",
                           f"must be at most {limits.max_new_tokens_limit}, got {inp.max_new_tokens}")
    if len(inp.stop) > MAX_STOP_SEQUENCES:
        raise InvalidInput("params.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(inp.stop)}")
    for i, s in enumerate(inp.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidInput(f"params.stop[{i}]", f"must be 1..{MAX_STOP_CHARS} characters, got {len(s)}")
    max_new_tokens = inp.max_new_tokens or limits.default_max_new_tokens
    if inp.min_new_tokens > max_new_tokens:
        raise InvalidInput("params.min_new_tokens",
                           f"must be at most max_new_tokens ({max_new_tokens}), got {inp.min_new_tokens}")
    if len(inp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidInput("params.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(inp.stop_token_ids)}")
    for i, t in enumerate(inp.stop_token_ids):
        _check_token_id(f"params.stop_token_ids[{i}]", t, limits)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(inp, name)
        _check_finite(f"params.{name}", value)
        if not -2 <= value <= 2:
            raise InvalidInput(f"params.{name}", f"must be in [-2, 2], got {value}")
    _check_finite("params.min_p", inp.min_p)
    if not 0 <= inp.min_p <= 1:
        raise InvalidInput("params.min_p", f"must be in [0, 1], got {inp.min_p}")
    if not 0 <= inp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInput("params.top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {inp.top_logprobs}")
    if len(inp.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidInput("params.logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(inp.logit_bias)}")
    for token, bias in inp.logit_bias:
        _check_token_id(f"params.logit_bias[{token}]", token, limits)
        _check_finite(f"params.logit_bias[{token}]", bias)
        if not -100 <= bias <= 100:
            raise InvalidInput(f"params.logit_bias[{token}]", f"must be in [-100, 100], got {bias}")
    if inp.truncate_prompt_tokens >= limits.max_seq_len:
        raise InvalidInput("params.truncate_prompt_tokens",
                           f"must leave room for output in the context limit of {limits.max_seq_len} tokens, "
                           f"got {inp.truncate_prompt_tokens}")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=float(inp.temperature), top_p=float(inp.top_p), top_k=int(inp.top_k),
        repetition_penalty=float(inp.repetition_penalty), seed=inp.seed,
        stop=tuple(inp.stop), ignore_eos=bool(inp.ignore_eos),
        min_new_tokens=int(inp.min_new_tokens), stop_token_ids=tuple(int(t) for t in inp.stop_token_ids),
        presence_penalty=float(inp.presence_penalty), frequency_penalty=float(inp.frequency_penalty),
        min_p=float(inp.min_p), logit_bias=tuple(sorted((int(t), float(b)) for t, b in inp.logit_bias)),
        logprobs=bool(inp.logprobs or inp.top_logprobs), top_logprobs=int(inp.top_logprobs),
        include_stop_sequence=bool(inp.include_stop_sequence),
        response_format=None if inp.response_format is None else (inp.response_format.kind, inp.response_format.value))


def _check_token_id(name: str, token: int, limits: Limits) -> None:
    if token < 0 or (limits.vocab_size and token >= limits.vocab_size):
        raise InvalidInput(name, f"token id {token} is outside the vocabulary (0..{limits.vocab_size - 1})")


def _check_json(name: str, text: str) -> None:
    try:
        json.loads(text)
    except ValueError as exc:
        raise InvalidInput(name, f"not valid JSON: {exc}") from None


def check_unsupported(inp: GenerateInput) -> None:
    """The v1 fields beyond sampling: response_format, tools, tool_choice, the messages' tool
    calls; and n. Malformed values are INVALID_ARGUMENT."""
    if inp.n < 0:
        raise InvalidInput("params.n", f"must be >= 0, got {inp.n}")
    fmt = inp.response_format
    if fmt is not None and fmt.kind == "json_schema":
        _check_json("params.response_format.json_schema", fmt.value)
    if fmt is not None and fmt.kind in ("regex", "grammar") and not fmt.value:
        raise InvalidInput(f"params.response_format.{fmt.kind}", "must not be empty")
    if fmt is not None and fmt.kind == "json_object" and fmt.value:
        raise InvalidInput("params.response_format.json_object", "must be true when set")
    if fmt is not None and inp.ignore_eos:
        raise InvalidInput("params.ignore_eos", "cannot be combined with params.response_format "
                                                "(the grammar decides where the output ends)")
    if fmt is not None and inp.min_new_tokens:
        raise InvalidInput("params.min_new_tokens", "cannot be combined with params.response_format "
                                                     "(the grammar decides where the output ends)")
    if len(inp.tools) > MAX_TOOLS:
        raise InvalidInput("tools", f"at most {MAX_TOOLS} tools, got {len(inp.tools)}")
    names = set()
    for i, tool in enumerate(inp.tools):
        if not tool.name:
            raise InvalidInput(f"tools[{i}].name", "must be set")
        if tool.name in names:
            raise InvalidInput(f"tools[{i}].name", f"duplicate tool name {tool.name!r}")
        names.add(tool.name)
        if tool.parameters_json_schema:
            _check_json(f"tools[{i}].parameters_json_schema", tool.parameters_json_schema)
    if inp.tool_choice and inp.tool_choice not in TOOL_CHOICES and inp.tool_choice not in names:
        raise InvalidInput("tool_choice", f"must be one of {TOOL_CHOICES} or the name of a tool, "
                                          f"got {inp.tool_choice!r}")
    if inp.tool_choice in ("required",) and not inp.tools:
        raise InvalidInput("tool_choice", "'required' needs tools")
    if fmt is not None and tool_call_format(inp.tools, inp.tool_choice) is not None:
        raise InvalidInput("tool_choice", f"{inp.tool_choice!r} constrains the output itself; "
                                          "it cannot be combined with params.response_format")
    for extra in inp.message_extras:
        _check_message_extra(inp, extra)


def _check_message_extra(inp: GenerateInput, extra: MessageInput) -> None:
    where = f"messages[{extra.index}]"
    if extra.index >= len(inp.messages):
        raise InvalidInput(where, "no such message")
    role = inp.messages[extra.index][0]
    if extra.tool_calls and role != "assistant":
        raise InvalidInput(f"{where}.tool_calls", f"only assistant messages make tool calls, not {role!r}")
    if extra.tool_call_id and role != "tool":
        raise InvalidInput(f"{where}.tool_call_id", f"only tool messages answer a tool call, not {role!r}")
    for j, call in enumerate(extra.tool_calls):
        if not call.name:
            raise InvalidInput(f"{where}.tool_calls[{j}].name", "must be set")
        if call.arguments_json:
            _check_json(f"{where}.tool_calls[{j}].arguments_json", call.arguments_json)
            if not isinstance(json.loads(call.arguments_json), dict):
                raise InvalidInput(f"{where}.tool_calls[{j}].arguments_json", "must be a JSON object")


def encode(tokenizer, prompt: str, messages: tuple[tuple[str, str], ...],
           names: dict[int, str] | None = None, tools: tuple[ToolInput, ...] = (),
           extras: tuple[MessageInput, ...] = ()) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's usual special tokens) or of chat messages
    (the model's chat template with a generation prompt; `tools` and the messages' tool calls and
    tool call ids rendered as engine/tools.py says). Assumes exactly one is set."""
    if prompt:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("messages", "this model has no chat template; send a raw prompt")
    for i, (role, _content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidInput(f"messages[{i}].role", f"unknown role {role!r}; expected one of {CHAT_ROLES}")
    chat = [{"role": r, "content": c} for r, c in messages]
    for i, name in (names or {}).items():   # a participant's name, for templates that use it
        chat[i]["name"] = name
    calls = {m.index: m.tool_calls for m in extras if m.tool_calls}
    call_ids = {m.index: m.tool_call_id for m in extras if m.tool_call_id}
    native = template_takes_tools(tokenizer)
    if tools or calls or call_ids:
        chat = chat_with_tools(chat, tools, calls, call_ids, native)
    kwargs = {"tools": tool_dicts(tools)} if tools and native else {}
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_text(inp: GenerateInput) -> None:
    if len(inp.request_id) > MAX_REQUEST_ID_CHARS or not inp.request_id.isprintable():
        raise InvalidInput("request_id", f"must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    if inp.prompt and inp.messages:
        raise InvalidInput("prompt", "set exactly one of prompt and messages, not both")
    if not inp.prompt and not inp.messages:
        raise InvalidInput("prompt", "empty prompt: set prompt or messages")
    if len(inp.prompt) > MAX_PROMPT_CHARS or sum(len(c) for _, c in inp.messages) > MAX_PROMPT_CHARS:
        raise InvalidInput("prompt", f"longer than {MAX_PROMPT_CHARS} characters")


def check_n(inp: GenerateInput, limits: Limits) -> int:
    """Completions of the request: params.n, 0 meaning 1; each is a row of the decode batch."""
    if limits.max_batch_size and inp.n > limits.max_batch_size:
        raise InvalidInput("params.n", f"must be at most the batch size ({limits.max_batch_size} rows), got {inp.n}")
    return max(inp.n, 1)


def build_request(inp: GenerateInput, tokenizer, limits: Limits, grammars=None) -> Request:
    """Validate everything and return a fresh Request; raises InvalidInput naming the field.
    `grammars` (engine.grammar.Grammars): compiles a response_format here, so that a bad schema,
    regex or grammar is refused before the request is queued (None: the engine finds out)."""
    check_text(inp)
    params = check_params(inp, limits)
    check_unsupported(inp)
    n = check_n(inp, limits)
    forced_call = tool_call_format(inp.tools, inp.tool_choice)
    if forced_call is not None:
        params = dataclasses.replace(params, response_format=forced_call)
    if params.response_format is not None and grammars is not None:
        grammars.compile(*params.response_format)
    names = {m.index: m.name for m in inp.message_extras if m.name}
    for i in names:
        if i >= len(inp.messages):
            raise InvalidInput(f"messages[{i}].name", "no such message")
    if inp.tools and inp.prompt:
        raise InvalidInput("tools", "tools need messages (the chat template renders them), not a raw prompt")
    shown = inp.tools if inp.tool_choice != "none" else ()   # "none": the model is not shown the tools
    prompt_ids = encode(tokenizer, inp.prompt, inp.messages, names, shown, inp.message_extras)
    where = "prompt" if inp.prompt else "messages"
    if not prompt_ids:
        raise InvalidInput(where, "tokenizes to no tokens")
    truncated = 0
    if inp.truncate_prompt_tokens and len(prompt_ids) > inp.truncate_prompt_tokens:
        truncated = len(prompt_ids) - inp.truncate_prompt_tokens   # keep the last N, after the template
        prompt_ids = prompt_ids[truncated:]
    if len(prompt_ids) + 1 > limits.max_seq_len:
        raise InvalidInput(where, f"{len(prompt_ids)} tokens leave no room for output in the context "
                                  f"limit of {limits.max_seq_len} tokens (params.truncate_prompt_tokens "
                                  f"keeps only the last N)")
    request_id = inp.request_id or uuid.uuid4().hex
    return Request(request_id=request_key(inp.owner, request_id), prompt_ids=prompt_ids,
                   params=params, priority=inp.priority, owner=inp.owner, truncated_prompt_tokens=truncated, n=n)
