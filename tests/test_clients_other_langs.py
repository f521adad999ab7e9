"""The Node.js (clients/node) and C++ (clients/cpp) clients against one live server.

One `baton serve` subprocess on a free port (fixture `baton_server`) serves the whole module. It
is started as soon as a test that can run needs it, so the C++ build (and `npm ci`) overlap the
model load, and it is killed at the end. A recording pass-through proxy (`RecordingProxy`) in front
of it shows the `x-baton-request-id` routing header each client sends. Missing toolchains skip
their tests with the reason:

  Node:  node + npm on PATH; `npm ci` runs in clients/node when package-lock.json changed
         (stamp in node_modules/), and a failing `npm ci` (no registry) skips.
  C++:   cmake, a C++ compiler, pkg-config, protoc, grpc_cpp_plugin and the grpc++/protobuf
         pkg-config modules (Debian: libgrpc++-dev libprotobuf-dev protobuf-compiler
         protobuf-compiler-grpc cmake g++ pkg-config). Build tree: clients/cpp/build (cached).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "clients" / "node"
CPP_DIR = ROOT / "clients" / "cpp"
CPP_BUILD = CPP_DIR / "build"
CPP_BIN = CPP_BUILD / "baton_cpp_client"
READY_TIMEOUT_S = 180.0
# Few, short retries: without a registry this fails in seconds (and the Node tests skip).
NPM_CI = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error",
          "--fetch-retries=1", "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000"]


# ---------------------------------------------------------------------------------------------
# helpers

def _tail(text: str | bytes | None, n: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]


def _run(cmd: list[str], *, cwd: Path = ROOT, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise concurrent pytest runs that share a cache (node_modules, the CMake build tree)."""
    with open(path, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _baton_executable() -> Path | None:
    for candidate in (ROOT / ".venv" / "bin" / "baton", Path(sys.executable).parent / "baton"):
        if candidate.exists():
            return candidate
    found = shutil.which("baton")
    return Path(found) if found else None


class Server:
    """A `baton serve` subprocess; `ready()` waits (once) for grpc.health.v1 SERVING."""

    def __init__(self, log_path: Path) -> None:
        exe = _baton_executable()
        if exe is None:
            pytest.skip("no `baton` executable: run `make setup` to build .venv")
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(self.port), "--max-seq-len", "512", "--max-batch-size", "4",
             "--no-warmup"],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        self._ready = False

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return _tail(self.log_path.read_bytes(), n)

    def ready(self) -> str:
        if self._ready:
            return self.target
        grpc = pytest.importorskip("grpc")
        health = pytest.importorskip("grpc_health.v1.health_pb2")
        health_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
        deadline = self.started + READY_TIMEOUT_S
        last = "no answer"
        with grpc.insecure_channel(self.target) as channel:
            stub = health_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"baton serve exited with {self.proc.returncode} before SERVING:\n{self.log_tail()}")
                try:
                    resp = stub.Check(health.HealthCheckRequest(service=""), timeout=2.0)
                    last = health.HealthCheckResponse.ServingStatus.Name(resp.status)
                    if resp.status == health.HealthCheckResponse.SERVING:
                        self._ready = True
                        return self.target
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.25)
        pytest.fail(f"baton serve on {self.target} not SERVING after {READY_TIMEOUT_S:.0f} s "
                    f"(last: {last}):\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class RecordingProxy:
    """A pass-through gRPC proxy in front of the real server that records each call's method and
    metadata: what a load balancer routing on `x-baton-request-id` would see. Messages pass as bytes."""

    FORWARDED = ("x-baton-request-id",)

    def __init__(self, upstream: str) -> None:
        import grpc
        from concurrent.futures import ThreadPoolExecutor
        self.grpc = grpc
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.channel = grpc.insecure_channel(upstream)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self,))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def headers(self, method_suffix: str) -> list[dict[str, str]]:
        return [md for method, md in self.calls if method.endswith(method_suffix)]

    def service(self, details):   # grpc.GenericRpcHandler
        grpc = self.grpc
        metadata = dict(details.invocation_metadata)
        self.calls.append((details.method, metadata))
        forwarded = tuple((k, v) for k, v in metadata.items() if k in self.FORWARDED)

        def aborting(context, exc):
            context.abort(exc.code(), exc.details())

        if details.method.endswith("/Generate"):
            upstream = self.channel.unary_stream(details.method)

            def stream(request: bytes, context):
                try:
                    yield from upstream(request, metadata=forwarded)
                except grpc.RpcError as exc:
                    aborting(context, exc)
            return grpc.unary_stream_rpc_method_handler(stream)
        upstream = self.channel.unary_unary(details.method)

        def unary(request: bytes, context):
            try:
                return upstream(request, metadata=forwarded)
            except grpc.RpcError as exc:
                aborting(context, exc)
        return grpc.unary_unary_rpc_method_handler(unary)

    def stop(self) -> None:
        self.server.stop(0)
        self.channel.close()


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def proxy(baton_server):
    recorder = RecordingProxy(baton_server.ready())
    yield recorder
    recorder.stop()


