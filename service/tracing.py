"""OpenTelemetry tracing: set up from the standard OTEL_* variables only, and each Generate call's
phases recorded as child spans of its RPC span.

Off unless OTEL_TRACES_EXPORTER names an exporter (unset or `none`, or OTEL_SDK_DISABLED=true:
off). Off means no SDK import, no interceptor, no span: the servicer's only cost is a `None` check
per stream. On: the gRPC instrumentation's aio server interceptor continues the caller's trace from
its W3C `traceparent` metadata (the propagators of OTEL_PROPAGATORS) and opens one SERVER span per
RPC; the SDK reads the rest itself (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER[_ARG], OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _HEADERS / _INSECURE / _PROTOCOL,
OTEL_BSP_*). Spans leave through a BatchSpanProcessor thread, never from the event loop.

A Generate call's `RequestTrace` notes the time of each state event of its stream (plain numbers;
nothing per token) and, when the call ends, adds its phases as child spans with their real start
and end times: `queued`, `prefill`, `decode` (one per stretch in the batch), `preempted` (parked
by the scheduler, or resumed and waiting to be restored) and `suspended` (by a Preempt call). A
parked phase starts when the row's K/V were parked and ends when they were restored. The prefill's
start is derived from the request's own stats (its first admission), so the engine sends nothing
extra for tracing.

Invariant: no prompt, chat message, output text or token id ever enters a span; only ids,
priorities, states, counts, reasons and times.
"""
from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Mapping

from engine.request import RequestOutput, RequestState

# OTEL_TRACES_EXPORTER names (entry points of group opentelemetry_traces_exporter); `otlp` picks
# its transport from OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, as the SDK's own auto-configuration does.
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The entry-point names of the configured span exporters; [] when tracing is off.
    Raises ValueError for a name or protocol that is not installed or not known."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw in ("", "none"):
        return []
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip()
    installed = {ep.name for ep in importlib.metadata.entry_points(group="opentelemetry_traces_exporter")}
    names = []
    for name in (n.strip() for n in raw.split(",")):
        if name == "otlp":
            if protocol not in _OTLP_BY_PROTOCOL:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unknown protocol {protocol!r} "
                                 f"(one of {', '.join(_OTLP_BY_PROTOCOL)})")
            name = _OTLP_BY_PROTOCOL[protocol]
        if name not in installed:
            raise ValueError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
                             f"(installed: {', '.join(sorted(installed)) or 'none'})")
        names.append(name)
    return names


def setup():
    """-> an SDK TracerProvider exporting as the OTEL_* variables say, or None when tracing is off.
    It is not made the global provider: the server hands it to its interceptor and servicer."""
    names = exporter_names()
    if not names:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES; the sampler comes from OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "baton"}))
    for name in names:
        (entry,) = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        provider.add_span_processor(BatchSpanProcessor(entry.load()()))
    return provider


# Health probes (every few seconds from an orchestrator) make no spans unless asked for.
DEFAULT_EXCLUDED_SERVICES = "grpc.health.v1.Health"


def server_interceptor(provider):
    """The gRPC instrumentation's aio server interceptor: one SERVER span per RPC, continuing the
    caller's trace context from the request metadata; none for the services named in
    OTEL_PYTHON_GRPC_EXCLUDED_SERVICES (the instrumentation's own variable; default: health)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    excluded = [s.strip() for s in os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES",
                                                  DEFAULT_EXCLUDED_SERVICES).split(",") if s.strip()]
    only = filters.negate(filters.any_of(*map(filters.service_name, excluded))) if excluded else None
    return aio_server_interceptor(tracer_provider=provider, filter_=only)


def current_span():
    """The current RPC's span (call only when tracing is on)."""
    from opentelemetry import trace
    return trace.get_current_span()


