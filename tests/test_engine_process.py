"""The engine loop in its own process (engine/process.py), as `baton serve` runs it: what callers
see when that process dies, that it exits when the server dies, that a failed start is reported,
and that its outputs equal the in-thread engine's. A tiny random Llama keeps start-up short; the
built-in model's outputs through this path are checked against HF generate in test_service.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from baton_client import BatonClient, GenerationOptions
from conftest import REPO, start_server

from baton.v1 import baton_pb2 as pb
from engine.api import EngineClient
from engine.errors import EngineUnavailable
from engine.request import PreemptAction
from engine.config import EngineConfig
from engine.inputs import GenerateInput
from engine.process import EngineProcess
from engine.request import FinishReason


def _engine_pid(server) -> int:
    for line in server.log_path.read_text().splitlines():
        if '"engine_ready"' in line:
            return json.loads(line)["engine_pid"]
    raise AssertionError("no engine_ready line in the server log")


def _gone(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (a zombie counts: it runs no more code)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def tiny_server(tmp_path, tiny_model_dir):
    # a restart only after 10 minutes: these tests see the dead engine (test_engine_respawn.py the restart)
    running = start_server(tmp_path, "--model", tiny_model_dir("llama"), "--max-seq-len", "256",
                           "--engine-restart-backoff-seconds", "600")
    yield running
    running.stop()


def test_engine_process_death_ends_open_streams_as_unavailable(tiny_server):
    pid = _engine_pid(tiny_server)
    assert pid != tiny_server.proc.pid
    with BatonClient(tiny_server.target) as client:
        call = client.generate("Count:", options=GenerationOptions(max_new_tokens=200, ignore_eos=True),
                               request_id="parked-1")
        first = next(call)
        assert first.state == pb.QUEUED
        # park it, so it is still open (and not finished) whatever the tiny model's speed
        assert client.preempt("parked-1", "suspend") == "SUSPENDED"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine stopped" in ended.value.details()
        deadline = time.monotonic() + 5
        while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as refused:
            client.complete("Hi", options=GenerationOptions(max_new_tokens=2))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as preempt:
            client.preempt("parked-1", "resume")
        assert preempt.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tiny_server.proc.poll() is None   # the server itself stays up, reporting NOT_SERVING until it restarts
    # SIGTERM while the restart waits out its backoff: the server stops at once and exits 0
    stopping = time.monotonic()
    assert tiny_server.stop() == 0
    assert time.monotonic() - stopping < 15


def test_engine_process_exits_when_the_server_is_killed(tiny_server):
    pid = _engine_pid(tiny_server)
    tiny_server.proc.send_signal(signal.SIGKILL)
    tiny_server.proc.wait(10)
    assert _gone(pid, timeout=15), "engine process outlived its server"


def test_engine_process_reports_a_failed_start(tmp_path):
    (tmp_path / "config.json").write_text("{}")   # a folder that is not a model
    with pytest.raises(RuntimeError, match="engine failed to start"):
        EngineProcess(EngineConfig(model=str(tmp_path), device="cpu", warmup=False))
    # the server says so in its log and exits 1 (not a traceback, not a hang)
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--model", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    failed = [json.loads(line) for line in done.stderr.splitlines() if '"engine_start_failed"' in line]
    assert failed and "engine failed to start" in failed[0]["error"]


def _run_all(engine, prompts: list[str], preempt_id: str | None = None) -> dict[str, tuple[list[int], str]]:
    done = {p: threading.Event() for p in prompts}
    got: dict[str, list] = {p: [] for p in prompts}
    finals = {}

    def sink_for(p: str):
        def sink(out) -> None:
            got[p].extend(out.token_ids)
            if out.finished:
                finals[p] = out.finish_reason
                done[p].set()
        return sink

    for i, p in enumerate(prompts):
        engine.submit(GenerateInput(request_id=f"r{i}", prompt=p, max_new_tokens=24 + 8 * i, ignore_eos=True),
                      sink_for(p))
    if preempt_id is not None:   # a SUSPEND/RESUME round trip on one of them, through the transport
        state = engine.preempt(preempt_id, PreemptAction.SUSPEND, None).result(30)
        if state.name == "SUSPENDED":
            engine.preempt(preempt_id, PreemptAction.RESUME, None).result(30)
    for p in prompts:
        assert done[p].wait(120), p
    return {p: (got[p], finals[p]) for p in prompts}


def test_process_transport_outputs_equal_the_thread_transport(tiny_model_dir):
    config = EngineConfig(model=tiny_model_dir("llama"), device="cpu", max_batch_size=2, max_seq_len=128,
                          warmup=False)
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,", "def main():"]
    thread = EngineClient(config)
    thread.start()
    try:
        expected = _run_all(thread, prompts)
    finally:
        thread.stop()
    process = EngineProcess(config)
    try:
        process.start()
        assert _run_all(process, prompts, preempt_id="r3") == expected
        deadline = time.monotonic() + 5   # the idle report follows the last step
        while process.stats().rows_on_device and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = process.stats()
        assert stats.rows_on_device == 0 and stats.steps > 0 and stats.kv_bytes_on_host == 0
        time.sleep(0.3)   # idle time counts while the wait is still going on
        assert process.stats().seconds_idle - stats.seconds_idle >= 0.25
    finally:
        process.stop()
    assert all(reason == FinishReason.LENGTH for _, reason in expected.values())
    assert not process.alive
    with pytest.raises(EngineUnavailable):
        process.submit(GenerateInput(request_id="late", prompt="Hi", max_new_tokens=2), lambda out: None)


def test_served_paged_layout_matches_hf_generate(tmp_path, tiny_model_dir):
    """`baton serve --kv-layout paged` (env BATON_KV_LAYOUT), with chunked prefill and the prefix
    cache on (env BATON_PREFILL_CHUNK_TOKENS, BATON_PREFIX_CACHE): the real server, through gRPC,
    gives HF generate's tokens for concurrent requests, reports pages in Prometheus and returns
    them; a three-turn conversation (each turn resends the history with the model's answer) is
    served from the cache on turns 2 and 3 (usage and metrics say so), with HF's tokens."""
    import torch

    from engine import model_loader
    from tests.conftest import hf_reference
    folder = tiny_model_dir("llama")
    server = start_server(tmp_path, "--model", folder, "--max-seq-len", "256", "--kv-page-size", "16",
                          env={"BATON_KV_LAYOUT": "paged", "BATON_PREFILL_CHUNK_TOKENS": "8",
                               "BATON_PREFIX_CACHE": "device+host"})
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    long_prompt = "Once upon a time, in a land far away, there lived a king. " * 4
    try:
        with BatonClient(server.target) as client:
            results: dict[str, list[int]] = {}

            def run(prompt: str) -> None:
                ids = []
                for message in client.generate(prompt, options=GenerationOptions(max_new_tokens=20, ignore_eos=True)):
                    ids.extend(message.token_ids)
                results[prompt] = ids
            threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            turns, history = [], long_prompt
            for user in ("", " And then?", " How did it end?"):
                history += user
                turns.append((history, client.complete(history, options=GenerationOptions(max_new_tokens=12,
                                                                                            ignore_eos=True))))
                history += turns[-1][1].text
        assert server.wait_metric("baton_kv_pages_used", 0) == 0
        assert server.metric("baton_kv_pages_free") == 4 * 256 // 16   # max_batch_size 4 x 256 tokens, pages of 16
        cached = [done.cached_prompt_tokens for _, done in turns]
        assert cached[0] == 0 and cached[1] >= 32 and cached[2] > cached[1]
        assert server.metric("baton_prefix_cache_hit_tokens_device_total") == sum(cached)
        assert server.metric("baton_prefix_cache_device_bytes") > 0
    finally:
        server.stop()
    hf_model, tokenizer, _ = model_loader.load(folder, torch.device("cpu"), torch.float32)
    for prompt in prompts:
        assert results[prompt] == hf_reference(hf_model, tokenizer(prompt)["input_ids"], 20, ()), prompt
    for prompt, done in turns:
        assert list(done.token_ids) == hf_reference(hf_model, tokenizer(prompt)["input_ids"], 12, ()), prompt
