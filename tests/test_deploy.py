"""Deployment, for real and without containers: the docker-compose.yml topology on loopback.

Two Baton replicas (built-in model, CPU) → Debian's nginx running the project's deploy/nginx.conf
(rendered like the nginx image's entrypoint does) as the gRPC load balancer → the Python client;
Debian's Prometheus running deploy/prometheus.yml + deploy/alerts.yml scraping both replicas.

Needs the Debian packages `nginx` and `prometheus` (promtool comes with it). Running as root with
apt-get, the module installs what is missing; otherwise it skips, saying which package is needed.
Test order matters for the last test only: it stops a replica (failover), so it runs last.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from baton.v1 import baton_pb2 as pb
from baton_client import BatonClient, GenerationOptions
from baton_client.client import build_preempt, build_request
from tests.conftest import REPO, RunningServer, free_port, start_server

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy"
# Two replicas share 2 cores: one torch thread each, small batch and context.
SERVER_ARGS = ("--max-batch-size", "2", "--max-seq-len", "256", "--grace-seconds", "30")
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
SHORT = GenerationOptions(max_new_tokens=8, ignore_eos=True)
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


# ---- tools ------------------------------------------------------------------------------------
_apt_lock = threading.Lock()
_apt_updated = False


def _tool(binary: str, package: str) -> str:
    """Path of `binary`, installing Debian `package` when missing and we are root with apt-get."""
    def find() -> str | None:
        return shutil.which(binary) or next(
            (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.exists()), None)
    global _apt_updated
    path = find()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with _apt_lock:
            try:
                if not _apt_updated:
                    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=300,
                                   capture_output=True)
                    _apt_updated = True
                subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                               env=env, check=True, timeout=600, capture_output=True)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"`{binary}` missing and `apt-get install {package}` failed: {exc}")
        path = find()
    if path is None:
        pytest.skip(f"`{binary}` not found: install the Debian package `{package}` (apt-get install {package})")
    return path


# ---- helpers ----------------------------------------------------------------------------------
def render(template: str, values: dict[str, str]) -> str:
    """${NAME} → value, as the nginx image's entrypoint does with the environment; every
    placeholder outside comments must be given."""
    out = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
    code = "\n".join(line.split("#", 1)[0] for line in out.splitlines())
    missing = PLACEHOLDER.findall(code)
    assert not missing, f"placeholders without a value: {missing}"
    return out


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of the server's /metrics, matched on name and labels (0 when absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def served(server: RunningServer) -> float:
    return metric(server, "baton_requests_total", status="length")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last failure
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def http_get(url: str, timeout: float = 5) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


def stop_proc(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- fixtures: the topology -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tools():
    return {"nginx": _tool("nginx", "nginx"), "prometheus": _tool("prometheus", "prometheus"),
            "promtool": _tool("promtool", "prometheus")}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tools):
    """Two Baton servers, started in parallel."""
    folder = tmp_path_factory.mktemp("replicas")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, folder, *SERVER_ARGS, env=SERVER_ENV) for _ in range(2)]
        concurrent.futures.wait(futures)
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < 2:
        for server in started:
            server.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)
    yield started
    for server in started:
        server.stop()


@dataclass
class Nginx:
    proc: subprocess.Popen
    port: int
    status_port: int
    access_log: Path
    error_log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, tools, replicas):
    folder = tmp_path_factory.mktemp("nginx")
    port, status_port = free_port(), free_port()
    conf = folder / "nginx.conf"
    conf.write_text(render((DEPLOY / "nginx.conf").read_text(), {
        "NGINX_GRPC_LISTEN": f"127.0.0.1:{port}", "NGINX_STATUS_LISTEN": f"127.0.0.1:{status_port}",
        "BATON_UPSTREAM_1": replicas[0].target, "BATON_UPSTREAM_2": replicas[1].target}))
    base = [tools["nginx"], "-p", str(folder), "-c", str(conf), "-e", "stderr"]
    check = subprocess.run([*base, "-t", "-g", f"pid {folder / 'nginx.pid'};"], capture_output=True, text=True)
    assert check.returncode == 0, f"nginx -t rejected deploy/nginx.conf:\n{check.stderr}"
    access_log, error_log = folder / "access.log", folder / "error.log"
    proc = subprocess.Popen([*base, "-g", f"daemon off; pid {folder / 'nginx.pid'};"],
                            stdout=access_log.open("w"), stderr=error_log.open("w"))
    running = Nginx(proc, port, status_port, access_log, error_log)
    try:
        wait_until(lambda: proc.poll() is None and http_get(f"http://127.0.0.1:{status_port}/healthz") == b"ok\n",
                   15, f"nginx to answer /healthz ({error_log.read_text()[-2000:]})")
        yield running
    finally:
        stop_proc(proc, signal.SIGQUIT)  # graceful shutdown of nginx


@dataclass
class Prometheus:
    proc: subprocess.Popen
    port: int
    log: Path

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, tools, replicas):
    """Debian's Prometheus on deploy/prometheus.yml, retargeted at the replicas, every 1 s."""
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / name) for name in config.get("rule_files", [])]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["baton"]["static_configs"] = [{"targets": [f"127.0.0.1:{r.metrics_port}" for r in replicas]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    log = folder / "prometheus.log"
    proc = subprocess.Popen([tools["prometheus"], f"--config.file={path}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    running = Prometheus(proc, port, log)
    try:
        wait_until(lambda: proc.poll() is None and http_get(f"http://127.0.0.1:{port}/-/ready"),
                   30, f"prometheus /-/ready ({log.read_text()[-2000:]})")
        yield running
    finally:
        stop_proc(proc)


def run_many(target: str, count: int, concurrency: int, options: GenerationOptions = SHORT,
             prefix: str = "req") -> list:
    """`count` streamed completions through `target`, `concurrency` at a time, one channel."""
    with BatonClient(target) as client:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda i: client.complete(f"{prefix} {i}: The capital of France is",
                                                           options=options), range(count)))


# ---- tests ------------------------------------------------------------------------------------
def test_metrics_exposition_names_types_and_tpot():
    """service/metrics.py alone (no server): series names, Prometheus types, TPOT arithmetic."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics, time_per_output_token

    assert time_per_output_token(10.0, 10.7, 8) == pytest.approx(0.1)
    assert time_per_output_token(10.0, 10.0, 1) is None and time_per_output_token(None, None, 0) is None
    m = Metrics()
    m.tokens(1, since=0.0, now=0.2, first=True)
    m.tokens(3, since=0.2, now=0.5, first=False)
    m.request_finished("length", started=0.0, finished=0.6, first_token_at=0.2, last_token_at=0.5, tokens=4,
                       stats=SimpleNamespace(queued_seconds=0.05))
    m.request_done("cancelled")
    from engine.outputs import EngineStats
    stats = EngineStats(rows_on_device=1, rows_parked=2, requests_waiting=3, kv_bytes_on_device=4,
                        kv_bytes_on_host=5, steps=6, step_errors=0, preemptions=7, bytes_offloaded=8,
                        bytes_restored=9, seconds_idle=1.5)
    info = SimpleNamespace(model_name="m", device="cpu", dtype="float32", max_context_length=256,
                           kv_slab_bytes=1024, max_batch_size=2)
    m.watch_engine(SimpleNamespace(stats=lambda: stats, info=info, alive=True))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    types = {name: f.type for name, f in families.items()}
    for name in ("baton_requests", "baton_generated_tokens", "baton_preemptions", "baton_kv_offload_bytes",
                 "baton_kv_restore_bytes", "baton_engine_steps", "baton_engine_step_errors",
                 "baton_engine_idle_seconds"):
        assert types[name] == "counter", name
    for name in ("baton_running_rows", "baton_parked_rows", "baton_queue_depth", "baton_kv_device_bytes",
                 "baton_kv_host_bytes", "baton_engine_alive", "baton_kv_slab_bytes", "baton_max_batch_size"):
        assert types[name] == "gauge", name
    for name in ("baton_time_to_first_token_seconds", "baton_inter_token_latency_seconds",
                 "baton_time_per_output_token_seconds", "baton_request_duration_seconds",
                 "baton_request_queue_seconds"):
        assert types[name] == "histogram", name
    assert samples[("baton_requests_total", (("status", "length"),))] == 1
    assert samples[("baton_requests_total", (("status", "cancelled"),))] == 1
    assert samples[("baton_requests_total", (("status", "eos"),))] == 0  # exported from the start
    assert samples[("baton_generated_tokens_total", ())] == 4
    assert samples[("baton_time_per_output_token_seconds_sum", ())] == pytest.approx(0.1)
    assert samples[("baton_time_per_output_token_seconds_count", ())] == 1
    assert samples[("baton_inter_token_latency_seconds_sum", ())] == pytest.approx(0.1)
    assert samples[("baton_request_duration_seconds_sum", ())] == pytest.approx(0.6)
    assert samples[("baton_preemptions_total", ())] == 7 and samples[("baton_queue_depth", ())] == 3
    assert samples[("baton_engine_idle_seconds_total", ())] == 1.5
    assert samples[("baton_model_info", (("device", "cpu"), ("dtype", "float32"), ("max_context_length", "256"),
                                         ("model", "m")))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_config_files_pass_their_own_checkers(tools, tmp_path):
    """promtool checks prometheus.yml + alerts.yml; nginx -t checks the rendered template."""
    check = subprocess.run([tools["promtool"], "check", "config", str(DEPLOY / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    conf = tmp_path / "nginx.conf"
    conf.write_text(render((DEPLOY / "nginx.conf").read_text(), {
        "NGINX_GRPC_LISTEN": "127.0.0.1:1", "NGINX_STATUS_LISTEN": "127.0.0.1:2",
        "BATON_UPSTREAM_1": "baton-1:50051", "BATON_UPSTREAM_2": "127.0.0.1:50052"}).replace(
            "baton-1:50051", "127.0.0.1:50051"))
    check = subprocess.run([tools["nginx"], "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr",
                            "-g", f"pid {tmp_path / 'nginx.pid'};"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_compose_file_matches_the_deploy_configs():
    """docker-compose.yml: two replicas, nginx rendering deploy/nginx.conf from its environment,
    Prometheus scraping exactly the replicas' metrics ports; `docker compose config` when present."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("baton-"))
    assert replicas == ["baton-1", "baton-2"]
    nginx = services["nginx"]
    assert any(str(v).startswith("./deploy/nginx.conf:/etc/nginx/templates/nginx.conf.template")
               for v in nginx["volumes"])
    env = {k: str(v) for k, v in nginx["environment"].items()}
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    rendered = render((DEPLOY / "nginx.conf").read_text(), env)
    assert all(f"server {name}:50051 " in rendered for name in replicas)
    for name in replicas:
        renv = {k: str(v) for k, v in services[name]["environment"].items()}
        assert renv["BATON_PORT"] == "50051" and renv["BATON_METRICS_PORT"] == "9090"
        assert set(nginx["depends_on"][name].values()) == {"service_healthy"}
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] if job["job_name"] == "baton"
               for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:9090" for name in replicas}
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./deploy/prometheus.yml:" in mounts and "./deploy/alerts.yml:" in mounts
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None or subprocess.run([*cmd, "version"], capture_output=True).returncode != 0:
            continue  # e.g. the docker CLI without the compose plugin
        done = subprocess.run([*cmd, "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                              capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, f"{' '.join(cmd)} config rejected docker-compose.yml:\n{done.stderr}"
        break


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics (last matching pattern wins; a pattern matching a parent folder
    matches everything under it), enough for the simple patterns this repo uses."""
    import fnmatch
    parts = path.split("/")
    allowed = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_only_what_the_build_context_has(dockerfile):
    """Every COPY source exists in the repo and survives .dockerignore (docker cannot run here)."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources, f"{dockerfile} copies nothing"
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile}: COPY {src}: not in the repo"
        files = [p for p in ((REPO / src).rglob("*") if (REPO / src).is_dir() else [REPO / src]) if p.is_file()]
        kept = [p for p in files if _dockerignore_allows(str(p.relative_to(REPO)), patterns)]
        assert kept, f"{dockerfile}: COPY {src}: everything excluded by .dockerignore"
    assert "HEALTHCHECK" in text and "deploy/baton_healthcheck.py" in text


def test_container_healthcheck_script(replicas):
    """deploy/baton_healthcheck.py, the images' HEALTHCHECK: 0 on SERVING, 2 when nothing answers."""
    script = str(DEPLOY / "baton_healthcheck.py")
    ok = subprocess.run([sys.executable, script, "--target", replicas[0].target], capture_output=True, text=True)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    env = {**os.environ, "BATON_PORT": str(replicas[1].port)}
    ok = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    down = subprocess.run([sys.executable, script, "--target", f"127.0.0.1:{free_port()}", "--timeout", "2"],
                          capture_output=True, text=True)
    assert down.returncode == 2, down.stdout + down.stderr


def test_nginx_balances_streams_over_both_replicas(replicas, nginx):
    before = [served(r) for r in replicas]
    with BatonClient(nginx.target) as client:
        assert client.health() == "SERVING"
        assert client.health("baton.v1.GenerationService") == "SERVING"
        assert client.model_info().max_batch_size == 2
        # Server reflection (a bidirectional stream) through the proxy: `grpcurl LB list` works.
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "baton.v1.GenerationService" in {s.name for s in reply.list_services_response.service}
        # Streaming through the proxy: the first message (QUEUED) arrives before the last token.
        messages = list(client.generate("Once upon a time", options=GenerationOptions(max_new_tokens=16,
                                                                                       ignore_eos=True)))
        assert messages[0].state == pb.QUEUED and messages[-1].finish_reason == pb.LENGTH
        assert sum(len(m.token_ids) for m in messages) == 16 and len(messages) > 2
    completions = run_many(nginx.target, 8, concurrency=4)
    assert all(c.finish_reason == "LENGTH" and c.completion_tokens == 8 for c in completions)
    per_replica = [served(r) - b for r, b in zip(replicas, before)]
    print(f"\nrequests per replica through nginx (9 sent): {per_replica}")
    assert sum(per_replica) == 9
    assert min(per_replica) >= 2, f"nginx did not spread the load: {per_replica}"


def test_preempt_reaches_the_replica_that_runs_the_request(replicas, nginx):
    """With the same x-baton-request-id header on Generate and Preempt, nginx hashes both to one
    replica, so Preempt(CANCEL) through the balancer finds the request every time."""
    channel = grpc.insecure_channel(nginx.target)
    stub = BatonClient(channel=channel).stub
    try:
        for i in range(4):
            rid = f"sticky-{i}-{os.getpid()}"
            header = (("x-baton-request-id", rid),)
            call = stub.Generate(build_request("Tell me a long story about a dragon", request_id=rid,
                                               options=GenerationOptions(max_new_tokens=200, ignore_eos=True)),
                                 metadata=header, timeout=120)
            stream = iter(call)
            while not next(stream).token_ids:  # wait for the first token: it is running now
                pass
            reply = stub.Preempt(build_preempt(rid, "cancel", None), metadata=header, timeout=10)
            assert reply.request_id == rid
            rest = list(stream)
            assert rest and rest[-1].finish_reason == pb.CANCELLED
    finally:
        channel.close()
    lines = nginx.log_lines()
    for i in range(4):
        rid = f"sticky-{i}-{os.getpid()}"
        ups = {re.search(r"upstream=(\S+)", line).group(1) for line in lines if f"request_id={rid} " in line}
        assert len(ups) == 1, f"{rid} went to {ups}"


def test_prometheus_scrapes_both_replicas(replicas, nginx, prometheus):
    # Scraped once before the requests, so that rate() sees the counters grow.
    wait_until(lambda: prometheus.value('count(up{job="baton"} == 1)') == 2, 30, "both replicas up")
    run_many(nginx.target, 4, concurrency=2, prefix="prom")
    expected_length = sum(served(r) for r in replicas)
    expected_tokens = sum(metric(r, "baton_generated_tokens_total") for r in replicas)
    assert expected_length >= 4 and expected_tokens >= 32
    wait_until(lambda: prometheus.value('sum(baton_requests_total{status="length"})') == expected_length,
               30, f"Prometheus to see {expected_length} finished requests")
    wait_until(lambda: prometheus.value("sum(baton_generated_tokens_total)") == expected_tokens,
               30, f"Prometheus to see {expected_tokens} tokens")
    # Every family the docs promise, from each replica.
    for name in ("baton_queue_depth", "baton_running_rows", "baton_parked_rows", "baton_kv_device_bytes",
                 "baton_kv_host_bytes", "baton_preemptions_total", "baton_kv_offload_bytes_total",
                 "baton_kv_restore_bytes_total", "baton_engine_steps_total", "baton_engine_alive",
                 "baton_time_to_first_token_seconds_count", "baton_inter_token_latency_seconds_count",
                 "baton_time_per_output_token_seconds_count", "baton_request_duration_seconds_count",
                 "baton_model_info"):
        assert prometheus.value(f"count({name})") == 2, name
    assert prometheus.value("min(baton_engine_alive)") == 1
    assert prometheus.value("sum(baton_time_to_first_token_seconds_count)") >= 4
    # Per-request histograms are observed by Metrics.request_finished; once the servicer calls it,
    # every request that ran to max_new_tokens here (8+ tokens each) has a TPOT.
    if prometheus.value("sum(baton_request_duration_seconds_count)"):
        wait_until(lambda: prometheus.value("sum(baton_time_per_output_token_seconds_count)") >= expected_length,
                   10, "a TPOT observation per finished request")
    # Rules load and evaluate (recording rule over the fresh counters).
    wait_until(lambda: (prometheus.value("sum(baton:generated_tokens:rate1m)") or 0) > 0, 30,
               "the recording rule baton:generated_tokens:rate1m")
    rules = json.loads(http_get(f"http://127.0.0.1:{prometheus.port}/api/v1/rules"))["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] not in ("ok", "unknown")]
    assert rules and not bad, bad
    firing = [a["labels"]["alertname"] for a in prometheus.query("ALERTS")]
    assert not firing, f"alerts firing on a healthy topology: {firing}"


def test_failover_when_a_replica_stops(replicas, nginx):
    """SIGTERM one replica while it streams: its stream drains to the end through nginx, and every
    new call through nginx succeeds on the other replica. Runs last: it stops a replica."""
    before = [served(r) for r in replicas]
    with BatonClient(nginx.target) as client:
        long_call = client.generate("Write a poem about the sea", options=GenerationOptions(max_new_tokens=48,
                                                                                             ignore_eos=True))
        stream = iter(long_call)
        while not next(stream).token_ids:
            pass
        victim = wait_until(lambda: next((r for r in replicas if metric(r, "baton_running_rows") == 1), None),
                            10, "the replica running the long stream")
        survivor = next(r for r in replicas if r is not victim)
        victim.proc.send_signal(signal.SIGTERM)
        # New calls while the victim drains, and after it is gone.
        during = run_many(nginx.target, 4, concurrency=2, prefix="during")
        rest = list(stream)
        assert rest[-1].finish_reason == pb.LENGTH, "the in-flight stream did not drain to its end"
        assert victim.proc.wait(60) == 0
        after = run_many(nginx.target, 6, concurrency=2, prefix="after")
        assert client.health() == "SERVING"
    assert all(c.finish_reason == "LENGTH" for c in during + after)
    assert served(survivor) - before[replicas.index(survivor)] == 10
    failed_over = [line for line in nginx.log_lines() if re.search(r"upstream=\S+, ", line)]
    print(f"\nfailover: 10/10 new calls succeeded on the survivor; nginx retried {len(failed_over)} "
          f"call(s) past the stopped replica; in-flight stream finished {pb.FinishReason.Name(rest[-1].finish_reason)}")