class RequestTrace:
    """One Generate call's phases, noted as (name, start ns, end ns, attributes) while it runs and
    turned into child spans of the RPC span by `end`. Only the event loop's thread touches it."""

    def __init__(self, tracer, span, request_id: str, priority: int, started_ns: int) -> None:
        self._tracer = tracer
        self._span = span
        span.set_attributes({"baton.request_id": request_id, "baton.priority": priority})
        self._phases: list[list] = []                        # closed phases: [name, start, end, attributes]
        self._open: list = ["queued", started_ns, None, {}]  # the phase in progress
        self._first_token_ns: int | None = None              # when the prefill's first token arrived

    @classmethod
    def start(cls, tracer, request_id: str, priority: int, started_ns: int) -> RequestTrace | None:
        """None when the RPC's span is not sampled: then nothing is recorded."""
        span = current_span()
        return cls(tracer, span, request_id, priority, started_ns) if span.is_recording() else None

    def record(self, out: RequestOutput) -> None:
        """One (merged) stream event, in stream order."""
        name = self._open[0]
        if out.token_ids and name in ("decode", "prefill"):
            self._open[3]["baton.tokens"] += len(out.token_ids)
        state = out.state
        if state is None or state == RequestState.FINISHED:
            return
        now = time.time_ns()
        if state == RequestState.QUEUED:
            if name == "queued":
                self._open[3]["baton.queue_position"] = out.queue_position
                return
            self._switch("queued", now, {"baton.queue_position": out.queue_position})
        elif state == RequestState.RUNNING:
            if self._first_token_ns is None:   # the prefill is done: its first token(s) came with this event
                self._first_token_ns = now
                self._switch("prefill", now, {"baton.tokens": len(out.token_ids)})
            self._switch("decode", now, {"baton.tokens": 0})
        else:   # PREEMPTED or SUSPENDED
            self._switch(state.name.lower(), now, {"baton.kv_parked": self._first_token_ns is not None})

    def _switch(self, name: str, now: int, attributes: dict) -> None:
        self._open[2] = now
        self._phases.append(self._open)
        self._open = [name, now, None, attributes]

    def end(self, final: RequestOutput | None) -> None:
        """The call is over (`final` is None when the client went away): annotate the RPC span
        and emit the phases."""
        now = time.time_ns()
        if final is not None and final.token_ids and self._first_token_ns is None:
            # finished by its prefill (e.g. one token): no RUNNING event came
            self._first_token_ns = now
            self._switch("prefill", now, {"baton.tokens": len(final.token_ids)})
        self._open[2] = now
        phases = [*self._phases, self._open]
        if final is not None and final.stats is not None:
            self._place_prefill(phases, final.stats)
        self._annotate(final)
        from opentelemetry import trace
        parent = trace.set_span_in_context(self._span)
        for name, start, end, attributes in phases:
            if name == "prefill" and start == end:
                continue   # the prefill's start is unknown (no stats): its time stays in `queued`
            span = self._tracer.start_span(name, context=parent, start_time=start, attributes=attributes)
            span.end(end_time=max(end, start))

    def _place_prefill(self, phases: list[list], stats) -> None:
        """The prefill began at the request's first admission: carve it out of the queued phase
        before it (the engine measured admission-to-first-token as ttft - queued)."""
        for i, phase in enumerate(phases):
            if phase[0] == "prefill" and i > 0:
                queued = phases[i - 1]
                took_ns = int(max(0.0, stats.time_to_first_token_seconds - stats.queued_seconds) * 1e9)
                phase[1] = max(queued[1], phase[2] - took_ns)
                queued[2] = phase[1]
                return

    def _annotate(self, final: RequestOutput | None) -> None:
        if final is None:
            self._span.set_attribute("baton.finish_reason", "cancelled")
            return
        attributes = {"baton.finish_reason": final.finish_reason.name.lower(),
                      "gen_ai.usage.input_tokens": final.prompt_tokens,
                      "gen_ai.usage.output_tokens": final.completion_tokens}
        if final.stats is not None:
            attributes.update({"baton.num_preemptions": final.stats.num_preemptions,
                               "baton.time_to_first_token_s": final.stats.time_to_first_token_seconds})
        self._span.set_attributes(attributes)
