"""BatonClient (blocking) and AsyncBatonClient (asyncio) over the generated gRPC stubs."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc

Messages = Sequence[tuple[str, str]]
READY_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class GenerationOptions:
    """GenerationParams without building protobuf messages. Zero / empty means off (server default)."""
    max_new_tokens: int = 0          # 0 = server default
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0          # EOS and stop_token_ids cannot end the completion before this many tokens
    stop_token_ids: tuple[int, ...] = ()   # extra ids that end the completion (finish EOS)
    presence_penalty: float = 0.0    # OpenAI semantics over the generated tokens, in [-2, 2]
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logprobs: bool = False           # each response carries the chosen tokens' log-probabilities
    top_logprobs: int = 0            # 0..20 alternatives per position (implies logprobs)
    truncate_prompt_tokens: int = 0  # keep only the last N prompt tokens (after the chat template)
    include_stop_sequence: bool = False  # the matched stop sequence is part of the output
    logit_bias: Mapping[int, float] = field(default_factory=dict)   # token id -> added to its logit
    # Constrained decoding: exactly one of {"json_schema": str, "json_object": True, "regex": str,
    # "grammar": str} (ResponseFormat's oneof); None = unconstrained.
    response_format: Mapping[str, str | bool] | None = None
    n: int = 0                       # completions of the prompt (0 or 1 = one); prefilled once

    def to_pb(self) -> pb.GenerationParams:
        params = pb.GenerationParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, stop=list(self.stop),
            ignore_eos=self.ignore_eos, min_new_tokens=self.min_new_tokens,
            stop_token_ids=list(self.stop_token_ids), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, min_p=self.min_p, logprobs=self.logprobs,
            top_logprobs=self.top_logprobs, truncate_prompt_tokens=self.truncate_prompt_tokens,
            include_stop_sequence=self.include_stop_sequence, logit_bias=dict(self.logit_bias), n=self.n)
        if self.seed is not None:
            params.seed = self.seed
        if self.response_format is not None:
            if len(self.response_format) != 1:
                raise ValueError("response_format: give exactly one of json_schema, json_object, regex, grammar; "
                                 f"got {sorted(self.response_format)}")
            params.response_format.CopyFrom(pb.ResponseFormat(**self.response_format))
        return params


@dataclass
class Choice:
    """One of the n completions of a request (GenerateResponse.index), folded."""
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    completion_tokens: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    stop_sequence: str = ""
    tool_calls: list[pb.ToolCall] = field(default_factory=list)

    def add(self, msg: pb.GenerateResponse) -> None:
        self.text += msg.text
        self.token_ids.extend(msg.token_ids)
        self.logprobs.extend(msg.logprobs)
        if msg.finish_reason:
            self.finish_reason = pb.FinishReason.Name(msg.finish_reason)
            self.completion_tokens = msg.usage.completion_tokens
            self.stop_sequence = msg.stop_sequence
            self.tool_calls = list(msg.tool_calls)


@dataclass
class Completion:
    """A whole stream, folded. With options.n > 1, `choices` holds each completion (by index) and
    the fields text, token_ids, finish_reason, logprobs and stop_sequence are completion 0's;
    prompt_tokens counts the shared prompt once, completion_tokens all completions together."""
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    truncated_prompt_tokens: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)   # with options.logprobs: one per token id
    stop_sequence: str = ""          # the stop sequence that matched, if one did
    stats: pb.RequestStats | None = None
    choices: list[Choice] = field(default_factory=list)   # one per completion, in index order

    def add(self, msg: pb.GenerateResponse) -> None:
        self.request_id = msg.request_id
        while len(self.choices) <= msg.index:
            self.choices.append(Choice(index=len(self.choices)))
        choice = self.choices[msg.index]
        choice.add(msg)
        if msg.index == 0:
            self.text += msg.text
            self.token_ids.extend(msg.token_ids)
            self.logprobs.extend(msg.logprobs)
        if msg.state:
            self.states.append(pb.RequestState.Name(msg.state))
        if msg.finish_reason:
            if msg.index == 0:
                self.finish_reason = choice.finish_reason
                self.stop_sequence = msg.stop_sequence
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = sum(c.completion_tokens for c in self.choices)
            self.cached_prompt_tokens = msg.usage.cached_prompt_tokens
            self.truncated_prompt_tokens = msg.usage.truncated_prompt_tokens
            self.stats = msg.stats


def _chat(messages: Messages | None) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=r, content=c) for r, c in (messages or ())]


def build_request(prompt: str | None = None, messages: Messages | None = None, *,
                  options: GenerationOptions | None = None, request_id: str = "",
                  priority: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt=prompt or "", messages=_chat(messages),
                              priority=priority, params=(options or GenerationOptions()).to_pb())


def build_tokenize(prompt: str | None = None, messages: Messages | None = None) -> pb.TokenizeRequest:
    """A prompt as raw text, or chat messages with the model's chat template and a generation prompt."""
    return pb.TokenizeRequest(prompt=prompt or "", messages=_chat(messages))


ROUTING_HEADER = "x-baton-request-id"  # lets a load balancer send Generate and Preempt of one id to one replica


