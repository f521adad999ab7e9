#!/usr/bin/env python3
"""Load and soak test on loopback: N concurrent Generate streams for D seconds, with random client
cancels, deadlines, Preempt calls and a few invalid requests, against a server this script starts
(or --target). Bounded: nothing but 127.0.0.1 is contacted.

Checks, each a reason for a non-zero exit:
  * every stream ended with a documented status for what it asked for (OK with a finish reason,
    CANCELLED only after our own cancel, DEADLINE_EXCEEDED only with a deadline, RESOURCE_EXHAUSTED
    only with a retry-after-ms trailer, INVALID_ARGUMENT only for the deliberately invalid requests;
    never UNKNOWN / INTERNAL / UNAVAILABLE);
  * at the end baton_running_rows, baton_queue_depth, baton_parked_rows, baton_kv_device_bytes and
    baton_kv_host_bytes return to 0, and health is SERVING;
  * server RSS at the end is within --max-rss-growth-pct of RSS after warm-up;
  * a server started here exits 0 on SIGTERM.

    .venv/bin/python scripts/soak.py                      # 200 streams, 300 s, own server
    .venv/bin/python scripts/soak.py --duration 20 --streams 16 --target 127.0.0.1:50051 \\
        --metrics-url http://127.0.0.1:9090/metrics --pid 1234

Prints a summary and writes every figure (and each stream's final status counts) as JSON (--json).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "clients" / "python")]

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from baton.v1 import baton_pb2 as pb  # noqa: E402
from baton.v1 import baton_pb2_grpc as pb_grpc  # noqa: E402

GAUGES = ("baton_running_rows", "baton_queue_depth", "baton_parked_rows", "baton_kv_device_bytes",
          "baton_kv_host_bytes")
PROMPTS = [
    "The three primary colors are", "Write a haiku about the sea.", "In 1492,", "Python is a",
    "Explain photosynthesis in one sentence.", "List three fruits:", "The capital of France is",
    "Once upon a time", "def fibonacci(n):", "The quick brown fox", "Translate to French: good morning",
    "My favourite food is", "Why is the sky blue?", "A short poem about autumn:",
]


# ---- the server and its numbers ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {series (with labels): value}."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def rss_bytes(pid: int | None, metrics_url: str | None) -> int | None:
    if pid is not None:
        try:
            import psutil
            return psutil.Process(pid).memory_info().rss
        except ImportError:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except Exception:  # noqa: BLE001 - the process went away
            return None
    if metrics_url:
        return int(scrape(metrics_url).get("process_resident_memory_bytes", 0)) or None
    return None


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), *args.server_args.split()]
    print(f"starting server: {' '.join(cmd[1:])}  (log: {log_path})", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"


async def wait_serving(target: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} before SERVING")
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server not SERVING in time")
            await asyncio.sleep(0.5)


# ---- the load ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What one request asks for, so its ending can be judged."""
    kind: str                      # normal | cancel | deadline | invalid | preempt
    request: pb.GenerateRequest
    timeout: float | None = None
    cancel_after_tokens: int | None = None   # 0: cancel before the first token


@dataclass
class Tally:
    outcomes: collections.Counter = field(default_factory=collections.Counter)   # "kind code[/reason]"
    unexpected: list = field(default_factory=list)
    preempt: collections.Counter = field(default_factory=collections.Counter)
    ttft: list = field(default_factory=list)
    tokens: int = 0
    streams: int = 0


