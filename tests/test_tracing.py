"""OpenTelemetry tracing against a real OTLP receiver: a gRPC server implementing the collector's
`TraceService/Export` (the opentelemetry-proto classes), started here, and a real `baton serve`
configured only by OTEL_* variables. The spans must continue the caller's trace, carry the
request's phases and attributes, and never contain the prompt or the output."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from baton_client import BatonClient, GenerationOptions
from baton_client.client import Completion, _traced
from service import tracing
from tests.conftest import REPO, free_port, start_server

pytestmark = pytest.mark.slow

SECRET = "okapi-marmalade-5e93"      # in every prompt; must never reach an exported span
GENERATE = "/baton.v1.GenerationService/Generate"
PREEMPT = "/baton.v1.GenerationService/Preempt"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._changed = threading.Condition()

    def Export(self, request, context):
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict, trace_pb2.Span]]:
        """(resource attributes, span) for every span received."""
        with self._changed:
            return [(attributes(rs.resource), span) for req in self.requests for rs in req.resource_spans
                    for ss in rs.scope_spans for span in ss.spans]

    def wait_for(self, predicate, timeout: float = 20.0) -> list[tuple[dict, trace_pb2.Span]]:
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate([s for _, s in spans]) or time.monotonic() > deadline:
                return spans
            with self._changed:
                self._changed.wait(0.2)

    def exported_bytes(self) -> bytes:
        with self._changed:
            return b"".join(r.SerializeToString() for r in self.requests)


def attributes(item) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in item.attributes}


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.port = port
    yield servicer
    server.stop(0)


@pytest.fixture(scope="module")
def traced_server(tmp_path_factory, receiver, tiny_model_dir):
    """A tiny random Llama (fast to load; what it says does not matter here)."""
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
           "OTEL_SERVICE_NAME": "baton-under-test", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    running = start_server(tmp_path_factory.mktemp("traced"), "--model", tiny_model_dir("llama"), "--no-warmup",
                           env=env)
    yield running
    assert running.stop() == 0


def children(spans: list[trace_pb2.Span], parent: trace_pb2.Span) -> list[trace_pb2.Span]:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id),
                  key=lambda s: (s.start_time_unix_nano, s.end_time_unix_nano))


def test_generate_continues_the_callers_trace_with_its_phases(traced_server, receiver):
    """The Python client sends the current span's context; the server's Generate span is its child,
    with queued / prefill / decode / suspended / decode children and the request's attributes;
    the Preempt calls made under the same span are traced too."""
    from opentelemetry.sdk.trace import TracerProvider
    tracer = TracerProvider().get_tracer("test-caller")   # not global: only its context is propagated
    options = GenerationOptions(max_new_tokens=300, ignore_eos=True)   # long enough to suspend it midway
    with BatonClient(traced_server.target) as client, tracer.start_as_current_span("caller") as caller:
        completion, suspended = Completion(), False
        for msg in client.generate(f"Tell me about {SECRET}", options=options, request_id="traced-1", priority=3):
            completion.add(msg)
            if len(completion.token_ids) >= 3 and not suspended:
                assert client.preempt("traced-1", "suspend") == "SUSPENDED"
                time.sleep(0.3)
                assert client.preempt("traced-1", "resume") in ("PREEMPTED", "RUNNING")
                suspended = True
    assert completion.finish_reason == "LENGTH" and len(completion.token_ids) == 300
    ctx = caller.get_span_context()
    trace_id, caller_id = ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big")

    def complete(spans):
        rpc = [s for s in spans if s.name == GENERATE and s.trace_id == trace_id]
        return rpc and sum(s.name == "decode" for s in children(spans, rpc[0])) >= 2 and \
            sum(s.name == PREEMPT and s.trace_id == trace_id for s in spans) == 2
    received = receiver.wait_for(complete)
    spans = [s for _, s in received]
    assert complete(spans), [(s.name, s.trace_id.hex()) for s in spans]

    (resource, rpc), = [(r, s) for r, s in received if s.name == GENERATE and s.trace_id == trace_id]
    assert resource["service.name"] == "baton-under-test"
    assert rpc.kind == trace_pb2.Span.SPAN_KIND_SERVER and rpc.parent_span_id == caller_id
    a = attributes(rpc)
    assert a["baton.request_id"] == "traced-1" and a["baton.priority"] == 3
    assert a["gen_ai.usage.input_tokens"] == completion.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == 300 and a["baton.finish_reason"] == "length"
    assert a["baton.num_preemptions"] >= 1 and a["rpc.grpc.status_code"] == 0

    phases = children(spans, rpc)
    names = [s.name for s in phases]
    assert names[:3] == ["queued", "prefill", "decode"] and names[-1] == "decode", names
    assert "suspended" in names and set(names) <= {"queued", "prefill", "decode", "suspended", "preempted"}
    for before, after in zip(phases, phases[1:]):   # one timeline: each phase starts where the last ended
        assert after.start_time_unix_nano == before.end_time_unix_nano
    assert rpc.start_time_unix_nano <= phases[0].start_time_unix_nano
    assert phases[-1].end_time_unix_nano <= rpc.end_time_unix_nano
    assert all(s.end_time_unix_nano >= s.start_time_unix_nano for s in phases)
    suspended_phase = phases[names.index("suspended")]
    assert attributes(suspended_phase)["baton.kv_parked"] is True
    assert suspended_phase.end_time_unix_nano - suspended_phase.start_time_unix_nano >= 0.25e9
    assert sum(attributes(s)["baton.tokens"] for s in phases if s.name in ("prefill", "decode")) == 300

    preempts = sorted((s for s in spans if s.name == PREEMPT and s.trace_id == trace_id),
                      key=lambda s: s.start_time_unix_nano)
    assert [attributes(s)["baton.preempt.action"] for s in preempts] == ["suspend", "resume"]
    assert all(s.parent_span_id == caller_id and attributes(s)["baton.request_id"] == "traced-1" for s in preempts)
    assert attributes(preempts[0])["baton.state"] == "suspended"

    exported = receiver.exported_bytes()
    assert SECRET.encode() not in exported
    assert completion.text.strip().encode() not in exported


def test_traceparent_metadata_sampling_and_no_prompt_text(traced_server, receiver):
    """A raw W3C traceparent is continued; one whose sampled flag is 0 is not exported; a call
    without one starts its own trace. Tokenize's prompt and rejected input stay out of the spans."""
    sampled_trace, unsampled_trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4737", \
        "00f067aa0ba902b7"
    request = pb.GenerateRequest(prompt=f"Say {SECRET}", params=pb.GenerationParams(max_new_tokens=1))
    with grpc.insecure_channel(traced_server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        list(stub.Generate(request, metadata=(("traceparent", f"00-{unsampled_trace}-{parent}-00"),)))
        list(stub.Generate(request))
        md = (("traceparent", f"00-{sampled_trace}-{parent}-01"),)
        final = list(stub.Generate(request, metadata=md))[-1]
        stub.Tokenize(pb.TokenizeRequest(prompt=SECRET), metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt=SECRET, params=pb.GenerationParams(top_p=2)), metadata=md))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert final.finish_reason == pb.LENGTH and final.usage.completion_tokens == 1
    wanted = bytes.fromhex(sampled_trace)
    received = receiver.wait_for(lambda spans: sum(s.trace_id == wanted and s.name.startswith("/") for s in spans) == 3)
    spans = [s for _, s in received]
    mine = [s for s in spans if s.trace_id == wanted]
    rpcs = [s for s in mine if s.name.startswith("/")]
    assert sorted(s.name for s in rpcs) == [GENERATE, GENERATE, "/baton.v1.GenerationService/Tokenize"]
    assert all(s.parent_span_id == bytes.fromhex(parent) for s in rpcs)
    ok, refused = sorted((s for s in rpcs if s.name == GENERATE), key=lambda s: attributes(s)["rpc.grpc.status_code"])
    assert attributes(refused)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes(ok)["baton.finish_reason"] == "length" and attributes(ok)["gen_ai.usage.output_tokens"] == 1
    # one token: the request finished in its prefill, no decode
    assert [s.name for s in children(mine, ok)] == ["queued", "prefill"]
    assert not any(s.trace_id == bytes.fromhex(unsampled_trace) for s in spans)
    # the call without a traceparent: a root span of its own trace
    roots = [s for s in spans if s.name == GENERATE and not s.parent_span_id]
    assert roots and all(s.trace_id not in (wanted, bytes.fromhex(unsampled_trace)) for s in roots)
    assert SECRET.encode() not in receiver.exported_bytes()
    # start_server polled health until SERVING: probes make no spans by default
    assert not any(s.name.startswith("/grpc.health.v1.Health/") for s in spans)


# ---- configuration, no server ------------------------------------------------------------------
def test_tracing_is_off_unless_an_exporter_is_named():
    assert tracing.exporter_names({}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp"}) == ["otlp_proto_grpc"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp_proto_grpc"]
    for env, name in (({"OTEL_TRACES_EXPORTER": "nosuch"}, "OTEL_TRACES_EXPORTER"),
                      ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "smtp"},
                       "OTEL_EXPORTER_OTLP_PROTOCOL")):
        with pytest.raises(ValueError, match=name):
            tracing.exporter_names(env)


def test_serve_refuses_an_unknown_exporter_before_loading_the_model():
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "nosuch", "BATON_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "OTEL_TRACES_EXPORTER" in proc.stderr


def test_client_adds_traceparent_only_under_a_current_span():
    from opentelemetry.sdk.trace import TracerProvider
    assert _traced((("a", "b"),)) == (("a", "b"),)
    with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
        md = dict(_traced((("a", "b"),)))
        ctx = span.get_span_context()
        assert md["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}" and md["a"] == "b"
        mine = (("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),)
        assert _traced(mine) == mine
