"""Tensor parallelism on CPU (gloo, fp32): an engine sharded over 2 ranks gives the same greedy
tokens as the unsharded engine (TP 1) and as Hugging Face `generate` on each request alone,
through staggered arrivals, preemption (parking and restoring each rank's K/V shard) and
SUSPEND/RESUME; both K/V layouts, chunked prefill, the fused step with the packed prefill and
fused chunks, n completions, prefix-cache hits from both tiers, the Llama/Qwen2/Mistral families.

Each engine case starts one follower process (rank 1) and makes this process rank 0 of a gloo
group, for the length of the case. A real `baton serve --tensor-parallel 2` serves HF's tokens
through gRPC, and a killed rank ends every open stream UNAVAILABLE. The built-in model (TP 3, its
9 heads do not split in 2) is opt-in: BATON_TEST_TP_BUILTIN=1."""
from __future__ import annotations

import os

import pytest
import torch

from engine import model_loader
from engine.build import build_engine
from engine.config import EngineConfig
from engine.inputs import GenerateInput, Limits
from engine.request import PreemptAction, RequestState
from tests.conftest import CPU, check_stops_on_tokens, drive, hf_reference, make_engine

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "1, 2, 3,",
           "Why is the sky blue? Explain it to a child in two sentences.", "def fibonacci(n):"]

CASES = [("llama", dict(kv_layout="slab")),
         ("qwen2", dict(kv_layout="slab", prefill_chunk_tokens=8)),
         ("mistral", dict(kv_layout="paged", kv_page_size=16)),
         # the fused step on every rank (its own heads, an all-reduce after o and down); on
         # pages also the packed prefill, every rank writing its heads' K/V into the same pages, and
         # chunks on the fused kernels (the short prompt is prefilled whole, the others in chunks)
         ("qwen2", dict(kv_layout="paged", kv_page_size=16, fused_decode=True, prefill_chunk_tokens=8)),
         ("llama", dict(kv_layout="slab", fused_decode=True, prefill_chunk_tokens=8)),
         # CUDA's step order: decode before prefill, steady steps launch the next decode before
         # their events (its Decode goes to the followers then; pipelined, its ids follow it from
         # rank 0's draw by share_ids), commands drain it first
         ("llama", dict(kv_layout="paged", kv_page_size=16, fused_decode=True, decode_before_prefill=True,
                        overlap_decode=True))]
IDS = ["llama-slab", "qwen2-slab-chunked", "mistral-paged", "qwen2-paged-fused-chunked", "llama-slab-fused-chunked",
       "llama-paged-fused-overlap"]


def _scenario():
    """Staggered arrivals through two rows; the high-priority ones preempt the low ones, and
    low1 is suspended and resumed twice. -> (arrivals, on_step)."""
    low = [GenerateInput(request_id=f"low{i}", prompt=PROMPTS[i], max_new_tokens=20, ignore_eos=True)
           for i in range(2)]
    high = [GenerateInput(request_id=f"high{i}", prompt=PROMPTS[2 + i], max_new_tokens=6, priority=5,
                          ignore_eos=True) for i in range(2)]
    late = GenerateInput(request_id="late", prompt=PROMPTS[4], max_new_tokens=8, ignore_eos=True)

    suspended_at = []

    def poke(step, eng, out):   # suspend low1 twice while it runs (its row is parked), resume 3 steps later
        state = getattr(eng.scheduler.by_id.get("low1"), "state", None)
        if state == RequestState.SUSPENDED and \
                (step == suspended_at[-1] + 3 or not eng.has_work()):
            return eng.preempt("low1", PreemptAction.RESUME)[1]
        if step >= 6 and len(suspended_at) < 2 and state == RequestState.RUNNING \
                and (not suspended_at or step > suspended_at[-1] + 3):
            suspended_at.append(step)
            return eng.preempt("low1", PreemptAction.SUSPEND)[1]

    return {0: low, 4: [high[0]], 9: [high[1], late]}, poke