def _routed(metadata: tuple[tuple[str, str], ...], request_id: str) -> tuple[tuple[str, str], ...]:
    """Add the routing header when the id can be one (printable ASCII, at most 128 characters, the
    server's own limit); other ids go without it and the server reports what is wrong with them."""
    if request_id and len(request_id) <= 128 and request_id.isascii() and request_id.isprintable():
        return metadata + ((ROUTING_HEADER, request_id),)
    return metadata


try:   # optional: with opentelemetry installed, calls carry the caller's current trace context
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace
except ImportError:
    _otel_propagate = None


def _traced(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Add the current OpenTelemetry context (W3C `traceparent`, and whatever else the configured
    propagators write) when opentelemetry is importable, a span is current and the caller's own
    metadata has no traceparent."""
    if (_otel_propagate is None or not _otel_trace.get_current_span().get_span_context().is_valid
            or any(key == "traceparent" for key, _ in metadata)):
        return metadata
    carrier: dict[str, str] = {}
    _otel_propagate.inject(carrier)
    return metadata + tuple(carrier.items())


_ACTIONS = {"suspend": pb.PreemptRequest.SUSPEND, "resume": pb.PreemptRequest.RESUME,
            "cancel": pb.PreemptRequest.CANCEL, "priority": pb.PreemptRequest.ACTION_UNSPECIFIED}


def build_preempt(request_id: str, action: str, priority: int | None, caller: str = "") -> pb.PreemptRequest:
    """`caller` (admins, with auth on): whose request_id it is; empty = the caller's own."""
    msg = pb.PreemptRequest(request_id=request_id, action=_ACTIONS[action], caller=caller)
    if priority is not None:
        msg.priority = priority
    return msg


class BatonClient:
    """Blocking client. `generate` streams responses; `complete` folds them into a Completion."""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.metadata = tuple(metadata)

    def generate(self, prompt: str | None = None, messages: Messages | None = None, *,
                 timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateResponse]:
        """Returns the call: iterate it for messages, `.cancel()` it to stop the request."""
        request = build_request(prompt, messages, **kwargs)
        return self.stub.Generate(request, timeout=timeout, metadata=_traced(_routed(self.metadata, request.request_id)))

    def complete(self, prompt: str | None = None, messages: Messages | None = None, **kwargs) -> Completion:
        completion = Completion()
        for msg in self.generate(prompt, messages, **kwargs):
            completion.add(msg)
        return completion

    def preempt(self, request_id: str, action: str, priority: int | None = None, caller: str = "") -> str:
        resp = self.stub.Preempt(build_preempt(request_id, action, priority, caller),
                                 metadata=_traced(_routed(self.metadata, request_id)))
        return pb.RequestState.Name(resp.state)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_traced(self.metadata))

    def tokenize(self, prompt: str | None = None, messages: Messages | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages after the chat template (exactly one)."""
        return [token_id for token_id, _ in self.tokenize_pieces(prompt, messages)]

    def tokenize_pieces(self, prompt: str | None = None, messages: Messages | None = None) -> list[tuple[int, str]]:
        """(token id, the tokenizer's piece for it) for each token, as `tokenize`."""
        resp = self.stub.Tokenize(build_tokenize(prompt, messages), metadata=_traced(self.metadata))
        return list(zip(resp.token_ids, resp.tokens))

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until health reports SERVING."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become SERVING in time")
            time.sleep(READY_POLL_SECONDS)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BatonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncBatonClient:
    """asyncio client with the same surface as BatonClient (every call but `generate` is awaited)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.aio.Channel | None = None,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.metadata = tuple(metadata)

    def generate(self, prompt: str | None = None, messages: Messages | None = None, *,
                 timeout: float | None = None, **kwargs) -> AsyncIterator[pb.GenerateResponse]:
        request = build_request(prompt, messages, **kwargs)
        return self.stub.Generate(request, timeout=timeout, metadata=_traced(_routed(self.metadata, request.request_id)))

    async def complete(self, prompt: str | None = None, messages: Messages | None = None, **kwargs) -> Completion:
        completion = Completion()
        async for msg in self.generate(prompt, messages, **kwargs):
            completion.add(msg)
        return completion

    async def preempt(self, request_id: str, action: str, priority: int | None = None, caller: str = "") -> str:
        resp = await self.stub.Preempt(build_preempt(request_id, action, priority, caller),
                                       metadata=_traced(_routed(self.metadata, request_id)))
        return pb.RequestState.Name(resp.state)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_traced(self.metadata))

    async def tokenize(self, prompt: str | None = None, messages: Messages | None = None) -> list[int]:
        return [token_id for token_id, _ in await self.tokenize_pieces(prompt, messages)]

    async def tokenize_pieces(self, prompt: str | None = None,
                              messages: Messages | None = None) -> list[tuple[int, str]]:
        resp = await self.stub.Tokenize(build_tokenize(prompt, messages), metadata=_traced(self.metadata))
        return list(zip(resp.token_ids, resp.tokens))

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait (without blocking the event loop) until health reports SERVING."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become SERVING in time")
            await asyncio.sleep(READY_POLL_SECONDS)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncBatonClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
