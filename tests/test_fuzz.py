"""Property-based fuzzing of the public API against the shared real server.

Every GenerateRequest / PreemptRequest field is drawn from hostile ranges (control characters,
huge and negative numbers, NaN, too many stop sequences, unknown enum values, ...), and raw random
or mutated bytes are sent as the request message. Whatever comes in, the answer is OK or one of the
documented status codes (never UNKNOWN, INTERNAL or UNAVAILABLE), the server stays SERVING, and the
engine holds no rows afterwards. Streams are cut after a few tokens so each example stays cheap.
"""
from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from tests.test_reliability import assert_clean, channel

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=60, deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOKENS_BEFORE_CANCEL = 6
CALL_TIMEOUT_S = 60          # a hang is a failure, not a documented DEADLINE_EXCEEDED
INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)

# Codes a Generate may end with here (one client, sequential calls): bad input, a request id still
# held by the previous (just cancelled) example, or our own cancel after a few tokens.
GENERATE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
                  grpc.StatusCode.CANCELLED}
PREEMPT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIELDS = ("request_id", "prompt", "messages", "params.")


@pytest.fixture(scope="module")
def ch(server):
    with channel(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(ch):
    return pb_grpc.GenerationServiceStub(ch)


@pytest.fixture(scope="module")
def health(ch):
    stub = health_pb2_grpc.HealthStub(ch)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def text(max_size: int = 30, min_size: int = 0):
    return st.text(st.characters(codec="utf-8"), min_size=min_size, max_size=max_size)   # any scalar value


def float32():
    return st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5]))


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Each example makes a few fields hostile (often none, so it gets into the engine); the rest
    are drawn from their valid ranges."""
    hostile = draw(st.sets(st.sampled_from(["request_id", "shape", "role", "max_new_tokens", "temperature", "top_p",
                                            "top_k", "repetition_penalty", "stop", "priority"]), max_size=3))

    def pick(name, valid, bad):
        return draw(bad if name in hostile else valid)
    params = pb.GenerationParams(
        max_new_tokens=pick("max_new_tokens", st.integers(1, 6), st.one_of(st.integers(0, 5000), UINT32)),
        temperature=pick("temperature", st.one_of(st.just(0.0), st.floats(0, 2, width=32)), float32()),
        top_p=pick("top_p", st.one_of(st.just(0.0), st.floats(0, 1, width=32)), float32()),
        top_k=pick("top_k", st.integers(0, 100), UINT32),
        repetition_penalty=pick("repetition_penalty", st.one_of(st.just(0.0), st.floats(0.5, 2, width=32)), float32()),
        stop=pick("stop", st.lists(text(6, min_size=1), max_size=5),
                  st.one_of(st.lists(text(6), max_size=5), st.lists(text(300), min_size=60, max_size=70))),
        ignore_eos=draw(st.booleans()))
    seed = draw(st.none() | st.integers(0, 2**64 - 1))
    if seed is not None:
        params.seed = seed
    roles = st.sampled_from(["system", "user", "assistant"]) if "role" not in hostile else text(12)
    shape = pick("shape", st.sampled_from(["prompt", "prompt", "messages"]), st.sampled_from(["both", "neither"]))
    messages = draw(st.lists(st.tuples(roles, text(40)), min_size=1, max_size=3)) if shape in ("messages", "both") else []
    return pb.GenerateRequest(
        request_id=pick("request_id", st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True)),
                        st.one_of(text(20), text(140, min_size=120))),
        prompt=draw(text(60, min_size=1)) if shape in ("prompt", "both") else "",
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        priority=pick("priority", st.integers(-5, 5), INT32), params=params)


def consume(call) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    """Read a stream; cancel it after a few tokens. -> (code, details, messages)."""
    messages, tokens = [], 0
    try:
        for msg in call:
            messages.append(msg)
            tokens += len(msg.token_ids)
            if tokens >= TOKENS_BEFORE_CANCEL and not msg.finish_reason:
                call.cancel()
        return grpc.StatusCode.OK, "", messages
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", messages


def check_generate_answer(request: pb.GenerateRequest, code, details: str, messages) -> None:
    assert code in GENERATE_CODES, (code, details, request)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.startswith(FIELDS) or details.startswith("request:"), details
        assert len(details) <= 512
    if code == grpc.StatusCode.CANCELLED:
        assert sum(len(m.token_ids) for m in messages) >= TOKENS_BEFORE_CANCEL   # only ever our own cancel
    if code == grpc.StatusCode.OK:
        last = messages[-1]
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED and last.state == pb.FINISHED
        assert last.finish_reason != pb.ERROR
        assert len({m.request_id for m in messages}) == 1
        if request.request_id:
            assert last.request_id == request.request_id
        limit = request.params.max_new_tokens
        assert last.usage.completion_tokens == sum(len(m.token_ids) for m in messages)
        if limit:
            assert last.usage.completion_tokens <= limit


@FUZZ
@given(request=generate_requests())
def test_fuzz_generate(stub, health, request):
    code, details, messages = consume(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    event(f"{code.name} {details.split(':')[0][:30]}")
    check_generate_answer(request, code, details, messages)
    assert health()


@st.composite
def preempt_requests(draw) -> pb.PreemptRequest:
    valid_ids = st.just("fuzz-live")
    msg = pb.PreemptRequest(
        request_id=draw(st.one_of(valid_ids, valid_ids, st.just(""), text(20), text(3000, min_size=2000))),
        action=draw(st.one_of(st.integers(0, 3), st.integers(0, 3), INT32)))
    priority = draw(st.none() | st.integers(-5, 5) | INT32)
    if priority is not None:
        msg.priority = priority
    return msg


class Live:
    """A long request under id `fuzz-live` that Preempt examples act on (suspend, resume, cancel,
    re-prioritise); started again whenever an example ended it. Drained on a thread."""

    def __init__(self, stub) -> None:
        self.stub = stub
        self.codes: list[grpc.StatusCode] = []
        self.thread: threading.Thread | None = None
        self.call = None

    def ensure(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        request = pb.GenerateRequest(request_id="fuzz-live", prompt="Count to a thousand:",
                                     params=pb.GenerationParams(max_new_tokens=300, ignore_eos=True))
        self.call = call = self.stub.Generate(request, timeout=300)

        def drain() -> None:
            try:
                for _msg in call:
                    pass
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                self.codes.append(exc.code())
        self.thread = threading.Thread(target=drain, daemon=True)
        self.thread.start()

    def end(self) -> None:
        for action in (pb.PreemptRequest.RESUME, pb.PreemptRequest.CANCEL):
            try:
                self.stub.Preempt(pb.PreemptRequest(request_id="fuzz-live", action=action))
            except grpc.RpcError:
                pass   # already finished
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive()
        # the stream ends normally (LENGTH, or finish_reason CANCELLED after a Preempt CANCEL);
        # ALREADY_EXISTS when a restart raced the end of the previous one
        assert set(self.codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS}, self.codes


@pytest.fixture(scope="module")
def live(stub):
    live = Live(stub)
    yield live
    if live.call is not None:
        live.call.cancel()


@FUZZ
@given(request=preempt_requests())
def test_fuzz_preempt(stub, health, live, request):
    live.ensure()
    try:
        reply = stub.Preempt(request, timeout=CALL_TIMEOUT_S)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    event(code.name)
    assert code in PREEMPT_CODES, (code, details)
    assert len(details) <= 512
    if code == grpc.StatusCode.OK:
        assert reply.request_id == request.request_id and reply.state != pb.REQUEST_STATE_UNSPECIFIED
    assert health()


def mutated(valid: bytes):
    """Bytes near a valid message: flipped, inserted and deleted bytes, truncation."""
    edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10_000),
                               st.integers(0, 255)), min_size=1, max_size=4)

    def apply(ops):
        data = bytearray(valid)
        for op, pos, value in ops:
            pos = pos % (len(data) + 1)
            if op == "insert":
                data.insert(pos, value)
            elif data and pos < len(data):
                if op == "flip":
                    data[pos] ^= value or 0x80
                else:
                    del data[pos]
        return bytes(data)
    return edits.map(apply)


VALID = pb.GenerateRequest(request_id="raw", prompt="Hello there", messages=[],
                           params=pb.GenerationParams(max_new_tokens=3, stop=["xyz"], temperature=0.7,
                                                      seed=7)).SerializeToString()


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), mutated(VALID)),
       method=st.sampled_from(["Generate", "Preempt", "GetModelInfo", "Tokenize"]))
def test_fuzz_raw_bytes_at_the_wire(ch, health, payload, method):
    path = f"/baton.v1.GenerationService/{method}"
    if method == "Generate":
        call = ch.unary_stream(path, request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)(payload, timeout=CALL_TIMEOUT_S)
        code, details, _messages = consume(call)
        assert code in GENERATE_CODES, (code, details, payload)
    else:
        try:
            ch.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
                payload, timeout=CALL_TIMEOUT_S)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        assert code in PREEMPT_CODES, (code, details, payload)
    event(f"{method} {code.name}")
    assert health()


def test_server_is_clean_after_fuzzing(live, server):
    live.end()
    assert_clean(server, timeout=5)
