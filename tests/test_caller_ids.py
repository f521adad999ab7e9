"""Caller-scoped request ids with token auth on: every Preempt path on one's own ids, on another
caller's (indistinguishable from an id nobody uses), and an admin's; the same id used by two
callers at once. One real server (a tiny random model, tokens file, no TLS) for the module."""
from __future__ import annotations

import grpc
import pytest

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from engine.inputs import GenerateInput, InvalidInput, check_text, public_id, request_key
from service import auth
from tests.conftest import start_server

pytestmark = pytest.mark.slow

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef",
          "root": "root-token-0123456789abcdef"}
ACTIONS = {"suspend": dict(action=pb.PreemptRequest.SUSPEND), "resume": dict(action=pb.PreemptRequest.RESUME),
           "cancel": dict(action=pb.PreemptRequest.CANCEL), "priority": dict(priority=7)}


def bearer(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


@pytest.fixture(scope="module")
def authed(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("caller-ids")
    tokens = tmp / "tokens"
    tokens.write_text("".join(f"{token} {who}{' admin' if who == 'root' else ''}\n" for who, token in TOKENS.items()))
    tokens.chmod(0o600)
    running = start_server(tmp, "--model", tiny_model_dir("llama"), "--no-warmup", "--max-queue", "8",
                           env={"BATON_AUTH_TOKENS_FILE": str(tokens)})
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def stub(authed):
    with grpc.insecure_channel(authed.target) as ch:
        yield pb_grpc.GenerationServiceStub(ch)


def preempt(stub, who: str, request_id: str, what: str, caller: str = ""):
    """-> (code, state or details)."""
    try:
        reply = stub.Preempt(pb.PreemptRequest(request_id=request_id, caller=caller, **ACTIONS[what]),
                             metadata=bearer(who), timeout=30)
        return grpc.StatusCode.OK, reply.state
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def parked(stub, who: str, request_id: str):
    """A long request of `who`, suspended at once (it waits, unfinished, until resumed)."""
    call = stub.Generate(pb.GenerateRequest(prompt="Count:", request_id=request_id,
                                            params=pb.GenerationParams(max_new_tokens=300, ignore_eos=True)),
                         metadata=bearer(who), timeout=120)
    first = next(call)
    assert first.state == pb.QUEUED and first.request_id == request_id
    assert preempt(stub, who, request_id, "suspend") == (grpc.StatusCode.OK, pb.SUSPENDED)
    return call


def finish(call, request_id: str) -> pb.GenerateResponse:
    """The rest of the stream: every message carries the caller's own id."""
    rest = list(call)
    assert rest and all(m.request_id == request_id for m in rest)
    return rest[-1]


def test_two_callers_may_use_the_same_id(stub, authed):
    alice, bob = parked(stub, "alice", "job"), parked(stub, "bob", "job")
    # a duplicate is refused only within one's own namespace
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="Hi", request_id="job"), metadata=bearer("alice"), timeout=30))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'job'" in err.value.details() and "alice" not in err.value.details()
    # each acts on its own "job" only
    assert preempt(stub, "alice", "job", "cancel") == (grpc.StatusCode.OK, pb.FINISHED)
    assert finish(alice, "job").finish_reason == pb.CANCELLED
    assert preempt(stub, "bob", "job", "resume")[0] == grpc.StatusCode.OK
    last = finish(bob, "job")
    assert last.finish_reason == pb.LENGTH and last.usage.completion_tokens == 300
    # a server-assigned id is the caller's too, echoed without any namespace
    msgs = list(stub.Generate(pb.GenerateRequest(prompt="Hi", params=pb.GenerationParams(max_new_tokens=2)),
                              metadata=bearer("bob"), timeout=30))
    assigned = msgs[0].request_id
    assert assigned and all(m.request_id == assigned for m in msgs) and "bob" not in assigned
    assert preempt(stub, "bob", assigned, "cancel")[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert preempt(stub, "alice", assigned, "cancel")[0] == grpc.StatusCode.NOT_FOUND
    assert authed.wait_metric("baton_running_rows", 0) == 0


def test_every_preempt_path_on_ones_own_ids(stub):
    call = parked(stub, "alice", "mine")
    assert preempt(stub, "alice", "mine", "suspend") == (grpc.StatusCode.OK, pb.SUSPENDED)   # again: no-op
    assert preempt(stub, "alice", "mine", "priority") == (grpc.StatusCode.OK, pb.SUSPENDED)
    code, state = preempt(stub, "alice", "mine", "resume")
    assert code == grpc.StatusCode.OK and state in (pb.QUEUED, pb.PREEMPTED, pb.RUNNING)
    assert preempt(stub, "alice", "mine", "cancel") == (grpc.StatusCode.OK, pb.FINISHED)
    assert finish(call, "mine").finish_reason == pb.CANCELLED
    for what in ACTIONS:   # finished: FAILED_PRECONDITION, naming the caller's id, not the engine's key
        code, details = preempt(stub, "alice", "mine", what)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'mine'" in details and "alice" not in details
        code, details = preempt(stub, "alice", "never-used", what)
        assert code == grpc.StatusCode.NOT_FOUND and "'never-used'" in details and "alice" not in details


def test_another_callers_ids_look_unknown(stub, authed):
    """Whatever bob does with alice's ids, live or finished, he gets what an unused id gets."""
    call = parked(stub, "alice", "secret-job")
    list(stub.Generate(pb.GenerateRequest(prompt="Hi", request_id="done-job",
                                          params=pb.GenerationParams(max_new_tokens=1)), metadata=bearer("alice")))
    for what in ACTIONS:
        unused = preempt(stub, "bob", "nobody-has-this", what)
        assert unused[0] == grpc.StatusCode.NOT_FOUND
        for rid in ("secret-job", "done-job"):
            code, details = preempt(stub, "bob", rid, what)
            assert code == grpc.StatusCode.NOT_FOUND
            assert details == unused[1].replace("nobody-has-this", rid)
        # naming alice is refused whether or not she has such an id: nothing is learnt
        for rid in ("secret-job", "done-job", "nobody-has-this"):
            code, details = preempt(stub, "bob", rid, what, caller="alice")
            assert code == grpc.StatusCode.PERMISSION_DENIED and "caller" in details
    # bob naming himself is his own namespace
    assert preempt(stub, "bob", "secret-job", "cancel", caller="bob")[0] == grpc.StatusCode.NOT_FOUND
    # none of that touched alice's request
    assert preempt(stub, "alice", "secret-job", "resume")[0] == grpc.StatusCode.OK
    last = finish(call, "secret-job")
    assert last.finish_reason == pb.LENGTH and last.usage.completion_tokens == 300
    assert authed.wait_metric("baton_running_rows", 0) == 0


def test_an_admin_acts_on_any_callers_ids_by_naming_the_caller(stub, authed):
    call = parked(stub, "alice", "shared-name")
    own = parked(stub, "root", "shared-name")   # the admin's own id of the same name
    assert preempt(stub, "root", "shared-name", "priority", caller="alice") == (grpc.StatusCode.OK, pb.SUSPENDED)
    code, state = preempt(stub, "root", "shared-name", "resume", caller="alice")
    assert code == grpc.StatusCode.OK and state in (pb.QUEUED, pb.PREEMPTED, pb.RUNNING)
    assert preempt(stub, "root", "shared-name", "suspend", caller="alice") == (grpc.StatusCode.OK, pb.SUSPENDED)
    assert preempt(stub, "root", "shared-name", "cancel", caller="alice") == (grpc.StatusCode.OK, pb.FINISHED)
    assert finish(call, "shared-name").finish_reason == pb.CANCELLED
    assert preempt(stub, "root", "shared-name", "cancel", caller="alice")[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert preempt(stub, "root", "shared-name", "cancel", caller="carol")[0] == grpc.StatusCode.NOT_FOUND
    # without `caller`: the admin's own namespace, untouched by the above
    assert preempt(stub, "root", "shared-name", "cancel") == (grpc.StatusCode.OK, pb.FINISHED)
    assert finish(own, "shared-name").finish_reason == pb.CANCELLED
    assert authed.wait_metric("baton_running_rows", 0) == 0


def test_without_auth_ids_are_global_and_caller_is_refused(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        msgs = list(stub.Generate(pb.GenerateRequest(prompt="Hi", request_id="plain-id",
                                                     params=pb.GenerationParams(max_new_tokens=1))))
        assert {m.request_id for m in msgs} == {"plain-id"}
        cancel = pb.PreemptRequest(request_id="plain-id", action=pb.PreemptRequest.CANCEL)
        with pytest.raises(grpc.RpcError) as err:
            stub.Preempt(cancel)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        cancel.caller = "alice"
        with pytest.raises(grpc.RpcError) as err:
            stub.Preempt(cancel)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("caller:")


def test_keys_and_namespaces():
    assert request_key("", "x") == "x" and public_id("x") == "x"
    assert request_key("alice", "x") != request_key("bob", "x")
    assert public_id(request_key("alice", "a/b c")) == "a/b c"
    # the separator can be neither in an id nor in a caller name, so no (name, id) meets another's key
    with pytest.raises(InvalidInput, match="request_id"):
        check_text(GenerateInput(request_id="ice\x1fx", prompt="p"))
    with pytest.raises(ValueError, match="expected"):
        auth.TokenTable.parse("tok-aaaaaaaaaaaaaaaa al\x1fice\n")
    token = auth.CALLER.set(auth.Identity("bob"))
    try:
        assert auth.preempt_namespace("") == "bob" and auth.preempt_namespace("bob") == "bob"
        with pytest.raises(auth.NotAdmin):
            auth.preempt_namespace("alice")
        auth.CALLER.set(auth.Identity("root", admin=True))
        assert auth.preempt_namespace("alice") == "alice" and auth.preempt_namespace("") == "root"
        auth.CALLER.set(None)
        assert auth.preempt_namespace("") == ""
        with pytest.raises(ValueError, match="caller"):
            auth.preempt_namespace("alice")
    finally:
        auth.CALLER.reset(token)
