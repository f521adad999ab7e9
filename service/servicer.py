"""GenerationService: Generate streams engine events; Preempt, GetModelInfo, Tokenize.

Each Generate call registers a sink that hops engine events onto this event loop into the call's
Inbox (through the loop's Mailbox: one wake-up per engine step, not one per stream), and yields
them as they come. If the call ends for any reason other than its request finishing
(client cancel, disconnect, deadline), the request is aborted in the engine, which frees its row
at the next step.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass

import grpc
import structlog

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from engine import errors, tools
from engine.api import EngineHandle
from engine.inputs import InvalidInput, UnsupportedInput, public_id, request_key
from engine.request import FinishReason, RequestOutput
from service import auth, convert, tracing
from service.mailbox import Inbox, Mailbox
from service.metrics import Metrics

log = structlog.get_logger("baton.service")

# The one place where engine errors become status codes (and the label of the requests counter).
_STATUS: dict[type[Exception], tuple[grpc.StatusCode, str]] = {
    UnsupportedInput: (grpc.StatusCode.UNIMPLEMENTED, "unimplemented"),
    InvalidInput: (grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    errors.QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
    errors.HostPoolFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
    errors.DuplicateRequest: (grpc.StatusCode.ALREADY_EXISTS, "already_exists"),
    errors.EngineUnavailable: (grpc.StatusCode.UNAVAILABLE, "unavailable"),
    errors.UnknownRequest: (grpc.StatusCode.NOT_FOUND, "not_found"),
    errors.RequestFinished: (grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition"),
    errors.NotOwner: (grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    errors.EngineError: (grpc.StatusCode.INTERNAL, "internal"),
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL, "internal"


_MAX_DETAILS = 512   # status details echo client text; grpc drops trailers over 16 KiB (then the
                     # client would see RESOURCE_EXHAUSTED instead of the real code)


def _details(exc: Exception, key: str = "", request_id: str = "") -> str:
    """The error's message for the client; it names the caller's own id, not the engine's key."""
    text = str(exc)
    if key != request_id:
        text = text.replace(repr(key), repr(request_id))
    return text if len(text) <= _MAX_DETAILS else text[:_MAX_DETAILS - 3] + "..."


def _batches(outs: list[RequestOutput]) -> list[RequestOutput]:
    """Group a backlog: runs of plain token events of one completion end at (and include) one
    state event or that completion's last event; a run never mixes completions (index)."""
    groups, run = [], []
    for out in outs:
        if run and run[-1].index != out.index:
            groups.append(convert.merge(run))
            run = []
        run.append(out)
        if out.state is not None or out.completion_finished:
            groups.append(convert.merge(run))
            run = []
    if run:
        groups.append(convert.merge(run))
    return groups