@pytest.fixture(scope="module")
def baton_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("baton-server") / "serve.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def node_dir(request) -> Path:
    """clients/node with its dependencies installed (`npm ci`, skipped when the lock is unchanged)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Node.js client: {' and '.join(missing)} not on PATH (install Node.js >= 18 with npm)")
    request.getfixturevalue("baton_server")  # start loading the model while npm works
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".baton-lock-sha256"
    digest = hashlib.sha256(lock.read_bytes() + (NODE_DIR / "package.json").read_bytes()).hexdigest()
    with _file_lock(lock):
        if not (stamp.exists() and stamp.read_text().strip() == digest):
            try:
                res = _run(NPM_CI, cwd=NODE_DIR, timeout=150)
            except subprocess.TimeoutExpired:
                pytest.skip("Node.js client: `npm ci` timed out (no npm registry?)")
            if res.returncode != 0:
                pytest.skip(f"Node.js client: `npm ci` failed (no npm registry?):\n{_tail(res.stdout + res.stderr, 2000)}")
            stamp.write_text(digest + "\n")
    return NODE_DIR


def _cpp_toolchain_missing() -> list[str]:
    missing = [tool for tool in ("cmake", "pkg-config", "protoc", "grpc_cpp_plugin") if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++)")
    if shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("pkg-config modules grpc++/protobuf (libgrpc++-dev, libprotobuf-dev)")
    return missing


@pytest.fixture(scope="module")
def cpp_client(request) -> Path:
    """clients/cpp built with CMake into clients/cpp/build (incremental: a no-op when up to date)."""
    missing = _cpp_toolchain_missing()
    if missing:
        pytest.skip("C++ client: missing " + ", ".join(missing) + " (Debian: apt-get install cmake g++ pkg-config "
                    "libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc)")
    request.getfixturevalue("baton_server")  # start loading the model while the compiler works
    configure = ["cmake", "-S", str(CPP_DIR), "-B", str(CPP_BUILD), "-DCMAKE_BUILD_TYPE=Release"]
    build = ["cmake", "--build", str(CPP_BUILD), "--parallel", str(os.cpu_count() or 2)]
    with _file_lock(CPP_DIR / "CMakeLists.txt"):
        res = _run(configure, timeout=120)
        if res.returncode != 0 and (CPP_BUILD / "CMakeCache.txt").exists():
            # A stale cache (e.g. the checkout moved): start the build tree afresh, once.
            shutil.rmtree(CPP_BUILD)
            res = _run(configure, timeout=120)
        assert res.returncode == 0, f"cmake configure failed:\n{_tail(res.stdout + res.stderr)}"
        res = _run(build, timeout=300)
        assert res.returncode == 0, f"cmake build failed:\n{_tail(res.stdout + res.stderr)}"
    assert CPP_BIN.exists(), f"{CPP_BIN} was not built"
    return CPP_BIN


# ---------------------------------------------------------------------------------------------
# C++ first: its build is the longest step, and it overlaps the server's model load.

def test_cpp_client_streams_a_completion(cpp_client, baton_server):
    target = baton_server.ready()
    res = _run([str(cpp_client), target, "Once upon a time", "8"], timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert res.stdout.strip(), f"no text on stdout; stderr: {res.stderr}"
    assert "LENGTH" in res.stderr, res.stderr
    assert re.search(r"completion_tokens=8\b", res.stderr), res.stderr


def test_cpp_client_sends_the_routing_header_and_prints_logprobs(cpp_client, proxy):
    res = _run([str(cpp_client), "--request-id", "cpp-route-1", "--logprobs", "2", proxy.target,
                "The capital of France is", "5"], timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert {"x-baton-request-id": "cpp-route-1"}.items() <= proxy.headers("/Generate")[-1].items()
    assert "request_id=cpp-route-1 " in res.stderr, res.stderr
    _assert_logprob_table(res.stdout, 5, 2)
    # Without --request-id the client picks one, and the header carries it too.
    res = _run([str(cpp_client), proxy.target, "Hello", "2"], timeout=60)
    assert res.returncode == 0, res.stderr
    chosen = re.search(r"request_id=(\S+)", res.stderr).group(1)
    assert proxy.headers("/Generate")[-1]["x-baton-request-id"] == chosen


def _assert_logprob_table(stdout: str, num_tokens: int, num_top: int) -> None:
    """The examples' table: one row per token, `text id logprob  id:logprob ...` (num_top of them)."""
    header = "[log-probabilities: text, token id, logprob, top alternatives id:logprob]\n"
    assert header in stdout, stdout
    rows = stdout.split(header)[1].splitlines()
    assert len(rows) == num_tokens, rows
    for row in rows:
        match = re.fullmatch(r'\s*(".*")? +(\d+) +(-\d+\.\d{4}|0\.0000)((?:  \d+:-?\d+\.\d{4})*)', row)
        assert match, row
        top = [item.split(":") for item in match.group(4).split()]
        assert len(top) == num_top and top[0][0] == match.group(2), row   # greedy: chosen = most likely


