"""Tracing on against tracing off: TPOT at batch 32 through two real `baton serve` processes.

    python -m benchmarks.tracing_ab [--rounds 6] [--batch 32] [--tokens 64] [--out FILE]

Server A has no OTEL_* variables (tracing off); server B exports every span over OTLP to a
receiver in this process (the collector's TraceService, as in tests/test_tracing.py), sampled at
100%, batch processor flushing every 100 ms. Both serve the built-in model on CPU with
`--max-batch-size BATCH`. Rounds alternate A, B, B, A, ... (paired, so drift on a shared machine
falls on both); each round sends BATCH concurrent streams of TOKENS tokens (EOS ignored) and
records each stream's TPOT (time between its first and last token over tokens - 1). Reported: the
median TPOT of each round, the per-pair ratio B / A and its median, and the spans B exported.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _receiver():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request, context):
            Receiver.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, Receiver


def _serve(batch: int, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--device", "cpu",
           "--max-batch-size", str(batch), "--max-seq-len", "512"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}   # only `env` configures tracing
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**base, **env})
    return proc, port


def _wait_serving(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    from baton_client import BatonClient
    deadline = time.monotonic() + timeout
    with BatonClient(f"127.0.0.1:{port}") as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited early")
            try:
                if client.health() == "SERVING":
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.25)
    raise TimeoutError("server not SERVING")


def _round(port: int, batch: int, tokens: int) -> float:
    """BATCH concurrent streams; -> the median TPOT (s) of the round."""
    from baton.v1 import baton_pb2 as pb
    from baton.v1 import baton_pb2_grpc as pb_grpc
    tpots: list[float] = []
    lock = threading.Lock()

    def one(i: int, stub) -> None:
        times = []
        msg = pb.GenerateRequest(prompt=f"Tell me a story about the number {i}.",
                                 params=pb.GenerationParams(max_new_tokens=tokens, ignore_eos=True))
        for resp in stub.Generate(msg):
            times.extend([time.monotonic()] * len(resp.token_ids))
        with lock:
            tpots.append((times[-1] - times[0]) / (len(times) - 1))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        threads = [threading.Thread(target=one, args=(i, stub)) for i in range(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return statistics.median(tpots)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracing_ab", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="pairs of rounds (A and B each this many times)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tracing-ab-cpu.json"))
    args = p.parse_args(argv)
    receiver, receiver_port, Receiver = _receiver()
    logs = Path(tempfile.mkdtemp(prefix="tracing-ab-"))
    traced = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
              "OTEL_SERVICE_NAME": "baton-ab", "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "always_on"}
    a, a_port = _serve(args.batch, {}, logs / "off.log")
    b, b_port = _serve(args.batch, traced, logs / "on.log")
    try:
        _wait_serving(a_port, a)
        _wait_serving(b_port, b)
        for port in (a_port, b_port):   # warm-up round each
            _round(port, args.batch, 8)
        pairs = []
        for i in range(args.rounds):
            order = ((a_port, b_port) if i % 2 == 0 else (b_port, a_port))
            got = {port: _round(port, args.batch, args.tokens) for port in order}
            pairs.append((got[a_port], got[b_port]))
            print(f"round {i}: off {1000 * got[a_port]:.2f} ms, on {1000 * got[b_port]:.2f} ms", file=sys.stderr)
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(30)
        receiver.stop(0)
    ratios = [on / off for off, on in pairs]
    result = {
        "command": "python -m benchmarks.tracing_ab " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": args.batch, "tokens": args.tokens, "rounds": args.rounds,
        "tpot_off_ms": [1000 * x for x, _ in pairs], "tpot_on_ms": [1000 * y for _, y in pairs],
        "ratio_on_over_off": ratios, "ratio_median": statistics.median(ratios),
        "spans_exported": Receiver.spans,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