@dataclass
class _StreamTimes:
    """One Generate call's timing, for the TTFT/TPOT metrics, and its final event."""
    started: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    final: RequestOutput | None = None
    text: dict[int, list[str]] | None = None       # each completion's text, kept when tool calls are parsed
    trace: tracing.RequestTrace | None = None   # set when tracing is on and the call is sampled

    def record(self, out: RequestOutput, metrics: Metrics) -> None:
        if out.token_ids:
            now = time.monotonic()
            metrics.tokens(len(out.token_ids), self.started if self.last_token_at is None else self.last_token_at,
                           now, first=self.last_token_at is None)
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
            self.tokens += len(out.token_ids)
        if self.text is not None:
            self.text.setdefault(out.index, []).append(out.text)
        if out.finished:
            self.final = out
        if self.trace is not None:
            self.trace.record(out)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, metrics: Metrics, log_prompts: bool = False, tracer=None) -> None:
        self.engine: EngineHandle | None = None   # set once the model is loaded
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.tracer = tracer                       # an OpenTelemetry tracer when tracing is on (service/tracing.py)
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = Mailbox(loop)
        return mailbox

    async def _engine(self, context: grpc.aio.ServicerContext) -> EngineHandle:
        if self.engine is None or not self.engine.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        if not self.engine.alive:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is not running")
        return self.engine

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        engine = await self._engine(context)
        inp = convert.generate_input(request, owner=auth.request_owner())
        stream = _StreamTimes(started=time.monotonic())
        tool_names = {t.name for t in inp.tools} if inp.tools and inp.tool_choice != "none" else None
        if tool_names:
            stream.text = {}
        started_ns = time.time_ns()
        inbox = Inbox()
        key = await self._submit(engine, inp, inbox, context)   # the engine's id: the caller's namespace + id
        request_id = public_id(key)
        if self.tracer is not None:
            stream.trace = tracing.RequestTrace.start(self.tracer, request_id, inp.priority, started_ns)
        rlog = log.bind(request_id=request_id)
        rlog.info("request_started", priority=inp.priority, **({"caller": inp.owner} if inp.owner else {}),
                  **({"prompt": inp.prompt, "messages": inp.messages} if self.log_prompts else {}))
        try:
            async for out in self._relay(inbox, stream):
                msg = convert.response(out, request_id)
                if tool_names and out.finish_reason == FinishReason.EOS:   # a whole completion
                    calls = tools.parse_tool_calls("".join(stream.text[out.index]), tool_names)
                    if calls:
                        convert.add_tool_calls(msg, calls)
                yield msg
        finally:
            if stream.final is None:  # cancelled, disconnected or past its deadline
                engine.abort(key)
                self.metrics.request_done("cancelled")
                rlog.info("request_aborted", reason="client cancelled or deadline exceeded")
            if stream.trace is not None:
                stream.trace.end(stream.final)
        await self._finish(stream, rlog, context)

    async def _submit(self, engine: EngineHandle, inp, inbox: Inbox, context: grpc.aio.ServicerContext) -> str:
        """Validate and queue; a refusal ends the call with its status code."""
        loop = asyncio.get_running_loop()
        mailbox = self._mailbox(loop)
        queued = loop.run_in_executor(None, engine.submit, inp, lambda out: mailbox.post(inbox, out))
        try:
            return await asyncio.shield(queued)
        except asyncio.CancelledError:
            # The call ended while its request was being queued: abort the request once it is.
            queued.add_done_callback(lambda f: f.cancelled() or f.exception() or engine.abort(f.result()))
            raise
        except (InvalidInput, errors.EngineError) as exc:
            code, label = status_of(exc)
            self.metrics.request_done(label)
            if isinstance(exc, errors.QueueFull):
                context.set_trailing_metadata((("retry-after-ms", "1000"),))
            await context.abort(code, _details(exc, request_key(inp.owner, inp.request_id), inp.request_id))

    async def _relay(self, inbox: Inbox, stream: _StreamTimes):
        """The request's events as they come (a backlog merged), until its final one."""
        while stream.final is None:
            for out in _batches(await inbox.get_all()):
                stream.record(out, self.metrics)
                yield out

    async def _finish(self, stream: _StreamTimes, rlog, context: grpc.aio.ServicerContext) -> None:
        """Metrics and log of a finished request; an engine-side error ends the call with its code."""
        final = stream.final
        reason = final.finish_reason.name.lower()
        self.metrics.request_finished(reason, started=stream.started, finished=time.monotonic(),
                                      first_token_at=stream.first_token_at, last_token_at=stream.last_token_at,
                                      tokens=stream.tokens, stats=final.stats)
        rlog.info("request_finished", finish_reason=reason, prompt_tokens=final.prompt_tokens,
                  completion_tokens=final.completion_tokens,
                  ttft_s=final.stats.time_to_first_token_seconds if final.stats else None,
                  **({"error": final.error} if final.error else {}))
        if final.finish_reason == FinishReason.ERROR:
            code = (grpc.StatusCode.UNAVAILABLE if final.retryable
                    else grpc.StatusCode.RESOURCE_EXHAUSTED if final.out_of_memory
                    else grpc.StatusCode.INTERNAL)
            await context.abort(code, final.error or "engine error")

    async def Preempt(self, request: pb.PreemptRequest, context: grpc.aio.ServicerContext) -> pb.PreemptResponse:
        engine = await self._engine(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be set")
        action = convert.preempt_action(request.action)
        if action is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"action: unknown value {request.action}")
        priority = request.priority if request.HasField("priority") else None
        if request.action == pb.PreemptRequest.ACTION_UNSPECIFIED and priority is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "priority: must be set when action is ACTION_UNSPECIFIED")
        try:
            namespace = auth.preempt_namespace(request.caller)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except auth.NotAdmin as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        key = request_key(namespace, request.request_id)
        if self.tracer is not None:
            tracing.current_span().set_attributes({"baton.request_id": request.request_id,
                                                   "baton.preempt.action": action.name.lower(),
                                                   **({"baton.priority": priority} if priority is not None else {})})
        try:
            state = await asyncio.wrap_future(engine.preempt(key, action, priority, owner=auth.preempt_owner()))
        except errors.EngineError as exc:
            await context.abort(status_of(exc)[0], _details(exc, key, request.request_id))
        log.info("preempt", request_id=request.request_id, action=action.name, priority=priority, state=state.name,
                 **({"caller": namespace} if namespace else {}))
        if self.tracer is not None:
            tracing.current_span().set_attribute("baton.state", state.name.lower())
        return pb.PreemptResponse(request_id=request.request_id, state=convert.state_to_pb(state))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        engine = await self._engine(context)
        return convert.model_info(engine.info)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        engine = await self._engine(context)
        if bool(request.prompt) == bool(request.messages):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: set exactly one of prompt and messages")
        try:
            ids, tokens = await asyncio.to_thread(
                engine.tokenize, request.prompt, tuple((m.role, m.content) for m in request.messages))
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(exc))
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

