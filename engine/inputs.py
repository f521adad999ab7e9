"""Validation of a generation request and its conversion to token ids.

Every check names the offending field with the same path the public API uses (e.g.
`params.temperature`), so the service can return INVALID_ARGUMENT with a useful message before
any engine work is done.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from engine.request import Request, SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 20


class InvalidInput(ValueError):
    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


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


@dataclass(frozen=True)
class Limits:
    max_seq_len: int              # prompt + completion tokens per request
    default_max_new_tokens: int
    max_new_tokens_limit: int


def _check_finite(name: str, value: float) -> None:
    if math.isnan(value) or math.isinf(value):
        raise InvalidInput(name, f"must be a finite number, got {value}")


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
    return SamplingParams(
        max_new_tokens=inp.max_new_tokens or limits.default_max_new_tokens,
        temperature=float(inp.temperature), top_p=float(inp.top_p), top_k=int(inp.top_k),
        repetition_penalty=float(inp.repetition_penalty), seed=inp.seed,
        stop=tuple(inp.stop), ignore_eos=bool(inp.ignore_eos))


def encode(tokenizer, prompt: str, messages: tuple[tuple[str, str], ...]) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's usual special tokens) or of chat messages
    (the model's chat template with a generation prompt). Assumes exactly one is set."""
    if prompt:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("messages", "this model has no chat template; send a raw prompt")
    for i, (role, _content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidInput(f"messages[{i}].role", f"unknown role {role!r}; expected one of {CHAT_ROLES}")
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         add_generation_prompt=True, tokenize=False)
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


def build_request(inp: GenerateInput, tokenizer, limits: Limits) -> Request:
    """Validate everything and return a fresh Request; raises InvalidInput naming the field."""
    check_text(inp)
    params = check_params(inp, limits)
    prompt_ids = encode(tokenizer, inp.prompt, inp.messages)
    where = "prompt" if inp.prompt else "messages"
    if not prompt_ids:
        raise InvalidInput(where, "tokenizes to no tokens")
    if len(prompt_ids) + 1 > limits.max_seq_len:
        raise InvalidInput(where, f"{len(prompt_ids)} tokens leave no room for output in the context "
                                  f"limit of {limits.max_seq_len} tokens")
    request_id = inp.request_id or uuid.uuid4().hex
    return Request(request_id=request_key(inp.owner, request_id), prompt_ids=prompt_ids,
                   params=params, priority=inp.priority, owner=inp.owner)