def _run(engine, limits):
    arrivals, poke = _scenario()
    outputs = drive(engine, limits, arrivals, on_step=poke)
    return arrivals, outputs


@pytest.mark.parametrize(("family", "layout"), CASES, ids=IDS)
def test_tp2_equals_tp1_and_hf(tiny_model_dir, family, layout):
    folder = tiny_model_dir(family)
    settings = dict(max_batch_size=2, max_seq_len=128, warmup=False, **layout)
    engine, info, tokenizer = build_engine(EngineConfig(model=folder, device="cpu", tensor_parallel=2, **settings))
    try:
        assert engine.shards is not None and "tensor parallel 2" in info.decode
        assert engine.slab.dims[1] == 1          # 2 kv heads over 2 ranks: one per rank
        # fused on pages: prompts are prefilled packed, straight into every rank's pages
        assert (engine.runner.packed is not None) == (layout.get("fused_decode", False) and
                                                       layout["kv_layout"] == "paged")
        if layout.get("fused_decode"):   # the fused step's LM head: each rank half of its rows, logits gathered
            head = engine.runner.fused.head_part
            assert head is not None and 2 * head.shape[0] == info.vocab_size
        limits = Limits(info.max_context_length, 256, 4096, info.vocab_size)
        arrivals, sharded = _run(engine, limits)
        stats = engine.stats()
        assert stats.preemptions >= 3 and stats.bytes_restored == stats.bytes_offloaded > 0
        assert len(engine.parked) == 0 and engine.slab.num_rows == 0
        if layout.get("prefill_chunk_tokens"):
            assert stats.prefill_chunks > 0
        assert (stats.overlapped_steps > 0) == bool(layout.get("overlap_decode"))
        # pipelined: those steps' ids went from rank 0's draw to the followers device to device
        assert (stats.pipelined_steps > 0) == bool(layout.get("overlap_decode"))
        if family == "llama" and not layout.get("fused_decode"):
            _dead_follower_ends_the_loop(engine, limits)
    finally:
        engine.close()
    loaded = model_loader.load(folder, CPU, torch.float32)   # unsharded
    single, single_limits = make_engine(loaded, **{k: v for k, v in settings.items() if k != "warmup"})
    _, unsharded = _run(single, single_limits)
    for inputs in arrivals.values():
        for inp in inputs:
            expected = hf_reference(loaded[0], tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            assert sharded[inp.request_id].token_ids == expected, f"{inp.request_id}: TP 2 differs from HF"
            assert unsharded[inp.request_id].token_ids == expected, f"{inp.request_id}: TP 1 differs from HF"
            assert sharded[inp.request_id].text == unsharded[inp.request_id].text
    states = {rid: [e.state.name for e in sharded[rid].events if e.state is not None] for rid in ("low0", "low1")}
    assert states["low1"].count("SUSPENDED") == 2               # each while it ran: its row was parked
    assert "PREEMPTED" in states["low0"] + states["low1"]       # and a priority arrival parked one


def test_tp2_pipelined_rows_stopping_on_a_token(tiny_model_dir):
    """TP 2 with the pipelined decode (each steady step's ids broadcast from rank 0's draw): a row
    that stops on a token has had one step too many on every rank, which rank 0 drops; every
    rank's pages stay in step (a late arrival takes the freed ones) and the tokens equal HF's."""
    folder = tiny_model_dir("llama")
    engine, info, _tokenizer = build_engine(EngineConfig(
        model=folder, device="cpu", tensor_parallel=2, max_batch_size=4, max_seq_len=128, warmup=False,
        kv_layout="paged", kv_page_size=16, fused_decode=True, overlap_decode=True))
    try:
        limits = Limits(info.max_context_length, 256, 4096, info.vocab_size)
        check_stops_on_tokens(model_loader.load(folder, CPU, torch.float32), engine, limits, PROMPTS[:5])
        assert engine.stats().pipelined_steps > 0
    finally:
        engine.close()


def _dead_follower_ends_the_loop(engine, limits):
    """The engine loop itself, a follower SIGKILLed: the step's all-reduce fails and the loop ends
    with ShardLost (not a failed batch it would carry on after); the follower is reaped and the
    process group left, so this process could start a new engine (the in-thread restart)."""
    import queue
    import signal

    import torch.distributed as dist
    from engine.inputs import build_request
    from engine.loop import Add, EngineLoop, QueueSource
    from engine.tensor_parallel import ShardLost
    [pid] = engine.shards.pids
    os.kill(pid, signal.SIGKILL)
    commands = queue.SimpleQueue()
    commands.put(Add(build_request(GenerateInput(request_id="doomed", prompt="Hi", max_new_tokens=5), engine.tokenizer,
                                   limits)))
    with pytest.raises(ShardLost, match="rank 1 exited"):
        EngineLoop(engine, QueueSource(commands), lambda event: None).run()
    assert not dist.is_initialized() and not os.path.exists(f"/proc/{pid}")


def _load_except_on_rank_1(folder: str):
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 cannot load its model")
    return model_loader.load(folder, CPU, torch.float32)


def test_a_follower_that_fails_to_load_fails_the_start(tiny_model_dir):
    """Rank 1's loader raises: build_engine raises at once naming the rank (no collective waits
    for it), its process is gone and this process left the group."""
    import functools

    import torch.distributed as dist
    loader = functools.partial(_load_except_on_rank_1, tiny_model_dir("llama"))
    config = EngineConfig(model=tiny_model_dir("llama"), device="cpu", tensor_parallel=2, warmup=False)
    with pytest.raises(RuntimeError, match=r"tensor-parallel start-up failed: rank 1 exited \(1\)"):
        build_engine(config, loader)
    assert not dist.is_initialized()


def test_config_refuses_what_tp_does_not_support(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel"):
        EngineConfig(tensor_parallel=0)


@pytest.mark.parametrize("layout", [dict(kv_layout="slab"),
                                    dict(kv_layout="paged", fused_decode=True, prefill_chunk_tokens=12),
                                    dict(kv_layout="paged", fused_decode=True, prefill_chunk_tokens=12,
                                         decode_before_prefill=True)],
                         ids=["slab", "paged-fused-chunked", "paged-fused-chunked-decode-first"])
def test_tp2_prefix_cache_hits_equal_hf(tiny_model_dir, layout):
    """The prefix cache under TP 2: every rank keeps its heads' blocks (the same slots, the same
    evictions to its host tier), rank 0 deciding the hits; tests/test_prefix_cache.py's
    conversations, with a device tier of 3 blocks so blocks go to host and back."""
    from tests.test_prefix_cache import block_bytes, three_conversations
    folder = tiny_model_dir("llama")
    loaded = model_loader.load(folder, CPU, torch.float32)
    spec = loaded[2]
    engine, info, _ = build_engine(EngineConfig(
        model=folder, device="cpu", tensor_parallel=2, max_batch_size=3, max_seq_len=256, warmup=False,
        kv_page_size=16, prefix_cache="device+host", prefix_cache_host_bytes=1 << 24,
        prefix_cache_device_bytes=3 * block_bytes(spec.num_layers, spec.num_kv_heads // 2, spec.head_dim), **layout))
    try:
        three_conversations(engine, Limits(info.max_context_length, 256, 4096, info.vocab_size), loaded,
                            host_tier=True)
    finally:
        engine.close()


def test_tp2_host_hits_held_for_their_copies_equal_hf(tiny_model_dir, monkeypatch):
    """Requests held while their host blocks come up (CUDA's copies in flight, simulated on rank
    0, tests/test_prefix_cache.py `_slow_link`) under TP 2: the followers' loads, readiness and
    bringing up follow rank 0's messages, and the tokens equal HF generate."""
    from tests.test_prefix_cache import _slow_link, block_bytes, three_conversations
    folder = tiny_model_dir("llama")
    loaded = model_loader.load(folder, CPU, torch.float32)
    spec = loaded[2]
    engine, info, _ = build_engine(EngineConfig(
        model=folder, device="cpu", tensor_parallel=2, max_batch_size=3, max_seq_len=256, warmup=False,
        kv_page_size=16, kv_layout="paged", fused_decode=True, prefix_cache="device+host",
        prefix_cache_host_bytes=1 << 24,
        prefix_cache_device_bytes=1 * block_bytes(spec.num_layers, spec.num_kv_heads // 2, spec.head_dim)))
    try:
        held = _slow_link(engine, monkeypatch)
        three_conversations(engine, Limits(info.max_context_length, 256, 4096, info.vocab_size), loaded,
                            host_tier=True)
        assert held and not engine._loading
    finally:
        engine.close()


def test_tp2_n_completions_from_packed_pages_equal_hf(tiny_model_dir):
    """n = 3 over the packed prefill at TP 2: each rank's prompt row is copied to the three
    completion rows (Embed from pages) and then dropped; every completion is HF's greedy text."""
    from tests.test_n_completions import PROMPT, _by_index, _tokens
    folder = tiny_model_dir("llama")
    engine, info, tokenizer = build_engine(EngineConfig(model=folder, device="cpu", tensor_parallel=2,
                                                        max_batch_size=4, max_seq_len=128, warmup=False,
                                                        kv_layout="paged", kv_page_size=16, fused_decode=True))
    try:
        assert engine.runner.packed is not None
        limits = Limits(info.max_context_length, 256, 4096, info.vocab_size)
        out = drive(engine, limits, {0: [GenerateInput(request_id="g", prompt=PROMPT, max_new_tokens=12,
                                                       ignore_eos=True, n=3)],
                                     2: [GenerateInput(request_id="h", prompt=PROMPT + " sunny", max_new_tokens=8,
                                                       ignore_eos=True)]})
        assert engine.slab.num_rows == 0 and engine.slab.num_pages_used == 0
    finally:
        engine.close()
    hf_model = model_loader.load(folder, CPU, torch.float32)[0]
    completions = _by_index(out["g"])
    expected = hf_reference(hf_model, tokenizer(PROMPT)["input_ids"], 12, ())
    assert sorted(completions) == [0, 1, 2] and all(_tokens(completions[i]) == expected for i in range(3))
    assert out["h"].token_ids == hf_reference(hf_model, tokenizer(PROMPT + " sunny")["input_ids"], 8, ())


# ---- the real server: `baton serve --tensor-parallel 2` on CPU ------------------------------------
@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, tiny_model_dir):
    from tests.conftest import start_server
    running = start_server(tmp_path_factory.mktemp("tp-server"), "--model", tiny_model_dir("llama"),
                           "--device", "cpu", "--tensor-parallel", "2", "--max-seq-len", "128",
                           "--engine-restart-backoff-seconds", "3")   # the second death's 6 s: teardown meets a backoff
    yield running
    running.stop()


def _follower_pids(server) -> list[int]:
    import json
    return [json.loads(line)["pid"] for line in server.log_path.read_text().splitlines()
            if '"tp_follower_started"' in line]


def test_served_with_tp2_equals_hf(tp_server, tiny_model_dir):
    """Concurrent streams through gRPC on a TP 2 server: each gets what HF generate gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    from baton_client import BatonClient, GenerationOptions
    hf_model, tokenizer, _ = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    jobs = [(prompt, n) for prompt, n in zip(PROMPTS, (12, 20, 7, 16, 9))]
    with BatonClient(tp_server.target) as client, ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(lambda job: client.complete(
            job[0], options=GenerationOptions(max_new_tokens=job[1], ignore_eos=True)), jobs))
    import json
    [ready] = [json.loads(line) for line in tp_server.log_path.read_text().splitlines() if '"engine_ready"' in line]
    assert ready["decode"].endswith("tensor parallel 2")
    for (prompt, n), completion in zip(jobs, done):
        assert completion.token_ids == hf_reference(hf_model, tokenizer(prompt)["input_ids"], n, ()), prompt
        assert completion.finish_reason == "LENGTH"


def test_a_dead_rank_ends_every_stream_unavailable(tp_server):
    """SIGKILL rank 1 while streams run: every open stream ends UNAVAILABLE (none hangs), then
    the server restarts the engine with a new follower and serves again."""
    import signal
    import threading
    import time

    import grpc
    from baton_client import BatonClient, GenerationOptions
    [follower] = _follower_pids(tp_server)
    results, first_token = {}, threading.Event()

    def stream(i: int) -> None:
        with BatonClient(tp_server.target) as client:
            try:
                for msg in client.generate(f"{i}: count to a thousand:", options=GenerationOptions(
                        max_new_tokens=100, ignore_eos=True)):
                    if msg.token_ids:
                        first_token.set()
                results[i] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                results[i] = exc.code()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert first_token.wait(60)
    os.kill(follower, signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a stream hangs after a rank died"
    assert results == {i: grpc.StatusCode.UNAVAILABLE for i in range(3)}
    deadline = time.monotonic() + 120
    while tp_server.log_path.read_text().count('"engine_ready"') < 2:
        assert time.monotonic() < deadline and tp_server.proc.poll() is None, "the engine was not restarted"
        time.sleep(0.2)
    with BatonClient(tp_server.target) as client:
        while client.health() != "SERVING":
            assert time.monotonic() < deadline, "not SERVING again after the restart"
            time.sleep(0.2)
        again = client.complete("Hi", options=GenerationOptions(max_new_tokens=3, ignore_eos=True))
    assert again.finish_reason == "LENGTH" and len(again.token_ids) == 3
    pids = _follower_pids(tp_server)
    assert len(pids) == 2 and pids[1] != follower
    assert not os.path.exists(f"/proc/{follower}")      # the dead rank was reaped
    # rank 0 killed: its follower sees the pipe close (or its collective fail) and exits, no orphan
    import json
    engine_pid = [json.loads(line)["engine_pid"] for line in tp_server.log_path.read_text().splitlines()
                  if '"engine_ready"' in line][-1]
    os.kill(engine_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _alive(pids[1]):
        assert time.monotonic() < deadline, "the follower outlived rank 0"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_heads_that_do_not_divide_are_refused_naming_the_flag(smollm2):
    """The built-in SmolLM2 has 9 attention heads and 3 kv heads: TP 2 cannot split them."""
    from types import SimpleNamespace

    from engine.tensor_parallel import shard_model
    with pytest.raises(ValueError, match=r"tensor_parallel: 2 does not divide the model's 9 attention heads"):
        shard_model(smollm2[0], SimpleNamespace(size=lambda: 2))   # refused before any collective


def test_flag_and_env(monkeypatch):
    from service.cli import build_parser
    assert build_parser().parse_args(["serve"]).tensor_parallel == 1
    assert build_parser().parse_args(["serve", "--tensor-parallel", "4"]).tensor_parallel == 4
    monkeypatch.setenv("BATON_TENSOR_PARALLEL", "2")
    assert build_parser().parse_args(["serve"]).tensor_parallel == 2
    assert build_parser().parse_args(["serve"]).tp_allreduce == "auto"
    monkeypatch.setenv("BATON_TP_ALLREDUCE", "one-shot")
    assert build_parser().parse_args(["serve"]).tp_allreduce == "one-shot"


def test_allreduce_choice():
    """The one-shot all-reduce and the fused all-reduce + add + RMSNorm are CUDA's (symmetric
    memory); on CPU every choice sums through c10d (gloo) and the fused kernel is not built; "auto"
    is the fused kernel on CUDA in bf16 only; an unknown choice is refused naming the setting. (On
    2 GPUs the one-shot's sums equal NCCL's and the fused kernel's outputs NCCL + liger's, bit for
    bit: benchmarks/probe_allreduce*.py; tp_bench's tpN, tpN-one-shot and tpN-fused give the same
    tokens: docs/benchmarks.md notes 30, 32.)"""
    from types import SimpleNamespace

    from engine.tensor_parallel import fused_all_reduce_norm, resolve_allreduce, sum_over_ranks
    for choice in ("nccl", "one-shot", "fused"):
        assert sum_over_ranks(None, "cpu", torch.float32, choice).kind == "nccl"
    assert fused_all_reduce_norm(SimpleNamespace(device_type="cpu"), 64, torch.float32, 8) is None
    assert resolve_allreduce("auto", "cuda", torch.bfloat16) == "fused"
    assert [resolve_allreduce("auto", d, t) for d, t in (("cuda", torch.float32), ("cpu", torch.bfloat16))] == ["nccl"] * 2
    assert resolve_allreduce("one-shot", "cuda", torch.bfloat16) == "one-shot"
    with pytest.raises(ValueError, match="tp_allreduce must be one of"):
        sum_over_ranks(None, "cuda", torch.bfloat16, "auto")
    with pytest.raises(ValueError, match="tp_allreduce must be one of"):
        EngineConfig(device="cpu", tp_allreduce="fast")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BATON_TEST_TP_BUILTIN") != "1",
                    reason="three ranks of the built-in model: ~2.5 min on 2 cores; set BATON_TEST_TP_BUILTIN=1")
def test_builtin_model_tp3_equals_hf(smollm2):
    """The built-in SmolLM2 (9 heads, 3 kv heads) over 3 ranks: one kv head each."""
    engine, info, tokenizer = build_engine(EngineConfig(device="cpu", tensor_parallel=3, max_batch_size=2,
                                                        max_seq_len=256, warmup=False))
    try:
        assert engine.slab.dims[1] == 1
        limits = Limits(info.max_context_length, 256, 4096, info.vocab_size)
        arrivals = {0: [GenerateInput(request_id="a", prompt=PROMPTS[0], max_new_tokens=10)],
                    2: [GenerateInput(request_id="b", prompt=PROMPTS[2], max_new_tokens=10)]}
        outputs = drive(engine, limits, arrivals)
    finally:
        engine.close()
    hf_model, _, spec = smollm2
    for inp in arrivals[0] + arrivals[2]:
        expected = hf_reference(hf_model, tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, spec.eos_token_ids)
        assert outputs[inp.request_id].token_ids == expected, inp.request_id


def test_watch_ranks_acts_only_when_rank0_misses_a_dead_follower():
    """On CUDA a collective with a dead peer may never return, so a thread watches the followers:
    a follower's death that rank 0 has not handled within the grace ends the engine process
    (here: the callback records it); one rank 0 handles in time (it closes) is left to it."""
    import multiprocessing
    import threading
    import time

    from engine.tensor_parallel import watch_ranks
    ctx = multiprocessing.get_context("spawn")
    for handled in (False, True):
        procs = [ctx.Process(target=time.sleep, args=(60,), name=f"rank{i}", daemon=True) for i in (1, 2)]
        for p in procs:
            p.start()
        closed, calls = threading.Event(), []
        watcher = threading.Thread(target=watch_ranks, args=(procs, closed.is_set, 1.0, calls.append))
        watcher.start()
        time.sleep(0.3)
        assert watcher.is_alive() and not calls          # nobody died: it waits
        procs[1].kill()
        if handled:
            time.sleep(0.3)
            closed.set()                                  # rank 0 noticed (ShardLost) and closed
        watcher.join(10)
        assert not watcher.is_alive()
        assert calls == ([] if handled else [f"rank2 exited ({procs[1].exitcode})"])
        procs[0].kill()