def test_cpp_client_reports_invalid_argument_for_an_empty_prompt(cpp_client, baton_server):
    target = baton_server.ready()
    res = _run([str(cpp_client), target, "", "8"], timeout=60)
    assert res.returncode != 0, f"exit 0 for an empty prompt\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "INVALID_ARGUMENT" in res.stderr, res.stderr


def test_cpp_client_reports_unavailable_without_a_server(cpp_client):
    res = _run([str(cpp_client), f"127.0.0.1:{_free_port()}", "hello", "4"], timeout=60)
    assert res.returncode != 0
    assert "UNAVAILABLE" in res.stderr, res.stderr


def test_node_test_suite_passes(node_dir, baton_server):
    target = baton_server.ready()
    env = {**os.environ, "BATON_TARGET": target}
    res = _run(["node", "--test", "--test-reporter=tap", "test.js"], cwd=node_dir, env=env, timeout=150)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"node --test failed (exit {res.returncode}):\n{_tail(out, 8000)}"
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", res.stdout, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, _tail(out, 8000)
    assert counts.get("skipped") == 0, f"node tests skipped:\n{_tail(out, 8000)}"
    assert counts.get("pass", 0) >= 7, f"expected at least 7 passing node tests, got {counts}:\n{_tail(out, 8000)}"


def test_node_example_streams_to_stdout(node_dir, baton_server):
    target = baton_server.ready()
    env = {**os.environ, "BATON_TARGET": target}
    res = _run(["node", "example.js", "--max-new-tokens", "8", "Once upon a time"], cwd=node_dir, env=env, timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert res.stdout.strip(), f"no text on stdout; stderr: {res.stderr}"
    assert "finish_reason=LENGTH" in res.stderr, res.stderr


def test_node_client_sends_the_routing_header_and_example_prints_logprobs(node_dir, proxy):
    env = {**os.environ, "BATON_TARGET": proxy.target}
    res = _run(["node", "example.js", "--request-id", "node-route-1", "--logprobs", "3", "--max-new-tokens", "4",
                "The capital of France is"], cwd=node_dir, env=env, timeout=60)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert proxy.headers("/Generate")[-1].get("x-baton-request-id") == "node-route-1"
    _assert_logprob_table(res.stdout, 4, 3)
    script = ("const { BatonClient, statusName } = require('./client');"
              "const c = new BatonClient(process.env.BATON_TARGET);"
              "c.preempt('node-route-2', 'cancel').then(() => process.exit(3),"
              " (e) => { console.log(statusName(e.code)); c.close(); });")
    res = _run(["node", "-e", script], cwd=node_dir, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "NOT_FOUND", res.stdout + res.stderr
    assert proxy.headers("/Preempt")[-1].get("x-baton-request-id") == "node-route-2"
