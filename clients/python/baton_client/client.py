"""BatonClient (blocking) and AsyncBatonClient (asyncio) over the generated gRPC stubs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc

Messages = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 0          # 0 = server default
    temperature: float = 0.0         # 0 = greedy
    top_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def to_pb(self) -> pb.GenerationParams:
        params = pb.GenerationParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, stop=list(self.stop),
            ignore_eos=self.ignore_eos)
        if self.seed is not None:
            params.seed = self.seed
        return params


@dataclass
class Completion:
    """A whole stream, folded."""
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: pb.RequestStats | None = None

    def add(self, msg: pb.GenerateResponse) -> None:
        self.request_id = msg.request_id
        self.text += msg.text
        self.token_ids.extend(msg.token_ids)
        if msg.state:
            self.states.append(pb.RequestState.Name(msg.state))
        if msg.finish_reason:
            self.finish_reason = pb.FinishReason.Name(msg.finish_reason)
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.stats = msg.stats


def build_request(prompt: str | None = None, messages: Messages | None = None, *,
                  options: GenerationOptions | None = None, request_id: str = "",
                  priority: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, prompt=prompt or "",
        messages=[pb.ChatMessage(role=r, content=c) for r, c in (messages or ())],
        priority=priority, params=(options or GenerationOptions()).to_pb())


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

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(prompt=prompt), metadata=_traced(self.metadata)).token_ids)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until health reports SERVING."""
        import time
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become SERVING in time")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BatonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncBatonClient:
    """asyncio client with the same surface as BatonClient."""

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

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncBatonClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
