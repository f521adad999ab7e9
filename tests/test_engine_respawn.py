"""Engine respawn (service/server.py's supervisor) on a real `baton serve`, and `--metrics-host`.

The engine process is killed (SIGKILL) under load: every open stream ends UNAVAILABLE within 2 s,
health goes NOT_SERVING, a new engine process starts and health is SERVING again, the next
requests succeed and `baton_engine_restarts_total` counts the restart. Past
`--engine-max-restarts` failures within the window (here: a second death whose restart cannot
load the model) the server exits EXIT_ENGINE_GAVE_UP (3). docs/reliability.md.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest
from baton_client import AsyncBatonClient, BatonClient, GenerationOptions
from conftest import start_server

pytestmark = pytest.mark.slow

LONG = GenerationOptions(max_new_tokens=400, ignore_eos=True)
STREAMS = 64


def engine_pids(server) -> list[int]:
    """Engine process ids in the order their engines became ready (the server's log)."""
    return [json.loads(line)["engine_pid"] for line in server.log_path.read_text().splitlines()
            if '"engine_ready"' in line]


def log_events(server, event: str) -> list[dict]:
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if f'"{event}"' in line]


def metrics_answer(host: str, port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


def wait_health(client: BatonClient, status: str, timeout: float) -> float:
    """Seconds until gRPC health "" reports `status` (AssertionError after `timeout`)."""
    start = time.monotonic()
    while client.health() != status:
        assert time.monotonic() - start < timeout, f"health not {status} after {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def wait_restarted(server, old_pids: list[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while len(engine_pids(server)) == len(old_pids):
        assert server.proc.poll() is None and time.monotonic() < deadline, "no new engine"
        time.sleep(0.1)
    return engine_pids(server)[-1]


async def kill_under_load(target: str, engine_pid: int) -> tuple[float, list[tuple[grpc.StatusCode, str, float]]]:
    """STREAMS long generations over 4 connections; once every one is queued or running (and some
    stream tokens), SIGKILL the engine. -> (kill time, [(code, details, end time)] per stream)."""
    clients = [AsyncBatonClient(target) for _ in range(4)]
    started = [asyncio.Event() for _ in range(STREAMS)]
    tokens = asyncio.Event()

    async def one(i: int) -> tuple[grpc.StatusCode, str, float]:
        try:
            async for msg in clients[i % 4].generate(f"Stream {i}: count from one to a thousand:", options=LONG):
                started[i].set()
                if msg.token_ids:
                    tokens.set()
            return grpc.StatusCode.OK, "", time.monotonic()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), time.monotonic()
        finally:
            started[i].set()

    calls = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started), tokens.wait()), 120)
    killed_at = time.monotonic()
    os.kill(engine_pid, signal.SIGKILL)
    ends = await asyncio.wait_for(asyncio.gather(*calls), 30)
    for c in clients:
        await c.close()
    return killed_at, ends


def test_engine_killed_under_load_is_restarted(tmp_path):
    server = start_server(tmp_path, "--metrics-host", "127.0.0.2", "--engine-restart-backoff-seconds", "0.5")
    server.metrics_host = "127.0.0.2"
    try:
        # --metrics-host: /metrics answers on that address only, not on the gRPC host
        assert metrics_answer("127.0.0.2", server.metrics_port)
        assert not metrics_answer("127.0.0.1", server.metrics_port)
        assert server.metric("baton_engine_restarts_total") == 0
        [first_pid] = engine_pids(server)
        with BatonClient(server.target) as client:
            killed_at, ends = asyncio.run(kill_under_load(server.target, first_pid))
            for code, details, ended_at in ends:
                assert code == grpc.StatusCode.UNAVAILABLE and details == "engine stopped", (code, details)
                assert ended_at - killed_at < 2.0
            # NOT_SERVING while the engine is down; calls meanwhile are refused as retryable
            wait_health(client, "NOT_SERVING", 1)
            with pytest.raises(grpc.RpcError) as refused:
                client.complete("Hi", options=GenerationOptions(max_new_tokens=2))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            back_after = wait_health(client, "SERVING", 90)   # target 60 s; room for a loaded 2-core machine
            assert client.health("baton.v1.GenerationService") == "SERVING"
            new_pid = engine_pids(server)[-1]
            assert new_pid != first_pid and len(engine_pids(server)) == 2
            # the next requests succeed, several at once
            done = [client.complete(f"{i}: The capital of France is", options=GenerationOptions(
                max_new_tokens=4, ignore_eos=True)) for i in range(3)]
            assert [d.finish_reason for d in done] == ["LENGTH"] * 3
        assert server.metric("baton_engine_restarts_total") == 1
        assert server.metric("baton_engine_alive") == 1
        for gauge in ("baton_running_rows", "baton_queue_depth", "baton_parked_rows"):
            assert server.wait_metric(gauge, 0) == 0, gauge
        assert not os.path.exists(f"/proc/{first_pid}")     # the dead engine was reaped
        assert [e["failures_in_window"] for e in log_events(server, "engine_restarting")] == [1]
        print(f"SERVING again {back_after:.1f}s after the streams ended")
    finally:
        assert server.stop() == 0


def test_server_gives_up_after_too_many_failures(tmp_path, tiny_model_dir):
    """Two failures are allowed in the window: a death (restarted), then a second death whose
    restart fails (the model folder is gone): the third failure stops the server with exit 3."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    server = start_server(tmp_path, "--model", str(model), "--max-seq-len", "256", "--no-warmup",
                          "--engine-max-restarts", "2", "--engine-restart-backoff-seconds", "0.2")
    try:
        # default --metrics-host: the gRPC host (127.0.0.1), not every address
        assert metrics_answer("127.0.0.1", server.metrics_port)
        assert not metrics_answer("127.0.0.2", server.metrics_port)
        with BatonClient(server.target) as client:
            [first_pid] = engine_pids(server)
            os.kill(first_pid, signal.SIGKILL)
            wait_restarted(server, [first_pid], 60)
            wait_health(client, "SERVING", 30)
            assert client.complete("Hi", options=GenerationOptions(max_new_tokens=3)).finish_reason in ("LENGTH", "EOS")
        assert server.metric("baton_engine_restarts_total") == 1
        shutil.rmtree(model)
        os.kill(engine_pids(server)[-1], signal.SIGKILL)
        assert server.proc.wait(60) == 3
        restarting = log_events(server, "engine_restarting")
        assert [(e["failures_in_window"], e["in_seconds"]) for e in restarting] == [(1, 0.2), (2, 0.4)]   # doubling
        assert len(log_events(server, "engine_restart_failed")) == 1
        [gave_up] = log_events(server, "engine_restarts_exhausted")
        assert gave_up["failures_in_window"] == 3 and gave_up["exit_code"] == 3
    finally:
        server.stop()
