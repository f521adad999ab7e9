"""Security: mutual TLS, bearer-token auth with per-caller ownership, message and stream limits,
and no prompt text in the logs. One real server (TLS + mTLS + tokens) started once for the module;
the certificates are made at test time (the `cryptography` package, else the openssl CLI)."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from service import auth
from tests.conftest import REPO, RunningServer, free_port

TOKENS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef",
    "root": "root-token-0123456789abcdef",
}
pytestmark = pytest.mark.slow

SECRET = "zebra-kumquat-7c41"     # appears in prompts; must never reach the log
MAX_MESSAGE_BYTES = 64 * 1024


# ---- certificates ------------------------------------------------------------------------------
def _pki_cryptography(out: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key, cert) -> None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, issuer_name, issuer_key, *, ca: bool = False, server: bool = False, key=None):
        key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name or name(cn))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        elif server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    for ca_stem, client_stem in (("ca", "client"), ("rogue-ca", "rogue-client")):
        ca_key, ca_cert = issue(f"{ca_stem} test CA", None, None, ca=True)
        write(ca_stem, ca_key, ca_cert)
        write(client_stem, *issue(client_stem, ca_cert.subject, ca_key))
        if ca_stem == "ca":
            write("server", *issue("localhost", ca_cert.subject, ca_key, server=True))


def _pki_openssl(out: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True)
    (out / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (out / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for ca, client in (("ca", "client"), ("rogue-ca", "rogue-client")):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", f"/CN={ca} test CA", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
        leaves = [(client, "client.ext")] + ([("server", "server.ext")] if ca == "ca" else [])
        for leaf, ext in leaves:
            cn = "localhost" if leaf == "server" else leaf
            run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={cn}",
                "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr")
            run("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", f"{leaf}.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    try:
        import cryptography  # noqa: F401
        _pki_cryptography(out)
    except ImportError:
        _pki_openssl(out)
    return out


def read(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def secure_channel(target: str, pki: Path, client: str | None = "client", ca: str = "ca") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(pki, f"{ca}.pem"),
        private_key=read(pki, f"{client}.key") if client else None,
        certificate_chain=read(pki, f"{client}.pem") if client else None)
    return grpc.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)])


def bearer(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


# ---- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki):
    """TLS + mTLS + tokens; limits and the tokens file come in through BATON_* variables."""
    tmp = tmp_path_factory.mktemp("secure")
    tokens_file = tmp / "tokens"
    tokens_file.write_text("# token caller [admin]\n\n"
                           f"{TOKENS['alice']} alice\n{TOKENS['bob']} bob\n{TOKENS['root']} root admin\n")
    tokens_file.chmod(0o600)
    port, metrics_port = free_port(), free_port()
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--metrics-port", str(metrics_port),
           "--max-batch-size", "1", "--max-queue", "1", "--max-seq-len", "256", "--no-warmup",
           "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
           "--tls-client-ca", str(pki / "ca.pem")]
    env = {**os.environ, "BATON_AUTH_TOKENS_FILE": str(tokens_file),
           "BATON_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES), "BATON_MAX_CONCURRENT_STREAMS": "2"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), env=env)
    server = RunningServer(proc, port, metrics_port, log_path)
    deadline = time.monotonic() + 240
    with secure_channel(server.target, pki) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(log_path.read_text()[-3000:])
            time.sleep(0.25)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def stub(secure, pki):
    with secure_channel(secure.target, pki) as ch:
        yield pb_grpc.GenerationServiceStub(ch)


def code_of(fn) -> grpc.StatusCode:
    try:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def small_request(prompt: str = "Hello", n: int = 3, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, params=pb.GenerationParams(max_new_tokens=n, ignore_eos=True), **kwargs)


# ---- transport -----------------------------------------------------------------------------------

def test_plaintext_client_is_refused(secure):
    with grpc.insecure_channel(secure.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("client, ca", [(None, "ca"), ("rogue-client", "ca")])
def test_mtls_requires_a_client_certificate_from_the_ca(secure, pki, client, ca):
    """No client certificate, or one signed by another CA: the handshake fails."""
    with secure_channel(secure.target, pki, client=client, ca=ca) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_it_does_not_trust(secure, pki):
    with secure_channel(secure.target, pki, client="client", ca="rogue-ca") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


# ---- token auth ----------------------------------------------------------------------------------
def test_health_needs_no_token(secure, pki):
    with secure_channel(secure.target, pki) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="baton.v1.GenerationService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD_METADATA = [
    (),
    (("authorization", "Bearer not-a-known-token-at-all"),),
    (("authorization", f"Basic {TOKENS['alice']}"),),
    (("authorization", "Bearer "),),
    (("authorization", TOKENS["alice"]),),                                     # no scheme
    (("authorization", f"Bearer {TOKENS['alice'][:-1]}"),),                     # a prefix of a real token
    (("authorization", f"Bearer {TOKENS['bob']}"), ("authorization", f"Bearer {TOKENS['root']}")),  # ambiguous
    (("x-baton-caller", "root"), ("x-user", "root"), ("caller", "root")),       # claimed identity, no token
]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=range(len(BAD_METADATA)))
def test_every_rpc_but_health_needs_a_valid_token(stub, secure, pki, metadata):
    calls = {
        "Generate": lambda: stub.Generate(small_request(SECRET), metadata=metadata),
        "Preempt": lambda: stub.Preempt(pb.PreemptRequest(request_id="x", action=pb.PreemptRequest.CANCEL), metadata=metadata),
        "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
        "Tokenize": lambda: stub.Tokenize(pb.TokenizeRequest(prompt=SECRET), metadata=metadata),
    }
    for name, call in calls.items():
        assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, name
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with secure_channel(secure.target, pki) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = lambda: refl.ServerReflectionInfo(  # noqa: E731
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata)
        assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED
    # an unauthenticated request is refused before its bytes are parsed: garbage gets the same answer
    with secure_channel(secure.target, pki) as ch:
        raw = ch.unary_stream("/baton.v1.GenerationService/Generate", request_serializer=lambda b: b)
        assert code_of(lambda: raw(b"\xff\xfe\xfd", metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED


def test_valid_tokens_work_for_every_rpc(stub, secure, pki):
    for who in TOKENS:
        md = bearer(who)
        last = list(stub.Generate(small_request(), metadata=md))[-1]
        assert last.finish_reason == pb.LENGTH
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md).model_name
        assert stub.Tokenize(pb.TokenizeRequest(prompt="hi"), metadata=md).token_ids
    md = (("authorization", f"bearer   {TOKENS['bob']}  "),)    # scheme is case-insensitive, spaces trimmed
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md).model_name
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with secure_channel(secure.target, pki) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               metadata=bearer("bob")))
        assert "baton.v1.GenerationService" in {s.name for s in reply.list_services_response.service}


def test_preempt_is_limited_to_the_owner_or_an_admin(stub, secure):
    """Ids live in their caller's namespace (tests/test_caller_ids.py has every path): to bob,
    alice's id is unknown; an admin names alice to act on it."""
    call = stub.Generate(small_request("Count to a thousand:", 200, request_id="alice-job"), metadata=bearer("alice"))
    first = next(call)
    assert first.state == pb.QUEUED
    cancel = pb.PreemptRequest(request_id="alice-job", action=pb.PreemptRequest.CANCEL)
    for request in (cancel, pb.PreemptRequest(request_id="alice-job", action=pb.PreemptRequest.SUSPEND),
                    pb.PreemptRequest(request_id="alice-job", priority=100)):
        assert code_of(lambda: stub.Preempt(request, metadata=bearer("bob"))) == grpc.StatusCode.NOT_FOUND
        # a client-supplied identity header changes nothing: identity comes from the token only
        spoofed = bearer("bob") + (("x-baton-caller", "alice"), ("caller", "alice"), ("x-user", "alice"))
        assert code_of(lambda: stub.Preempt(request, metadata=spoofed)) == grpc.StatusCode.NOT_FOUND
    # the owner may
    suspend = pb.PreemptRequest(request_id="alice-job", action=pb.PreemptRequest.SUSPEND)
    assert stub.Preempt(suspend, metadata=bearer("alice")).state == pb.SUSPENDED
    resume = pb.PreemptRequest(request_id="alice-job", action=pb.PreemptRequest.RESUME)
    assert stub.Preempt(resume, metadata=bearer("alice")).state in (pb.PREEMPTED, pb.QUEUED, pb.RUNNING)
    # an admin may act on anyone's request, naming its caller
    assert code_of(lambda: stub.Preempt(cancel, metadata=bearer("root"))) == grpc.StatusCode.NOT_FOUND
    admin_cancel = pb.PreemptRequest(request_id="alice-job", action=pb.PreemptRequest.CANCEL, caller="alice")
    assert stub.Preempt(admin_cancel, metadata=bearer("root")).state == pb.FINISHED
    rest = list(call)
    assert rest[-1].finish_reason == pb.CANCELLED
    assert code_of(lambda: stub.Preempt(cancel, metadata=bearer("bob"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Preempt(cancel, metadata=bearer("alice"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert secure.wait_metric("baton_running_rows", 0) == 0


# ---- limits --------------------------------------------------------------------------------------
def test_message_size_limit(stub, secure):
    big = small_request("a" * (MAX_MESSAGE_BYTES + 1))
    assert code_of(lambda: stub.Generate(big, metadata=bearer("alice"))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = small_request("a " * (MAX_MESSAGE_BYTES // 4))     # under the limit
    assert code_of(lambda: stub.Generate(ok, metadata=bearer("alice"))) in (
        grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)   # (may be longer than the context)
    assert list(stub.Generate(small_request(), metadata=bearer("alice")))[-1].finish_reason == pb.LENGTH


def _streams(channels: list[grpc.Channel], n_tokens: int) -> list[dict]:
    """One stream per channel entry, started together; records code and first/last message times."""
    results = [dict() for _ in channels]

    def run(i: int, ch: grpc.Channel) -> None:
        r = results[i]
        try:
            for _msg in pb_grpc.GenerationServiceStub(ch).Generate(small_request("Count:", n_tokens),
                                                                   metadata=bearer("alice"), timeout=120):
                r.setdefault("first", time.monotonic())
            r["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            r["code"] = exc.code()
        r["end"] = time.monotonic()
    threads = [threading.Thread(target=run, args=(i, ch)) for i, ch in enumerate(channels)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(150)
    return results


def test_max_concurrent_streams_holds_extra_streams_on_a_connection(secure, pki):
    """Server: 1 row + queue of 1, and 2 streams per connection. On separate connections a third
    concurrent request is RESOURCE_EXHAUSTED; on one connection it waits for a free stream instead."""
    chans = [secure_channel(secure.target, pki) for _ in range(3)]
    try:
        apart = _streams(chans, 40)
    finally:
        for ch in chans:
            ch.close()
    assert sorted(r["code"].name for r in apart) == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    with secure_channel(secure.target, pki) as ch:
        together = _streams([ch, ch, ch], 40)
    assert [r["code"] for r in together] == [grpc.StatusCode.OK] * 3
    third = together[2]
    assert third["first"] >= min(r["end"] for r in together[:2]) - 0.05   # started once a stream closed
    assert secure.wait_metric("baton_running_rows", 0) == 0


# ---- logs ----------------------------------------------------------------------------------------
def test_prompts_outputs_and_tokens_are_not_logged(stub, secure):
    md = bearer("alice")
    out = list(stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=f"Say {SECRET}")],
                                                params=pb.GenerationParams(max_new_tokens=8, stop=[SECRET])),
                             metadata=md))
    generated = "".join(m.text for m in out)
    list(stub.Generate(small_request(f"Repeat: {SECRET}"), metadata=md))
    stub.Tokenize(pb.TokenizeRequest(prompt=SECRET), metadata=md)
    assert code_of(lambda: stub.Generate(small_request(SECRET, request_id="bad\nid"), metadata=md)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)
    log = secure.log_path.read_text()
    assert SECRET not in log
    for token in TOKENS.values():
        assert token not in log and token[:12] not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e["event"] == "request_finished" for e in events)
    assert any(e["event"] == "unauthenticated" and "method" in e for e in events)
    assert any(e.get("caller") == "alice" for e in events if e["event"] == "request_started")
    for e in events:
        assert not {"prompt", "messages", "text", "output", "stop", "token", "authorization"} & set(e), e
    if len(generated.strip()) >= 12:
        assert generated.strip() not in log


# ---- units: tokens file, CLI flags and environment -------------------------------------------------
def test_tokens_file_parsing():
    table = auth.TokenTable.parse("# comment\n\n  tok-aaaaaaaaaaaaaaaa alice \ntok-bbbbbbbbbbbbbbbb ops admin\n")
    assert len(table) == 2
    assert table.resolve("tok-aaaaaaaaaaaaaaaa") == auth.Identity("alice", admin=False)
    assert table.resolve("tok-bbbbbbbbbbbbbbbb") == auth.Identity("ops", admin=True)
    assert table.resolve("tok-aaaaaaaaaaaaaaa") is None and table.resolve("") is None
    for bad in ("", "# only a comment\n", "tok-aaaaaaaaaaaaaaaa\n", "short alice\n",
                "tok-aaaaaaaaaaaaaaaa alice root\n", "tok-aaaaaaaaaaaaaaaa a b c\n",
                "tok-aaaaaaaaaaaaaaaa alice\ntok-aaaaaaaaaaaaaaaa bob\n", "tok-aaaaaaaaaaaaaaa\u00e9 alice\n"):
        with pytest.raises(ValueError):
            auth.TokenTable.parse(bad)


def test_bearer_token_parsing():
    class M:
        def __init__(self, key, value):
            self.key, self.value = key, value
    assert auth.bearer_token([M("authorization", "Bearer abc")]) == "abc"
    assert auth.bearer_token([M("authorization", "bearer  abc ")]) == "abc"
    for md in ([], [M("authorization", "Basic abc")], [M("authorization", "Bearer")],
               [M("authorization", "Bearer a"), M("authorization", "Bearer a")], [M("x-token", "Bearer abc")],
               [M("authorization", b"Bearer abc")]):
        assert auth.bearer_token(md) is None


def test_security_flags_read_baton_env(monkeypatch):
    from service.cli import build_parser
    monkeypatch.setenv("BATON_TLS_CERT", "/c.pem")
    monkeypatch.setenv("BATON_TLS_KEY", "/k.pem")
    monkeypatch.setenv("BATON_TLS_CLIENT_CA", "/ca.pem")
    monkeypatch.setenv("BATON_AUTH_TOKENS_FILE", "/tokens")
    monkeypatch.setenv("BATON_MAX_MESSAGE_BYTES", "12345")
    monkeypatch.setenv("BATON_MAX_CONCURRENT_STREAMS", "7")
    args = build_parser().parse_args(["serve"])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_tokens_file) == \
        ("/c.pem", "/k.pem", "/ca.pem", "/tokens")
    assert (args.max_message_bytes, args.max_concurrent_streams) == (12345, 7)
    args = build_parser().parse_args(["serve", "--max-message-bytes", "999999"])   # the flag wins
    assert args.max_message_bytes == 999999


def test_serve_refuses_bad_security_settings_before_loading_the_model(tmp_path, capsys, monkeypatch):
    from service.cli import main
    monkeypatch.setattr("service.logs.configure", lambda level="info": None)   # keep this process's logging as is
    bad_tokens = tmp_path / "tokens"
    bad_tokens.write_text("short alice\n")
    for argv in (["--auth-tokens-file", str(bad_tokens)],
                 ["--auth-tokens-file", str(tmp_path / "missing")],
                 ["--tls-cert", str(tmp_path / "c.pem")],                       # no key
                 ["--tls-client-ca", str(tmp_path / "ca.pem")],                 # no cert
                 ["--max-message-bytes", "10"],
                 ["--max-concurrent-streams", "-1"]):
        assert main(["serve", "--port", "0", *argv]) == 2, argv
        assert "error:" in capsys.readouterr().err