def make_plan(rng: random.Random, args, seq: int) -> Plan:
    params = pb.GenerationParams(max_new_tokens=rng.randint(1, args.max_new_tokens),
                                 ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.3:
        params.temperature, params.top_p, params.seed = rng.uniform(0.5, 1.2), rng.choice([0.0, 0.9]), seq
    if rng.random() < 0.1:
        params.stop.append(rng.choice([".", "\n", " the"]))
    request = pb.GenerateRequest(prompt=rng.choice(PROMPTS), priority=rng.choice([0, 0, 0, 1, -1]), params=params)
    roll = rng.random()
    if roll < args.invalid_rate:
        bad = rng.choice(["top_p", "stop", "prompt", "max_new_tokens"])
        if bad == "top_p":
            request.params.top_p = 2.0
        elif bad == "stop":
            request.params.stop.extend(f"s{i}" for i in range(100))
        elif bad == "prompt":
            request.prompt = ""
        else:
            request.params.max_new_tokens = 10**9
        return Plan("invalid", request)
    roll -= args.invalid_rate
    if roll < args.cancel_rate:
        return Plan("cancel", request, cancel_after_tokens=rng.choice([0, 0, 1, 2, 4]))
    roll -= args.cancel_rate
    if roll < args.deadline_rate:
        return Plan("deadline", request, timeout=rng.uniform(0.2, 8.0))
    roll -= args.deadline_rate
    if roll < args.preempt_rate:
        request.request_id = f"soak-{seq}"
        request.params.max_new_tokens = args.max_new_tokens
        return Plan("preempt", request, timeout=120)
    return Plan("normal", request, timeout=300)   # a generous cap: a hang is a failure, not a deadline


def judge(plan: Plan, code: grpc.StatusCode, finish: str, cancelled_by_us: bool, trailers) -> str | None:
    """None when the ending is documented for what was asked; else why not."""
    if code == grpc.StatusCode.OK:
        if finish in ("LENGTH", "EOS", "STOP_SEQUENCE"):
            return None if plan.kind != "invalid" else "invalid request was served"
        if finish == "CANCELLED" and plan.kind == "preempt":
            return None
        return f"OK with finish_reason {finish or 'none'}"
    if code == grpc.StatusCode.CANCELLED:
        return None if cancelled_by_us else "CANCELLED without a client cancel"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return None if plan.kind in ("deadline", "preempt") or plan.timeout else "DEADLINE_EXCEEDED without a deadline"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = dict(trailers or ()).get("retry-after-ms")
        return None if retry and int(retry) > 0 else "RESOURCE_EXHAUSTED without retry-after-ms"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return None if plan.kind == "invalid" else "INVALID_ARGUMENT for a valid request"
    return f"undocumented status {code.name}"


async def run_one(stub, plan: Plan, tally: Tally, rng: random.Random) -> float:
    """One stream; returns how long to back off (retry-after) before the next."""
    started = time.monotonic()
    call = stub.Generate(plan.request, timeout=plan.timeout)
    tokens, finish, cancelled, first_at, trailers = 0, "", False, None, ()
    preempt_task = None
    try:
        if plan.cancel_after_tokens == 0:
            await asyncio.sleep(rng.uniform(0, 0.05))
            call.cancel()
            cancelled = True
        async for msg in call:
            if msg.token_ids:
                tokens += len(msg.token_ids)
                if first_at is None:
                    first_at = time.monotonic()
                    if plan.kind == "preempt":
                        preempt_task = asyncio.create_task(preempt_dance(stub, plan.request.request_id, tally, rng))
            if msg.finish_reason:
                finish = pb.FinishReason.Name(msg.finish_reason)
            if plan.cancel_after_tokens and tokens >= plan.cancel_after_tokens and not msg.finish_reason:
                call.cancel()
                cancelled = True
                break
        code = await call.code()
    except grpc.aio.AioRpcError as exc:
        code, trailers = exc.code(), exc.trailing_metadata()
    except asyncio.CancelledError:   # grpc.aio raises this for a call we cancelled ourselves
        if not cancelled:
            call.cancel()
            raise
        code = grpc.StatusCode.CANCELLED
    if cancelled and code == grpc.StatusCode.OK and not finish:
        code = grpc.StatusCode.CANCELLED
    if preempt_task is not None:
        await preempt_task
    tally.streams += 1
    tally.tokens += tokens
    if first_at is not None and plan.kind == "normal":
        tally.ttft.append(first_at - started)
    label = f"{plan.kind} {code.name}" + (f"/{finish}" if finish else "")
    tally.outcomes[label] += 1
    problem = judge(plan, code, finish, cancelled, trailers)
    if problem is not None:
        tally.unexpected.append({"kind": plan.kind, "code": code.name, "finish": finish, "problem": problem,
                                 "details": (await call.details() or "")[:200] if code != grpc.StatusCode.OK else ""})
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_ms = int(dict(trailers or ()).get("retry-after-ms", "1000"))
        return min(retry_ms / 1000, 2.0) * rng.uniform(0.5, 1.5)
    return 0.0


async def preempt_dance(stub, request_id: str, tally: Tally, rng: random.Random) -> None:
    """Suspend, resume, re-prioritise or cancel our own request. NOT_FOUND / FAILED_PRECONDITION
    when it already finished are documented answers."""
    documented = {"OK", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
    steps = rng.choice([[("suspend", None), ("resume", None)], [("priority", rng.randint(-3, 3))], [("cancel", None)]])
    actions = {"suspend": pb.PreemptRequest.SUSPEND, "resume": pb.PreemptRequest.RESUME,
               "cancel": pb.PreemptRequest.CANCEL, "priority": pb.PreemptRequest.ACTION_UNSPECIFIED}
    for name, priority in steps:
        msg = pb.PreemptRequest(request_id=request_id, action=actions[name])
        if priority is not None:
            msg.priority = priority
        try:
            await stub.Preempt(msg, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        tally.preempt[f"{name} {code}"] += 1
        if code not in documented:
            tally.unexpected.append({"kind": "preempt-call", "code": code, "problem": f"Preempt {name}"})
        await asyncio.sleep(rng.uniform(0.05, 0.3))


async def worker(i: int, stub, args, tally: Tally, stop_at: float, seq: collections.Counter) -> None:
    rng = random.Random(args.seed * 100_003 + i)
    await asyncio.sleep(rng.uniform(0, 2.0))     # spread the first arrivals
    while time.monotonic() < stop_at:
        seq["n"] += 1
        backoff = await run_one(stub, make_plan(rng, args, seq["n"]), tally, rng)
        if backoff:
            await asyncio.sleep(backoff)


async def sampler(pid, metrics_url, t0: float, samples: list, stop: asyncio.Event, every: float) -> None:
    while not stop.is_set():
        entry = {"t": round(time.monotonic() - t0, 1), "rss": rss_bytes(pid, metrics_url)}
        try:
            values = scrape(metrics_url) if metrics_url else {}
            entry.update({g: values.get(g) for g in GAUGES})
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            entry["scrape_error"] = repr(exc)
        samples.append(entry)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def wait_gauges_zero(metrics_url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(metrics_url)
        gauges = {g: values.get(g, float("nan")) for g in GAUGES}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.5)


def request_counters(metrics_url: str) -> dict[str, float]:
    return {k: v for k, v in scrape(metrics_url).items() if k.startswith("baton_requests_total{")}


async def soak(args, target: str, metrics_url: str | None, pid: int | None) -> dict:
    await wait_serving(target, None)
    counters_before = request_counters(metrics_url) if metrics_url else {}
    tally, samples, seq = Tally(), [], collections.Counter()
    t0 = time.monotonic()
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(sampler(pid, metrics_url, t0, samples, stop_sampling, args.sample_every))
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(args.connections)]
    stubs = [pb_grpc.GenerationServiceStub(ch) for ch in channels]
    stop_at = t0 + args.duration
    progress = asyncio.create_task(report_progress(tally, t0, args.duration))
    await asyncio.gather(*(worker(i, stubs[i % len(stubs)], args, tally, stop_at, seq) for i in range(args.streams)))
    load_s = time.monotonic() - t0
    progress.cancel()
    for ch in channels:
        await ch.close()
    gauges = await wait_gauges_zero(metrics_url, 60) if metrics_url else {}
    drained_s = time.monotonic() - t0 - load_s
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2.HealthCheckResponse.ServingStatus.Name(
            (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)).status)
    stop_sampling.set()
    await sampling
    end_rss = rss_bytes(pid, metrics_url)
    warm = [s for s in samples if s["t"] >= args.warmup and s.get("rss")]
    warm_rss = warm[0]["rss"] if warm else None
    peak_rss = max((s["rss"] for s in samples if s.get("rss")), default=None)
    counters_after = request_counters(metrics_url) if metrics_url else {}
    ttft = sorted(tally.ttft)

    def pct(q: float) -> float | None:
        return round(ttft[min(len(ttft) - 1, int(q * len(ttft)))], 3) if ttft else None
    growth = (end_rss - warm_rss) / warm_rss * 100 if end_rss and warm_rss else None
    result = {
        "target": target, "streams": args.streams, "connections": args.connections, "duration_s": args.duration,
        "load_seconds": round(load_s, 1), "drain_seconds": round(drained_s, 1),
        "requests": tally.streams, "requests_per_s": round(tally.streams / load_s, 2),
        "tokens_streamed": tally.tokens, "tokens_per_s": round(tally.tokens / load_s, 1),
        "ttft_normal_s": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                          "mean": round(statistics.fmean(ttft), 3) if ttft else None},
        "outcomes": dict(sorted(tally.outcomes.items())), "preempt_calls": dict(sorted(tally.preempt.items())),
        "unexpected": tally.unexpected[:50], "unexpected_count": len(tally.unexpected),
        "gauges_at_end": gauges, "health_at_end": health,
        "rss_mib": {"after_warmup": _mib(warm_rss), "end": _mib(end_rss), "peak": _mib(peak_rss),
                    "growth_pct": round(growth, 1) if growth is not None else None, "warmup_s": args.warmup},
        "server_request_counters_delta": {k: v - counters_before.get(k, 0) for k, v in counters_after.items()
                                          if v - counters_before.get(k, 0)},
        "samples": samples,
    }
    failures = []
    if tally.unexpected:
        failures.append(f"{len(tally.unexpected)} streams ended with an undocumented status")
    if gauges and any(v != 0 for v in gauges.values()):
        failures.append(f"gauges did not return to 0: {gauges}")
    if health != "SERVING":
        failures.append(f"health is {health}")
    if growth is not None and args.max_rss_growth_pct is not None and growth > args.max_rss_growth_pct:
        failures.append(f"RSS grew {growth:.1f}% after warm-up (limit {args.max_rss_growth_pct}%)")
    if tally.streams == 0:
        failures.append("no request completed")
    result["failures"] = failures
    return result


def _mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value else None


async def report_progress(tally: Tally, t0: float, duration: float) -> None:
    while True:
        await asyncio.sleep(max(5.0, duration / 10))
        print(f"  t={time.monotonic() - t0:5.0f}s  requests={tally.streams}  tokens={tally.tokens}  "
              f"unexpected={len(tally.unexpected)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200, help="concurrent streams (each loops over requests)")
    p.add_argument("--duration", type=float, default=300, help="seconds of load")
    p.add_argument("--connections", type=int, default=4, help="client connections the streams share")
    p.add_argument("--max-new-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    p.add_argument("--cancel-rate", type=float, default=0.15, help="share of requests the client cancels")
    p.add_argument("--deadline-rate", type=float, default=0.15, help="share with a 0.2-8 s deadline")
    p.add_argument("--preempt-rate", type=float, default=0.05, help="share that Preempt their own request")
    p.add_argument("--invalid-rate", type=float, default=0.02, help="share of deliberately invalid requests")
    p.add_argument("--warmup", type=float, default=30, help="RSS baseline: first sample after this many seconds")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between RSS / gauge samples")
    p.add_argument("--max-rss-growth-pct", type=float, default=25.0, help="fail above this RSS growth after warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="host:port of a running server (loopback); default: start one")
    p.add_argument("--metrics-url", help="its /metrics URL (needed with --target for the gauge checks)")
    p.add_argument("--pid", type=int, help="its process id (for RSS; else process_resident_memory_bytes)")
    p.add_argument("--server-args", default="--max-batch-size 16 --max-queue 176 --max-seq-len 512",
                   help="extra `baton serve` flags for a server started here")
    p.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "baton-soak-result.json"),
                   help="where to write the figures (default: in the temp folder)")
    p.add_argument("--log", default=None, help="server log path (default: next to --json)")
    args = p.parse_args(argv)
    if args.target and args.target.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
        p.error("--target must be on loopback")

    proc = None
    target, metrics_url, pid = args.target, args.metrics_url, args.pid
    log_path = Path(args.log or Path(args.json).with_suffix(".server.log"))
    if target is None:
        proc, target, metrics_url = start_server(args, log_path)
        pid = proc.pid
    started = time.monotonic()
    try:
        asyncio.run(wait_serving(target, proc))
        print(f"server SERVING after {time.monotonic() - started:.0f}s; "
              f"{args.streams} streams for {args.duration:.0f}s", flush=True)
        result = asyncio.run(soak(args, target, metrics_url, pid))
    finally:
        exit_code = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed after 60 s"
    if proc is not None:
        result["server_exit_code"] = exit_code
        result["server_log"] = str(log_path)
        if exit_code != 0:
            result["failures"].append(f"server exit code {exit_code} after SIGTERM")
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    Path(args.json).write_text(json.dumps(result, indent=2))
    print_summary(result)
    print(f"figures: {args.json}")
    return 1 if result["failures"] else 0


def print_summary(r: dict) -> None:
    print(f"\n== soak: {r['streams']} streams x {r['load_seconds']}s on {r['target']} ==")
    print(f"requests {r['requests']} ({r['requests_per_s']}/s), tokens {r['tokens_streamed']} ({r['tokens_per_s']}/s), "
          f"TTFT normal p50/p95/p99 {r['ttft_normal_s']['p50']}/{r['ttft_normal_s']['p95']}/{r['ttft_normal_s']['p99']} s")
    print("final statuses:")
    for label, count in r["outcomes"].items():
        print(f"  {count:7d}  {label}")
    if r["preempt_calls"]:
        print("preempt calls: " + ", ".join(f"{k}: {v}" for k, v in r["preempt_calls"].items()))
    print(f"undocumented endings: {r['unexpected_count']}")
    print(f"gauges at end (after {r['drain_seconds']}s): {r['gauges_at_end']}; health {r['health_at_end']}")
    rss = r["rss_mib"]
    print(f"server RSS MiB: after warm-up {rss['after_warmup']}, end {rss['end']}, peak {rss['peak']}, "
          f"growth {rss['growth_pct']}%")
    if "server_exit_code" in r:
        print(f"server exit code after SIGTERM: {r['server_exit_code']}")
    print("RESULT: " + ("PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))


if __name__ == "__main__":
    sys.exit(main())
