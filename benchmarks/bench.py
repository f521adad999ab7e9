"""`baton bench`: the engine and its peers on the same requests, in one process and one run.

  python -m benchmarks.bench --preset llama2-7b --runs engine,engine-eager,hf-static,hf-cb,floor
Writes benchmarks/results/<name>.json (device, versions, every figure, the command).
Presets build random-weight models in-process (the GPU machine cannot fetch weights).

A run is a list of named stages (`--runs`, run in the order given); `STAGES` at the end of this
file maps each name to a function that gets the run's `Bench` context and returns its figures,
merged into the result under the keys docs/benchmarks.md cites. On CUDA each stage (and each
rate of a per-rate stage, each floor variant) runs in a child process of its own.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import itertools
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import workloads
from benchmarks.api_cost import stage_api
from benchmarks.workloads import BenchRequest
from engine.config import EngineConfig

PRESETS = {
    # Llama-2-7B shape
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # Llama-2-70B shape (tensor parallel: benchmarks/tp_bench.py --lazy builds it on the meta device)
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    # a CPU smoke model; its context covers W4's 4,096 tokens
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096),
}


# Engine settings W4 runs side by side, each flag a comma list of its values (auto = None, the
# engine's own choice; 1; 0): bench flag -> (EngineConfig field, default, {value: the W4 result
# key's tag}, what it does)
SWITCHES = {
    "decode-first": ("decode_before_prefill", "auto", {None: "", True: "_decodefirst", False: "_prefillfirst"},
                     "a step launches its decode before its prefill; auto: on for CUDA; 0: prefill, then decode"),
    "prefill-graphs": ("prefill_graphs", "auto", {None: "", True: "_prefillgraphs", False: "_noprefillgraphs"},
                       "whole-prompt prefill forwards replay CUDA graphs; auto: on for CUDA; "
                       "w3-paired takes the first"),
    "overlap-decode": ("overlap_decode", "auto", {None: "", True: "_overlap", False: "_nooverlap"},
                       "a steady step launches the next decode before its events; auto: on for CUDA"),
    "pipeline-decode": ("pipeline_decode", "1", {True: "", False: "_nopipeline"},
                        "with overlap-decode, the next decode launched from the sampled ids on the device, "
                        "before the host reads them"),
    "decode-sort": ("decode_sort_rows", "1", {True: "", False: "_rowordered"},
                    "paged decode runs rows longest first; decode-chat runs both"),
    "fused-add-norm": ("fused_add_norm", "auto", {None: "", True: "_ligernorms", False: "_torchnorms"},
                       "the fused step's RMSNorms (and adds outside GEMMs) as liger's kernels; auto: on for CUDA"),
    "fused-epilogues": ("fused_epilogues", "1", {True: "", False: "_plainepilogues"},
                        "RMSNorm scales and residual adds inside their kernels; decode-chat runs both"),
}


def build_preset(name: str, device: torch.device, dtype: torch.dtype, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{**PRESETS[name], **overrides}, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def load_model(preset: str | None, model: str | None, tokenizer_folder: str | None, device: torch.device,
               dtype: torch.dtype, shard: int = 1):
    """-> (model, tokenizer, spec): a preset with random weights, or a local/built-in model. Module
    level, so functools.partial of it can be sent to an engine process (run_grpc). On the "meta"
    device a preset costs nothing: for its spec alone. `shard` N: the preset cut to what one rank
    of N holds under tensor parallelism (1/N of the heads, kv heads and MLP width; the same hidden
    size, embeddings and LM head), a model of its own: one GPU's share of the work, no collectives."""
    from engine import model_loader
    if not preset:
        return model_loader.load(model, device, dtype)
    from transformers import AutoTokenizer
    if tokenizer_folder:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    else:
        folder, gguf = model_loader.builtin_model_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    # The vocabulary must cover the tokenizer's ids (the gRPC path sends text): 49,152 for the
    # built-in tokenizer instead of Llama-2's 32,000 (+0.28 GB of weights, counted in the floor).
    shape = PRESETS[preset]
    cut = {} if shard == 1 else dict(
        num_attention_heads=shape["num_attention_heads"] // shard, num_key_value_heads=shape["num_key_value_heads"] // shard,
        intermediate_size=shape["intermediate_size"] // shard, head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    hf_model = build_preset(preset, device, dtype, vocab_size=max(shape["vocab_size"], len(tokenizer)), **cut)
    spec = model_loader.spec_of(hf_model, tokenizer, preset)
    return hf_model, tokenizer, type(spec)(**{**spec.__dict__, "eos_token_ids": ()})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _free(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the engine, in process --------------------------------------------------------------------
def run_engine(model, tokenizer, spec, reqs: list[BenchRequest], *, cuda_graphs: bool, max_batch: int,
               max_seq_len: int, label: str, host_budget: int = 64 << 30,
               slo: tuple[float, float] | None = None, fused: bool | None = None, kv_layout: str = "slab",
               bandwidth: float | None = None, **engine_kw) -> dict:
    """Run `reqs` (at their arrival times) through an engine built around `model`. With
    `bandwidth` (device copy bytes/s), each decode step is also compared with its own floor:
    (weights + the K/V bytes its rows really hold) / bandwidth. `engine_kw`: more EngineConfig
    fields (they override the ones set here)."""
    from engine.build import assemble_engine
    from engine.config import EngineConfig

    config = EngineConfig(**{**dict(max_batch_size=max_batch, max_seq_len=max_seq_len, warmup=False,
                                    cuda_graphs=cuda_graphs, max_prefill_tokens=32768, host_kv_budget_bytes=host_budget,
                                    aging_seconds=0, fused_decode=fused, kv_layout=kv_layout), **engine_kw})
    engine, info = assemble_engine(model, tokenizer, spec, config)
    device = model.device
    # warm-up, with the first request's sampling (a grammar compiles, a logprobs path runs once);
    # its step and copy counts are left out of the figures below
    _drive(engine, [BenchRequest([5] * 16, 4, sampling=reqs[0].sampling if reqs else {})], None, device)
    sync(device)
    before = engine.stats()
    stats, decodes = _drive(engine, reqs, tqdm(total=sum(r.max_new_tokens * r.n for r in reqs), desc=label,
                                               unit="tok", file=sys.stderr, mininterval=2), device, slo)
    after = engine.stats()

    def delta(name: str):
        return getattr(after, name) - getattr(before, name)

    offload_s, restore_s = delta("seconds_offload"), delta("seconds_restore")
    stats.update(max_batch_size=info.max_batch_size, max_seq_len=info.max_context_length, cuda_graphs=cuda_graphs,
                 decode=info.decode, graphs_captured=info.decode_graphs,
                 bytes_offloaded=delta("bytes_offloaded"), bytes_restored=delta("bytes_restored"),
                 preemptions=delta("preemptions"), prefill_tokens=delta("prefill_tokens"),
                 seconds_prefill=delta("seconds_prefill"),
                 seconds_decode=delta("seconds_decode"), slab_relocations=delta("kv_relocations"),
                 overlapped_steps=delta("overlapped_steps"), pipelined_steps=delta("pipelined_steps"),
                 offload_GBps=delta("bytes_offloaded") / offload_s / 1e9 if offload_s else None,
                 restore_GBps=delta("bytes_restored") / restore_s / 1e9 if restore_s else None)
    stats.update(decode_step_figures(decodes, weights_bytes(model), bandwidth))
    engine.close()
    del engine
    _free(device)
    return stats


def decode_step_figures(decodes: list[tuple[float, int, int]], weights: int, bandwidth: float | None) -> dict:
    """Decode steps of a run, each (seconds, rows, K/V bytes of those rows); with `bandwidth`, the
    ratio of each step to its floor, (weights + K/V bytes) / bandwidth."""
    seconds = [d[0] for d in decodes]
    # steps with the most rows the run had: equal batches across runs whose rows end at different times
    peak = max((d[1] for d in decodes), default=0)
    at_peak = [d[0] for d in decodes if d[1] == peak]
    out = {"decode_steps": len(decodes), "decode_step_p50_ms": 1000 * pct(seconds, 50),
           "decode_step_p99_ms": 1000 * pct(seconds, 99), "decode_rows_p50": pct([d[1] for d in decodes], 50),
           "decode_kv_bytes_p50": pct([d[2] for d in decodes], 50), "decode_peak_rows": peak,
           "decode_steps_at_peak_rows": len(at_peak), "decode_step_at_peak_rows_p50_ms": 1000 * pct(at_peak, 50)}
    if bandwidth:
        floors = [(weights + kv) / bandwidth for _s, _rows, kv in decodes]
        out.update(copy_bandwidth_Bps=bandwidth, weights_bytes=weights, real_floor_p50_ms=1000 * pct(floors, 50),
                   decode_step_vs_real_floor_p50=pct([s / f for (s, _r, _k), f in zip(decodes, floors)], 50))
    return out


def _drive(engine, reqs: list[BenchRequest], bar, device,
           slo: tuple[float, float] | None = None) -> tuple[dict, list[tuple[float, int, int]]]:
    """Feed `reqs` at their arrival times and step the engine until every one has finished. Each
    phase's tokens are timestamped when the phase ends (a prefill group's first tokens before the
    step's decode, as the served path streams them). A request of n completions has one record
    (one stream of token times) per completion. -> (summary, one (seconds, rows, K/V bytes)
    per decode phase: its duration and the rows and real K/V bytes it read)."""
    from engine.request import Request, SamplingParams
    records: dict[int | tuple[int, int], dict] = {}
    by_id: dict[tuple[str, int], dict] = {}
    finish_reasons: collections.Counter[str] = collections.Counter()
    pending = collections.deque(sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s))
    start = time.monotonic()
    step_times: list[float] = []
    decodes: list[tuple[float, int, int]] = []
    prefills: list[tuple[int, float]] = []   # per step with prefill work: (its prompt tokens, the step's ms)
    peak_rows = 0

    def deliver(events, now: float, step_prefill: int) -> None:
        for out in events:
            rec = by_id[out.request_id, out.index]
            if out.token_ids:
                rec["times"].extend([now] * len(out.token_ids))
                rec["ids"].extend(out.token_ids)
                rec["step_prefill"].extend([step_prefill] * len(out.token_ids))
                if bar is not None:
                    bar.update(len(out.token_ids))
            if out.completion_finished:
                rec["done"] = now
                rec["tokens"] = out.completion_tokens
                finish_reasons[out.finish_reason.name] += 1

    while pending or engine.has_work():
        now = time.monotonic() - start
        while pending and reqs[pending[0]].arrival_s <= now:
            i = pending.popleft()
            r = reqs[i]
            for k in range(r.n):
                records[i if r.n == 1 else (i, k)] = by_id[f"b{i}", k] = {
                    "arrival": start + r.arrival_s, "times": [], "ids": [], "step_prefill": [], "priority": r.priority}
            params = SamplingParams(**{"max_new_tokens": r.max_new_tokens, "ignore_eos": True, **r.sampling})
            engine.add_request(Request(f"b{i}", list(r.prompt_ids), params, priority=r.priority, n=r.n))
        if engine.has_work():
            before = engine.stats()
            t0 = mark = time.monotonic()
            step_prefill = 0   # prompt tokens this step has run so far (its prefill comes before its decode)
            for events in engine.step_phases():
                ended = time.monotonic()
                after = engine.stats()
                step_prefill += after.prefill_tokens - before.prefill_tokens
                deliver(events, ended, step_prefill)
                if after.seconds_decode > before.seconds_decode:   # this phase was the decode
                    decodes.append((ended - mark, before.rows_on_device, before.kv_bytes_on_device))
                peak_rows = max(peak_rows, after.rows_on_device)
                before = after
                mark = time.monotonic()
            step_times.append(time.monotonic() - t0)
            if step_prefill:
                prefills.append((step_prefill, round(1000 * step_times[-1], 2)))
        elif pending:
            time.sleep(min(0.005, max(0.0, reqs[pending[0]].arrival_s - now)))
    sync(device)
    wall = time.monotonic() - start
    if bar is not None:
        bar.close()
    # every completion's tokens in request order, hashed: two variants that must agree (e.g. two
    # all-reduce kinds, benchmarks/tp_bench.py) compare this
    digest = hashlib.sha256(json.dumps([records[k]["ids"] for k in sorted(records, key=str)]).encode()).hexdigest()
    return {**summarize(records, wall, step_times, slo), "peak_rows_on_device": peak_rows,
            "finish_reasons": dict(finish_reasons), "tokens_sha256": digest,
            "prefill_steps": {"count": len(prefills), "first_tokens_ms": prefills[:8]}}, decodes


def summarize(records: dict, wall: float, step_times: list[float], slo: tuple[float, float] | None = None) -> dict:
    """`slo` = (TTFT seconds, TPOT seconds): adds goodput, the requests meeting both (a request
    with one token has no TPOT and needs only the TTFT) and their tokens per second of the run."""
    tokens = sum(r["tokens"] for r in records.values())
    ttft = [r["times"][0] - r["arrival"] for r in records.values() if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in records.values() if len(r["times"]) > 1]
    itl = [b - a for r in records.values() for a, b in zip(r["times"], r["times"][1:])]
    out = {"wall_s": wall, "useful_tokens": tokens, "tok_per_s": tokens / wall, "requests": len(records),
           "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
           "tpot_p99_s": pct(tpot, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
           "steps": len(step_times), "step_p50_ms": 1000 * pct(step_times, 50)}
    # Queue growth, direct: the TTFT of the last quarter of arrivals against the first quarter's
    # (about 1 when the engine keeps up; delivered/offered also counts the drain after the last
    # arrival, so it reads below 1 even then)
    by_arrival = sorted((r for r in records.values() if r["times"]), key=lambda r: r["arrival"])
    quarter = len(by_arrival) // 4
    if quarter:
        first = pct([r["times"][0] - r["arrival"] for r in by_arrival[:quarter]], 50)
        last = pct([r["times"][0] - r["arrival"] for r in by_arrival[-quarter:]], 50)
        out.update(ttft_p50_first_quarter_s=first, ttft_p50_last_quarter_s=last,
                   ttft_growth=last / first if first > 0 else float("nan"))
    out.update(itl_by_step_prefill(records))
    out.update(late_delivery(records))
    by_prio: dict[int, list[float]] = {}
    for r in records.values():
        if r["times"]:
            by_prio.setdefault(r["priority"], []).append(r["times"][0] - r["arrival"])
    if len(by_prio) > 1:
        out["ttft_by_priority"] = {str(p): {"p50_s": pct(v, 50), "p99_s": pct(v, 99), "n": len(v)}
                                   for p, v in sorted(by_prio.items())}
        low = [r for r in records.values() if r["priority"] == min(by_prio)]
        out["low_priority_tok_per_s"] = sum(r["tokens"] for r in low) / (max(r["done"] for r in low) - min(r["arrival"] for r in low))
    if by_prio:
        # what ends the lowest priority's work (W3's ratio is set by its last rows): the last three
        # to finish, each with its tokens, first token and end (seconds from that priority's first
        # arrival) and its longest gap between two tokens (a park, or a step with a long prefill)
        low = [r for r in records.values() if r["priority"] == min(by_prio) and r["times"]]
        t0 = min(r["arrival"] for r in low)
        out["lowest_priority_last"] = [
            {"tokens": r["tokens"], "first_token_s": round(r["times"][0] - t0, 3), "done_s": round(r["done"] - t0, 3),
             "longest_gap_s": round(max((b - a for a, b in zip(r["times"], r["times"][1:])), default=0.0), 3)}
            for r in sorted(low, key=lambda r: r["done"])[-3:]]
    if slo is not None:
        slo_ttft, slo_tpot = slo
        good = [r for r in records.values() if r["times"] and r["times"][0] - r["arrival"] <= slo_ttft and
                (len(r["times"]) < 2 or (r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) <= slo_tpot)]
        out.update(slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot,
                   goodput_requests_fraction=len(good) / len(records) if records else float("nan"),
                   goodput_tok_per_s=sum(r["tokens"] for r in good) / wall)
    return out


# the prefill forward sizes an interval between two tokens is split by: none, one that fits the
# prefill graphs' largest bucket (1,280 tokens: replayed), and larger (eager)
ITL_PREFILL_BINS = (("none", 0, 0), ("graphed", 1, 1280), ("eager", 1281, 1 << 40))


def itl_by_step_prefill(records: dict) -> dict:
    """What sets the ITL tail (issue 13): each interval between two tokens of a stream, by the
    prompt tokens the step that ended it ran before its decode (records from `_drive`, which tags
    each token with them; none elsewhere). -> per bin: its share of the intervals and its ITL
    p50 / p99."""
    tagged = [(b - a, k) for r in records.values() if len(r.get("step_prefill", ())) == len(r["times"])
              for a, b, k in zip(r["times"], r["times"][1:], r["step_prefill"][1:])]
    if not tagged:
        return {}
    out = {}
    for name, lo, hi in ITL_PREFILL_BINS:
        gaps = [g for g, k in tagged if lo <= k <= hi]
        out[f"itl_prefill_{name}"] = {"share": len(gaps) / len(tagged), "p50_s": pct(gaps, 50) if gaps else None,
                                      "p99_s": pct(gaps, 99) if gaps else None}
    return out


# ---- the full gRPC path: the server here, clients streaming over loopback from another process ---
def run_grpc(reqs: list[BenchRequest], *, load, transport: str, max_batch: int, max_seq_len: int,
             fused: bool | None = None, slo: tuple[float, float] | None = None, kv_layout: str = "slab",
             **engine_kw) -> dict:
    """`transport` "process": the engine loop in its own process, as `baton serve` runs it (`load`,
    a picklable () -> (model, tokenizer, spec), builds the model there); "thread": the engine loop
    as a thread of this process on `load()`'s model (`baton serve --engine-in-thread`). The client
    streams run in a child process (benchmarks.grpc_load), so they compete with neither."""
    import asyncio
    import os
    import subprocess
    import tempfile

    from engine.api import EngineClient
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    from engine.process import EngineProcess
    from service.server import BatonServer, ServerConfig

    config = EngineConfig(**{**dict(max_batch_size=max_batch, max_seq_len=max_seq_len, warmup=True,
                                    max_prefill_tokens=32768, aging_seconds=0, max_new_tokens_limit=max_seq_len,
                                    fused_decode=fused, kv_layout=kv_layout), **engine_kw})
    engine = None
    if transport == "thread":
        model, tokenizer, spec = load()
        engine, info = assemble_engine(model, tokenizer, spec, config)
        client = EngineClient(config, prebuilt=(engine, info, tokenizer))
    else:
        client = EngineProcess(config, loader=load)
    server_loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def start() -> None:
        # grpc.aio objects belong to the loop they are made on: build the server inside it
        holder["server"] = BatonServer(ServerConfig(port=0, max_message_bytes=64 << 20), config, engine=client)
        await holder["server"].start()

    def serve() -> None:
        asyncio.set_event_loop(server_loop)
        try:
            server_loop.run_until_complete(start())
        finally:
            ready.set()
        server_loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    if not ready.wait(1800) or "server" not in holder or not client.ready:
        client.stop()
        raise RuntimeError("gRPC server did not start")
    server = holder["server"]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    # `baton.v1` lives in clients/python (the editable install maps it there; say so explicitly)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "clients" / "python"),
                                         *filter(None, [env.get("PYTHONPATH")])])
    before = _idle_stats(client)
    rows = _PeakRows(client)
    try:
        with tempfile.TemporaryDirectory(prefix="baton-grpc-load-") as tmp:
            workload, out = Path(tmp) / "workload.json", Path(tmp) / "records.json"
            workload.write_text(json.dumps([{"text": r.text, "max_new_tokens": r.max_new_tokens,
                                             "arrival_s": r.arrival_s, "priority": r.priority} for r in reqs]))
            rows.start()
            code = subprocess.call([sys.executable, "-m", "benchmarks.grpc_load", "--port", str(server.port),
                                    "--workload", str(workload), "--out", str(out)], env=env, cwd=root)
            rows.stop()
            if code != 0:
                raise RuntimeError(f"gRPC load client exited with {code}")
            result = json.loads(out.read_text())
        # where the engine loop's time went meanwhile (GPU-synchronised, as in run_engine)
        after = _idle_stats(client)
        engine_side = {"seconds_prefill": after.seconds_prefill - before.seconds_prefill,
                       "seconds_decode": after.seconds_decode - before.seconds_decode,
                       "seconds_idle": after.seconds_idle - before.seconds_idle,
                       "engine_steps": after.steps - before.steps,
                       "preemptions": after.preemptions - before.preemptions,
                       "peak_rows_on_device": rows.peak,
                       "peak_rows_note": f"the handle's stats polled every {1000 * rows.every:g} ms"}
    finally:
        rows.stop()
        asyncio.run_coroutine_threadsafe(server.stop(), server_loop).result(120)
        server_loop.call_soon_threadsafe(server_loop.stop)
        if engine is not None:
            engine.close()
            _free(engine.runner.device)
    records = {int(i): rec for i, rec in result["records"].items()}
    unfinished = [i for i in range(len(reqs)) if i not in records or "done" not in records[i]]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} gRPC streams did not finish: {unfinished[:10]}")
    server_ttft = [r["server_ttft"] for r in records.values()]
    server_queued = [r["server_queued"] for r in records.values()]
    return {**summarize(records, result["wall_s"], [], slo), "client": "separate process",
            "engine_loop": transport, **engine_side,
            "server_ttft_p50_s": pct(server_ttft, 50), "server_ttft_p99_s": pct(server_ttft, 99),
            "server_queued_p50_s": pct(server_queued, 50), "server_queued_p99_s": pct(server_queued, 99)}


def _idle_stats(client):
    """The engine's stats once it has gone idle (an engine process reports them as it does)."""
    deadline = time.monotonic() + 5
    stats = client.stats()
    while (stats.rows_on_device or stats.requests_waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = client.stats()
    return stats


class _PeakRows(threading.Thread):
    """The most rows on the device seen in an engine handle's stats, polled every `every` s (the
    loop reports them whenever rows come or go, so a poll sees the latest change)."""

    def __init__(self, client, every: float = 0.05) -> None:
        super().__init__(name="bench-peak-rows", daemon=True)
        self.client, self.every, self.peak = client, every, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak = max(self.peak, self.client.stats().rows_on_device)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()


# ---- peers ---------------------------------------------------------------------------------------
def run_hf_static(model, reqs: list[BenchRequest], batch: int = 32) -> dict:
    """HF generate, static batches of `batch` in arrival order, left padding, run to completion."""
    device = model.device
    start = time.monotonic()
    generated = 0
    for i in tqdm(range(0, len(reqs), batch), desc="hf-static", file=sys.stderr):
        group = reqs[i:i + batch]
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):
            ids[j, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, longest - len(r.prompt_ids):] = 1
        n = max(r.max_new_tokens for r in group)
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        generated += (out.shape[1] - longest) * len(group)
    sync(device)
    wall = time.monotonic() - start
    useful = sum(r.max_new_tokens for r in reqs)
    return {"wall_s": wall, "useful_tokens": useful, "tok_per_s": useful / wall, "generated_tokens": generated}


def run_hf_cb(model, reqs: list[BenchRequest]) -> dict:
    """HF continuous batching (paged cache). generate_batch takes one max_new_tokens for all, so
    every request runs to the longest; useful tokens count each request's own length."""
    from transformers import GenerationConfig
    device = model.device
    n = max(r.max_new_tokens for r in reqs)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0,
                           use_cuda_graph=False)
    start = time.monotonic()
    with torch.no_grad():  # not inference_mode: HF's CB manager edits its tensors outside it
        out = model.generate_batch(inputs=[r.prompt_ids for r in reqs], generation_config=cfg, progress_bar=True)
    sync(device)
    wall = time.monotonic() - start
    generated = sum(len(v.generated_tokens) for v in out.values())
    if generated < sum(r.max_new_tokens for r in reqs):
        raise RuntimeError(f"HF continuous batching generated only {generated} tokens")
    useful = sum(r.max_new_tokens for r in reqs)
    return {"wall_s": wall, "useful_tokens": useful, "tok_per_s": useful / wall, "generated_tokens": generated,
            "generated_tok_per_s": generated / wall, "max_new_tokens_all": n}


def run_hf_cb_arrivals(model, reqs: list[BenchRequest], *, max_batch: int, slo: tuple[float, float] | None = None,
                       label: str = "hf-cb") -> dict:
    """HF continuous batching in its serving form: one manager (`init_continuous_batching`), each
    request added at its arrival time with its own max_new_tokens, CUDA graphs on (on CUDA), at
    most `max_batch` requests per batch (Baton's row limit). Token times are the manager's own
    per-token timestamps (`record_timestamps`). Its scheduler is FIFO: priorities are ignored."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    device = model.device
    on_cuda = device.type == "cuda"
    gen = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in reqs), do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    cb = ContinuousBatchingConfig(use_cuda_graph=on_cuda, max_requests_per_batch=max_batch)
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in reqs),
                          max_generated_length=max(r.max_new_tokens for r in reqs), num_requests=len(reqs))
    records: dict[int, dict] = {}
    by_id: dict[str, dict] = {}
    bar = None
    with torch.no_grad():  # not inference_mode: HF's CB manager edits its tensors outside it
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb,
                                                 workload_hints=hints)
        try:
            attention = model.config._attn_implementation
            manager.warmup()
            manager.start()
            bar = tqdm(total=len(reqs), desc=label, unit="req", file=sys.stderr, mininterval=2)
            pending = collections.deque(sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s))
            start = time.perf_counter()    # the clock of HF's token timestamps
            finished = 0
            while finished < len(reqs):
                now = time.perf_counter() - start
                while pending and reqs[pending[0]].arrival_s <= now:
                    i = pending.popleft()
                    r = reqs[i]
                    records[i] = by_id[f"w{i}"] = {"arrival": time.perf_counter(), "times": [],
                                                   "priority": r.priority}
                    manager.add_request(list(r.prompt_ids), request_id=f"w{i}", max_new_tokens=r.max_new_tokens,
                                        eos_token_id=-1, record_timestamps=True)
                wait = min(0.005, max(0.0, reqs[pending[0]].arrival_s - now)) if pending else 0.1
                out = manager.get_result(timeout=wait)
                if out is None:
                    if not manager.is_running():
                        raise RuntimeError("HF continuous batching: its generation thread stopped")
                    continue
                if not out.is_finished():
                    continue
                if out.error:
                    raise RuntimeError(f"HF continuous batching, request {out.request_id}: {out.error}")
                rec = by_id[out.request_id]
                rec["times"] = list(out.timestamps or [])
                rec["tokens"] = len(out.generated_tokens)
                rec["done"] = rec["times"][-1] if rec["times"] else time.perf_counter()
                finished += 1
                bar.update(1)
            sync(device)
            wall = time.perf_counter() - start
        finally:
            if bar is not None:
                bar.close()
            manager.stop(block=True, timeout=60)
            manager.destroy()
    wanted = sum(r.max_new_tokens for r in reqs)
    got = sum(r["tokens"] for r in records.values())
    if got < wanted:
        raise RuntimeError(f"HF continuous batching generated only {got} of {wanted} tokens")
    return {**summarize(records, wall, [], slo), "attention": attention, "cuda_graphs": on_cuda,
            "max_requests_per_batch": max_batch, "priorities": "ignored (FIFO scheduler)",
            "timestamped_tokens": sum(len(r["times"]) for r in records.values())}


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() / statistics.median(times)


def host_link_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    for _ in range(2):
        host.copy_(src, non_blocking=True)
        src.copy_(host, non_blocking=True)
    sync(device)
    d2h, h2d = [], []
    for _ in range(5):
        t0 = time.perf_counter(); host.copy_(src, non_blocking=True); sync(device); d2h.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); src.copy_(host, non_blocking=True); sync(device); h2d.append(time.perf_counter() - t0)
    return {"d2h_GBps": nbytes / statistics.median(d2h) / 1e9, "h2d_GBps": nbytes / statistics.median(h2d) / 1e9}


# decode-step micro-benchmarks at 1,024 context: "batch:variant"
FLOOR_VARIANTS = ("32:graph", "32:hf_graph", "32:eager", "64:graph", "64:hf_graph", "64:eager")


def fill_slab(slab, rows: int, context: int) -> None:
    """Embed `rows` rows of `context - 1` random K/V tokens, so a decode step attends `context`."""
    L, two, _S, H, _T, D = slab.data.shape
    for i in range(rows):
        slab.add_row(f"m{i}", torch.randn(L, two, H, context - 1, D, dtype=slab.data.dtype, device=slab.data.device))


def median_decode_step(runner, steps: int = 30, skip: int = 5) -> float:
    """Median seconds of one decode step of every row in `runner`'s slab (the first `skip` steps,
    warm-up, are not counted)."""
    slab, device = runner.slab, runner.device
    ids = [7] * slab.num_rows
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        runner.decode(ids)
        sync(device)
        times.append(time.perf_counter() - t0)
        if slab.write_col + 2 > slab.max_len:
            break
    return statistics.median(times[skip:])


def decode_step_micro(model, tokenizer, spec, batch: int, context: int, cuda_graphs: bool,
                      fused: bool | None = None) -> dict:
    """Median time of one decode step with `batch` rows of `context` tokens (random K/V)."""
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    config = EngineConfig(max_batch_size=batch, max_seq_len=context + 64, warmup=False, cuda_graphs=cuda_graphs,
                          fused_decode=fused)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    fill_slab(engine.slab, batch, context)
    step_s = median_decode_step(engine.runner)
    weights = weights_bytes(model)
    kv = batch * context * engine.slab.bytes_per_token
    decode = info.decode
    engine.close()
    del engine
    _free(model.device)
    return {"batch": batch, "context": context, "step_ms": 1000 * step_s,
            "weights_bytes": weights, "kv_bytes": kv, "decode": decode,
            "device_bytes_after_close": torch.cuda.memory_allocated() if model.device.type == "cuda" else 0}


def versions() -> dict:
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name(0)
    else:
        v["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return v


# ---- the run's context, and one function per stage -----------------------------------------------
@dataclass
class Bench:
    """What every stage gets: the arguments, the model (on the "meta" device when only an engine
    process needs weights), W1's requests, the engine settings W1 runs use, and the result so far."""
    args: argparse.Namespace
    device: torch.device
    model: object
    tokenizer: object
    spec: object
    load: Callable[[], tuple]     # picklable () -> (model, tokenizer, spec): builds it in an engine process
    reqs: list[BenchRequest]      # W1, text round-tripped (the gRPC path sends text)
    common: dict                  # max_batch, max_seq_len (W1's), fused: the W1 engine settings
    out: Path
    result: dict = field(default_factory=dict)

    def save(self) -> None:
        """After every stage (and every rate), so a time-out keeps what finished."""
        self.out.write_text(json.dumps(self.result, indent=2))

    def keep(self, key: str, value: dict) -> dict:
        """Record one figure set now (a stage of several saves as it goes). -> {key: value}"""
        self.result[key] = value
        self.save()
        return {key: value}

    @property
    def vocab(self) -> int:
        return min(self.spec.vocab_size, len(self.tokenizer))

    @property
    def rates(self) -> list[float]:
        return [float(x) for x in self.args.rates.split(",")]

    @property
    def slo(self) -> tuple[float, float]:
        return self.args.slo_ttft_s, self.args.slo_tpot_s

    @property
    def fused(self) -> bool | None:
        return self.common["fused"]

    @functools.cached_property
    def copy_bandwidth(self) -> float:
        """Measured once per process (CUDA only)."""
        bw = self.result["copy_bandwidth_Bps"] = copy_bandwidth(self.device)
        _free(self.device)   # its 2 GB of buffers must not shrink the slab sized next
        return bw

    @functools.cached_property
    def host_link(self) -> dict:
        link = self.result["host_link"] = host_link_bandwidth(self.device)
        _free(self.device)
        return link

    @property
    def split_kv(self) -> list[int]:
        return [int(n) for n in self.args.decode_split_kv.split(",")]

    @property
    def num_stages(self) -> list[int]:
        return [int(n) for n in self.args.decode_num_stages.split(",")]

    @property
    def kv_block(self) -> list[int]:
        return [int(n) for n in self.args.decode_kv_block.split(",")]

    def switch(self, flag: str) -> list[bool | None]:
        """The values of one of SWITCHES given on the command line."""
        values = [None if v == "auto" else bool(int(v)) for v in getattr(self.args, flag.replace("-", "_")).split(",")]
        if any(v not in SWITCHES[flag][2] for v in values):
            raise SystemExit(f"--{flag}: values are {'auto, ' if None in SWITCHES[flag][2] else ''}1 or 0")
        return values

    @property
    def layouts(self) -> list[str]:
        return self.args.kv_layout.split(",")

    def w4_variants(self, prefix: str, run_one: Callable[[float, dict], dict]) -> dict:
        """W4 per rate x --kv-layout x --prefill-chunk-tokens x --prefill x --decode-split-kv x
        --decode-num-stages x --decode-kv-block x each
        of SWITCHES, side by side in one run, saved as they come:
        {f"{prefix}_{layout}_chunk{c}{tags}_rate{r}": ...}. Engines get --max-prefill-tokens, or
        the server's default prefill bound (8,192 tokens a forward), not W1's."""
        out = {}
        chunks = [int(c) for c in self.args.prefill_chunk_tokens.split(",")]
        switches = [[(name, v, tags[v]) for v in self.switch(flag)] for flag, (name, _d, tags, _w) in SWITCHES.items()]
        for rate, layout, chunk, prefill, split, stages, block, *settings in itertools.product(
                self.rates, self.layouts, chunks, self.args.prefill.split(","), self.split_kv, self.num_stages,
                self.kv_block, *switches):
            if prefill == "packed" and layout != "paged":
                continue
            kw = dict(kv_layout=layout, prefill_chunk_tokens=chunk, max_prefill_tokens=self.args.max_prefill_tokens or 8192,
                      packed_prefill=PREFILL_PATHS[prefill], decode_split_kv=split, decode_num_stages=stages,
                      decode_kv_block=block,
                      **{name: value for name, value, _tag in settings})
            tag = ("" if prefill == "auto" else f"_{prefill}") + (f"_split{split}" if split else "") + \
                (f"_stages{stages}" if stages != EngineConfig.decode_num_stages else "") + \
                (f"_block{block}" if block != EngineConfig.decode_kv_block else "") + \
                "".join(tag for _name, _value, tag in settings)
            out.update(self.keep(f"{prefix}_{layout}_chunk{chunk}{tag}_rate{rate:g}", run_one(rate, kw)))
        return out

    @property
    def prefill_bound(self) -> dict:
        return prefill_bound(self.args)

    def per_rate(self, prefix: str, run_one: Callable[[float], dict]) -> dict:
        """One figure set per --rates rate, saved as it comes: {f"{prefix}_rate{r}": ...}."""
        out = {}
        for rate in self.rates:
            out.update(self.keep(f"{prefix}_rate{rate:g}", run_one(rate)))
        return out

    # ---- workloads --------------------------------------------------------------------------
    def w2(self, rate: float) -> list[BenchRequest]:
        # the same tokens in process and through gRPC (text round trip, as for W1)
        cap = self.args.w1_max_output
        return workloads.with_text(workloads.w2(rate, num_requests=self.args.requests, vocab=self.vocab,
                                                output=(min(16, cap), cap)), self.tokenizer)

    @property
    def w4_context(self) -> int:
        return min(self.args.max_seq_len, self.spec.max_context)

    def w4(self, rate: float) -> list[BenchRequest]:
        """W4 at `rate`, text round-tripped (the server's tokenizer may make a prompt longer), each
        output cut to fit the context if it must (counted in workload_w4.requests_output_cut)."""
        median, sigma, _cap = W4_OUTPUT     # the cap: --max-output, at most W4_OUTPUT's
        reqs = workloads.with_text(workloads.w4(rate, num_requests=self.args.requests, vocab=self.vocab,
                                                prompt=W4_PROMPT, output=(median, sigma, self.args.w4_max_output),
                                                high_fraction=W4_HIGH[0], high_priority=W4_HIGH[1]),
                                   self.tokenizer)
        room = self.w4_context - 2    # prompt + output + the spare column stay within the context
        fitted = [r if len(r.prompt_ids) + r.max_new_tokens <= room else
                  BenchRequest(r.prompt_ids, max(1, room - len(r.prompt_ids)), r.arrival_s, r.priority, r.text)
                  for r in reqs]
        self.result.setdefault("workload_w4", {
            "requests": len(fitted), "context": self.w4_context,
            "prompt": {"median": W4_PROMPT[0], "sigma": W4_PROMPT[1], "cap": W4_PROMPT[2]},
            "output": {"median": median, "sigma": sigma, "cap": self.args.w4_max_output},
            "high_priority": {"priority": W4_HIGH[1], "fraction": W4_HIGH[0],
                              "requests": sum(r.priority > 0 for r in fitted)},
            "prompt_tokens": sum(len(r.prompt_ids) for r in fitted),
            "useful_tokens": sum(r.max_new_tokens for r in fitted),
            "requests_output_cut": sum(a is not b for a, b in zip(reqs, fitted))})
        return fitted


def with_offered(figures: dict, reqs: list[BenchRequest]) -> dict:
    """A run's figures with what was offered, the output tokens over the span of the arrivals
    (from the run's start to the last one), beside what was delivered (tok_per_s, whose wall
    time includes the drain after the last arrival) and what was delivered while requests kept
    arriving (see `late_delivery`): about 1 when the engine keeps up, below when a queue grows."""
    if "tok_per_s" in figures:
        span = max(r.arrival_s for r in reqs)
        offered = sum(r.max_new_tokens for r in reqs) / span if span > 0 else float("inf")
        figures.update(offered_tok_per_s=offered, delivered_tok_per_s=figures["tok_per_s"],
                       delivered_over_offered=figures["tok_per_s"] / offered)
        if figures.get("late_arrivals_tok_per_s"):
            figures["delivered_over_offered_while_arriving"] = figures["late_arrivals_tok_per_s"] / offered
    return figures


def late_delivery(records: dict) -> dict:
    """Tokens delivered per second over the last three quarters of the arrivals' span (the first
    quarter is the batch filling up), from every stream's token times: in a steady state that
    keeps up, the offered rate; below it when requests queue. -> {} without arrivals to span."""
    arrivals = [r["arrival"] for r in records.values()]
    if len(arrivals) < 2 or max(arrivals) <= min(arrivals):
        return {}
    start = min(arrivals) + (max(arrivals) - min(arrivals)) / 4
    end = max(arrivals)
    tokens = sum(1 for r in records.values() for t in r["times"] if start <= t <= end)
    return {"late_arrivals_tok_per_s": tokens / (end - start)}


PREFILL_PATHS = {"auto": None, "packed": True, "hf": False}   # --prefill -> EngineConfig.packed_prefill


def prefill_bound(args) -> dict:
    """--max-prefill-tokens as engine keywords (none given: the stage's default)."""
    return {"max_prefill_tokens": args.max_prefill_tokens} if args.max_prefill_tokens else {}
W4_PROMPT = (400, 1.0, 3000)    # lognormal: median, sigma, cap (tokens)
W4_OUTPUT = (200, 0.8, 1000)
W4_HIGH = (0.15, 10)            # fraction of requests at the higher priority, and that priority


def stage_floor(b: Bench) -> dict:
    """Decode-step micro-benchmarks at 1,024 context against the copy-bandwidth floor (CUDA)."""
    if b.device.type != "cuda":
        return {}
    bw = b.copy_bandwidth
    out = {"copy_bandwidth_Bps": bw, "host_link": b.host_link}
    # the engine's decode (--decode), and the HF forward with and without CUDA graphs beside it
    variants = {"graph": (True, b.fused), "hf_graph": (True, False), "eager": (False, False)}
    for variant in FLOOR_VARIANTS:
        if b.args.floor_variant not in (None, variant):
            continue
        batch, label = int(variant.split(":")[0]), variant.split(":")[1]
        graphs, mode = variants[label]
        m = decode_step_micro(b.model, b.tokenizer, b.spec, batch, 1024, graphs, mode)
        m["floor_ms"] = 1000 * (m["weights_bytes"] + m["kv_bytes"]) / bw
        m["ratio_to_floor"] = m["step_ms"] / m["floor_ms"]
        out.update(b.keep(f"decode_step_b{batch}_ctx1024_{label}", m))
    if "decode_step_b32_ctx1024_graph" in out:
        out["floor_w1_tok_per_s_b32"] = 32 / (out["decode_step_b32_ctx1024_graph"]["floor_ms"] / 1000)
    return out


def stage_engine(b: Bench) -> dict:
    return {"engine": run_engine(b.model, b.tokenizer, b.spec, b.reqs, cuda_graphs=True, label="engine", **b.common)}


def stage_engine_eager(b: Bench) -> dict:
    return {"engine_eager": run_engine(b.model, b.tokenizer, b.spec, b.reqs, cuda_graphs=False, label="engine-eager",
                                       **b.common)}


def stage_w2(b: Bench) -> dict:
    """W2: W1's requests with Poisson arrivals, one engine per rate."""
    return b.per_rate("engine_w2", lambda rate: run_engine(
        b.model, b.tokenizer, b.spec, b.w2(rate), cuda_graphs=True, label=f"w2@{rate:g}/s", **b.common, slo=b.slo))


def _w3(b: Bench) -> tuple[list[BenchRequest], list[BenchRequest], dict]:
    """A saturated batch of priority-0 work; priority-10 arrivals preempt into it. -> (W3, its
    low-priority work alone, run_engine's settings for both)."""
    w3 = workloads.w3(num_low=b.args.max_batch_size, num_high=16, high_every_s=0.5, vocab=b.vocab)
    kw = dict(cuda_graphs=True, max_batch=b.args.max_batch_size,
              max_seq_len=max(len(r.prompt_ids) + r.max_new_tokens for r in w3) + 8, fused=b.fused,
              kv_layout=b.layouts[0], prefill_chunk_tokens=b.common["prefill_chunk_tokens"],
              prefill_graphs=b.switch("prefill-graphs")[0], **b.prefill_bound)
    return w3, [r for r in w3 if r.priority == 0], kw


def stage_w3(b: Bench) -> dict:
    out = {"host_link": b.host_link} if b.device.type == "cuda" else {}
    w3, _, kw = _w3(b)
    out["engine_w3"] = run_engine(b.model, b.tokenizer, b.spec, w3, label="w3", **kw)
    return out


def stage_w3_low(b: Bench) -> dict:
    """W3's low-priority work alone, to price what the preemptions cost it."""
    _, low_only, kw = _w3(b)
    return {"engine_w3_low_only": run_engine(b.model, b.tokenizer, b.spec, low_only, label="w3-low", **kw)}


def stage_w3_paired(b: Bench) -> dict:
    """W3 and its low-priority work alone, --w3-pairs times each in the order alone, W3, W3,
    alone, alone, W3... (each pair's order flips, so drift over the process's life cancels): one
    pair's ratio moved by +-10% between runs (note 26). -> each run's figures and the median of
    the pairs' low-priority throughput ratios."""
    w3, low_only, kw = _w3(b)
    keep = ("wall_s", "tok_per_s", "low_priority_tok_per_s", "ttft_by_priority", "preemptions", "seconds_prefill",
            "seconds_decode", "decode_steps", "decode_rows_p50", "decode_step_p50_ms", "itl_p99_s", "tpot_p50_s",
            "lowest_priority_last")
    pairs = []
    for i in range(b.args.w3_pairs):
        order = ("alone", "w3") if i % 2 == 0 else ("w3", "alone")
        pair = {}
        for which in order:
            reqs = w3 if which == "w3" else low_only
            r = run_engine(b.model, b.tokenizer, b.spec, reqs, label=f"w3-pair{i}-{which}", **kw)
            pair[which] = {k: r[k] for k in keep if k in r}
        pair["low_ratio"] = pair["w3"]["low_priority_tok_per_s"] / pair["alone"]["tok_per_s"]
        pair["high_ttft_p99_s"] = max(p["p99_s"] for q, p in pair["w3"]["ttft_by_priority"].items() if q != "0")
        pairs.append(pair)
    ratios = sorted(p["low_ratio"] for p in pairs)
    return {"w3_paired": {"pairs": pairs, "low_ratio_median": statistics.median(ratios), "low_ratios": ratios,
                          "high_ttft_p99_s": [p["high_ttft_p99_s"] for p in pairs]}}


def stage_grpc_w2(b: Bench) -> dict:
    """W2 through the served path: Poisson arrivals from the client process."""
    return b.per_rate("grpc_w2", lambda rate: run_grpc(b.w2(rate), load=b.load, transport="process", **b.common,
                                                       slo=b.slo))


def stage_grpc_thread(b: Bench) -> dict:
    """W1 through gRPC, the engine loop as a thread of the server (it shares the GIL)."""
    return {"grpc_thread": run_grpc(b.reqs, load=lambda: (b.model, b.tokenizer, b.spec), transport="thread",
                                    **b.common)}


def stage_grpc(b: Bench) -> dict:
    """W1 through gRPC, the engine loop in its own process, as `baton serve` runs it."""
    return {"grpc": run_grpc(b.reqs, load=b.load, transport="process", **b.common)}


def stage_hf_static(b: Bench) -> dict:
    return {"hf_static": run_hf_static(b.model, b.reqs)}


def stage_hf_cb(b: Bench) -> dict:
    try:
        return {"hf_cb": run_hf_cb(b.model, b.reqs)}
    except Exception as exc:  # noqa: BLE001 - record why a peer could not run
        return {"hf_cb": {"error": repr(exc)}}


def stage_w4(b: Bench) -> dict:
    """W4 (chat traffic) in process, one engine per rate, with --max-seq-len of context; each
    decode step against its floor from the K/V bytes its rows really hold (CUDA)."""
    def one(rate: float, kw: dict) -> dict:
        reqs = b.w4(rate)
        bandwidth = b.copy_bandwidth if b.device.type == "cuda" else None
        return with_offered(run_engine(b.model, b.tokenizer, b.spec, reqs, cuda_graphs=True, label=f"w4@{rate:g}/s",
                                       max_batch=b.args.max_batch_size, max_seq_len=b.w4_context, fused=b.fused,
                                       slo=b.slo, bandwidth=bandwidth, **kw), reqs)
    return b.w4_variants("engine_w4", one)


def stage_grpc_w4(b: Bench) -> dict:
    """W4 through the served path (engine process; client streams from their own process)."""
    def one(rate: float, kw: dict) -> dict:
        reqs = b.w4(rate)
        tp = {"tensor_parallel": b.args.tensor_parallel} if b.args.tensor_parallel > 1 else {}
        return with_offered(run_grpc(reqs, load=b.load, transport="process", max_batch=b.args.max_batch_size,
                                     max_seq_len=b.w4_context, fused=b.fused, slo=b.slo, **kw, **tp), reqs)
    return b.w4_variants("grpc_w4", one)


def stage_hf_cb_w4(b: Bench) -> dict:
    """W4 on HF continuous batching, arrivals honoured, per-request lengths, CUDA graphs on."""
    def one(rate: float) -> dict:
        reqs = b.w4(rate)
        try:
            return with_offered(run_hf_cb_arrivals(b.model, reqs, max_batch=b.args.max_batch_size, slo=b.slo,
                                                   label=f"hf-cb-w4@{rate:g}/s"), reqs)
        except Exception as exc:  # noqa: BLE001 - record why a peer could not run
            return {"error": repr(exc)}
    return b.per_rate("hf_cb_w4", one)


def stage_w5(b: Bench) -> dict:
    """W5 (multi-turn chat, closed loop) with the prefix cache off; device tier holding everything;
    device tier squeezed to a quarter of the conversations' K/V; that squeezed tier plus the host
    tier (how much of the full device tier's gain the host tier recovers)."""
    from benchmarks.w5 import ANSWER_TOKENS, SYSTEM_TOKENS, USER_TOKENS, run_w5
    count, turns = b.args.w5_conversations, b.args.w5_turns
    itemsize = torch.empty((), dtype=b.model.dtype).element_size()
    per_token = 2 * b.spec.num_layers * b.spec.num_kv_heads * b.spec.head_dim * itemsize
    working_set = count * (SYSTEM_TOKENS + turns * (USER_TOKENS + ANSWER_TOKENS)) * per_token
    out = {}
    variants = {"off": ("off", 0), "device_full": ("device", 2 * working_set),
                "device_squeezed": ("device", working_set // 4),
                "device_host_squeezed": ("device+host", working_set // 4),
                "device_squeezed16": ("device", working_set // 16),
                "device_host_squeezed16": ("device+host", working_set // 16)}
    # the host variants again bringing host-only blocks back up to the device tier never (_nb), at
    # most a quarter of its slots a request (_q), or all (_all: the default, note 31)
    bring_up = {"nb": 0.0, "q": 0.25, "all": 1.0}
    variants.update({f"{name}_{policy}": variants[name] for name in ("device_host_squeezed", "device_host_squeezed16")
                     for policy in bring_up})
    names = b.args.w5_variants.split(",")
    if unknown := [n for n in names if n not in variants]:
        raise SystemExit(f"--w5-variants: unknown {', '.join(unknown)} (choose from {', '.join(variants)})")
    repeats = b.args.w5_repeats
    for layout in b.layouts:
        for name, rep in [(n, r) for r in range(repeats) for n in names]:   # round by round
            mode, device_bytes = variants[name]
            kw = dict(max_seq_len=b.w4_context, kv_layout=layout, prefix_cache=mode, fused_decode=b.fused,
                      prefix_cache_device_bytes=device_bytes, prefix_cache_bring_up=bring_up.get(name.rsplit("_", 1)[-1], 1.0),
                      prefix_cache_host_bytes=min(2 * working_set, 24 << 30),
                      prefill_chunk_tokens=b.common["prefill_chunk_tokens"])
            out.update(b.keep(f"w5_{layout}_{name}" + (f"_r{rep}" if repeats > 1 else ""),
                              run_w5(b.model, b.tokenizer, b.spec, count=count, turns=turns, config_kw=kw,
                                     vocab=b.vocab, device=b.device)))
            _free(b.device)
        out.update(w5_gains(out, layout, names, repeats))
    return out


def w5_gains(out: dict, layout: str, names: list[str], repeats: int) -> dict:
    """Issue 13: how much of the full device tier's TTFT gain (against the cache off) each squeezed
    variant keeps, by the mean of turns 2 on's TTFT p50s (`_gain_over_full_gain`) and by the mean
    TTFT of all their requests (`_by_mean`); with repeats, each round's (`_rounds`, its own off and
    full) and their median."""
    gains: dict = {}
    for stat, suffix in (("mean_ttft_p50_turns_2_on_s", ""), ("mean_ttft_turns_2_on_s", "_by_mean")):
        rounds: dict[str, list[float]] = {}
        for rep in range(repeats):
            tag = f"_r{rep}" if repeats > 1 else ""
            mean = {n: out[f"w5_{layout}_{n}{tag}"].get(stat) for n in names}
            if mean.get("off") is None or mean.get("device_full") is None or mean["off"] <= mean["device_full"]:
                continue
            for n in names:
                if "squeezed" in n and mean[n] is not None:
                    rounds.setdefault(n, []).append((mean["off"] - mean[n]) / (mean["off"] - mean["device_full"]))
        for n, values in rounds.items():
            gains[f"w5_{layout}_{n}_gain_over_full_gain{suffix}"] = statistics.median(values)
            if repeats > 1:
                gains[f"w5_{layout}_{n}_gain_over_full_gain{suffix}_rounds"] = values
    return gains


# `--runs` names stages from this table; they run in the order given
def stage_decode_chat(b: Bench) -> dict:
    """Decode step with chat-like lengths at --max-seq-len context (--kv-layout), vs the real-token floor."""
    if b.device.type != "cuda":
        return {}
    from benchmarks.decode_chat import decode_chat
    out = {"copy_bandwidth_Bps": b.copy_bandwidth}
    for layout in b.layouts:
        for key, value in decode_chat(b.model, b.tokenizer, b.spec, layout, (48, 64, 128, 256), b.w4_context,
                                      b.copy_bandwidth).items():
            out.update(b.keep(key, value))
    return out


STAGES: dict[str, Callable[[Bench], dict]] = {
    "floor": stage_floor,
    "decode-chat": stage_decode_chat,
    "engine": stage_engine,
    "engine-eager": stage_engine_eager,
    "w2": stage_w2,
    "w3": stage_w3,
    "w3-low": stage_w3_low,
    "w3-paired": stage_w3_paired,
    "w4": stage_w4,
    "grpc": stage_grpc,
    "grpc-thread": stage_grpc_thread,
    "grpc-w2": stage_grpc_w2,
    "grpc-w4": stage_grpc_w4,
    "hf-static": stage_hf_static,
    "hf-cb": stage_hf_cb,
    "hf-cb-w4": stage_hf_cb_w4,
    "w5": stage_w5,
    "api": stage_api,
}
RUNS = frozenset(STAGES)
PER_RATE = {"w2", "grpc-w2", "w4", "grpc-w4", "hf-cb-w4"}   # on CUDA: one child process per rate
ENGINE_PROCESS_ONLY = {"grpc", "grpc-w2", "grpc-w4"}       # need no weights in this process

# (a, b): result[f"{a}_over_{b}"] = a's tok/s over b's; per rate for the per-rate stages
RATIOS = (("grpc", "engine"), ("grpc_thread", "engine"), ("engine", "hf_static"), ("engine", "hf_cb"),
          ("engine", "engine_eager"))
RATE_RATIOS = (("grpc_w2", "engine_w2"), ("grpc_w4", "engine_w4"), ("engine_w4", "hf_cb_w4"))


def add_ratios(result: dict) -> None:
    def tok_per_s(key: str) -> float | None:
        value = result.get(key)
        return value.get("tok_per_s") if isinstance(value, dict) else None

    for a, b in RATIOS:
        if tok_per_s(a) and tok_per_s(b):
            result[f"{a}_over_{b}"] = tok_per_s(a) / tok_per_s(b)
    for a, b in RATE_RATIOS:
        for key in [k for k in result if k.startswith(f"{a}_rate")]:
            rate = key.removeprefix(f"{a}_rate")
            if tok_per_s(key) and tok_per_s(f"{b}_rate{rate}"):
                result[f"{a}_over_{b}_rate{rate}"] = tok_per_s(key) / tok_per_s(f"{b}_rate{rate}")


def _per_stage(args, argv: list[str], runs: list[str]) -> int:
    """Each stage (each rate, each floor variant) in a child process of its own; the figures are
    merged into one result file."""
    import subprocess
    name = args.name or f"{args.preset or 'model'}-cuda"
    merged: dict = {}
    base = [a for i, a in enumerate(argv) if a not in ("--runs", "--name", "--rates") and
            (i == 0 or argv[i - 1] not in ("--runs", "--name", "--rates"))]
    stages: list[tuple[str, list[str]]] = []
    for run in runs:
        if run in PER_RATE:  # one engine per rate: each rate in a fresh process too
            stages += [(f"{run}-rate{rate.strip()}", ["--runs", run, "--rates", rate.strip()])
                       for rate in args.rates.split(",")]
        elif run == "floor":  # one engine per step variant too: a closed engine's memory lingers
            stages += [(f"floor-{v.replace(':', '-')}", ["--runs", "floor", "--floor-variant", v]) for v in FLOOR_VARIANTS]
        else:
            stages.append((run, ["--runs", run]))
    for stage, stage_args in stages:
        part = f"{name}.{stage}"
        code = subprocess.call([sys.executable, "-m", "benchmarks.bench", *base, *stage_args, "--name", part,
                                "--same-process"])
        path = Path(__file__).parent / "results" / f"{part}.json"
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                merged.setdefault(key, value)
            path.unlink()
        if code != 0:
            merged[f"{stage}_exit_code"] = code
        merged["command"] = "python -m benchmarks.bench " + " ".join(argv)
        add_ratios(merged)
        (Path(__file__).parent / "results" / f"{name}.json").write_text(json.dumps(merged, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="baton bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random-weight model built in-process")
    p.add_argument("--model", default=None, help="local HF folder (default: the built-in SmolLM2 when no preset)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for presets (default: the built-in one)")
    p.add_argument("--runs", default="engine,hf-static", help="comma list of stages, run in the order given: engine, "
                   "engine-eager, grpc (engine process, as served), grpc-thread (engine thread in the server), "
                   "grpc-w2 (W2 through gRPC), hf-static, hf-cb, floor, w2, w3, w3-low, w3-paired, w4 (chat traffic), "
                   "grpc-w4 (W4 through gRPC), hf-cb-w4 (W4 on HF continuous batching), "
                   "w5 (multi-turn chat, prefix cache off / device / device+host), "
                   "api (issue 14: JSON schema / top_logprobs=5 vs plain at one batch; n completions vs n requests)")
    p.add_argument("--requests", type=int, default=128, help="requests of W1, W2 and W4")
    p.add_argument("--w3-pairs", type=int, default=3, help="w3-paired: pairs of (W3, its low-priority work alone)")
    p.add_argument("--w5-conversations", type=int, default=32, help="W5: conversations at once")
    p.add_argument("--w5-turns", type=int, default=8, help="W5: turns per conversation")
    p.add_argument("--w5-repeats", type=int, default=1,
                   help="W5: rounds of all variants (round by round); gains per round and their median")
    p.add_argument("--w5-variants", default="off,device_full,device_squeezed,device_host_squeezed",
                   help="W5: prefix-cache variants (off, device_full, device_squeezed, device_host_squeezed: "
                        "the device tier at a quarter of the conversations' K/V; ..._squeezed16: a sixteenth; "
                        "device_host_squeezed{,16}_nb / _q / _all: host-only blocks brought back up never / at "
                        "most a quarter of the device tier a request / all (the default))")
    p.add_argument("--api-batch", type=int, default=32, help="api: requests at once per variant (and batch size)")
    p.add_argument("--api-prompt-tokens", type=int, default=256, help="api: prompt tokens of each batch request")
    p.add_argument("--api-n", type=int, default=8, help="api: completions of the one request (vs as many requests)")
    p.add_argument("--api-n-prompt-tokens", type=int, default=1000, help="api: the prompt of the n completions")
    p.add_argument("--max-output", type=int, default=None,
                   help="output length cap: W1/W2 outputs are uniform 16..this (default 512); W4's lognormal "
                        "outputs are capped at this (default 1,000); api outputs are this long (default 256)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=4096, help="W4: the engine's context (K/V columns per row)")
    p.add_argument("--rates", default="2,4,8", help="W2 and W4 Poisson arrival rates, requests/s")
    p.add_argument("--slo-ttft-s", type=float, default=1.0, help="W2/W4 goodput: time-to-first-token SLO, seconds")
    p.add_argument("--slo-tpot-s", type=float, default=0.05, help="W2/W4 goodput: time-per-output-token SLO, seconds")
    p.add_argument("--name", default=None, help="result file name (default: preset/model and device)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-layout", default="auto",
                   help="the engine's K/V layout, slab or paged (auto: the server's default, paged on CUDA and "
                        "slab elsewhere); W4 and decode-chat take a comma list and run each")
    p.add_argument("--decode-split-kv", default="0",
                   help="paged decode: flex's SPLIT_KV (0 = flex's choice); W4 takes a comma list and runs each, "
                        "other stages the first")
    p.add_argument("--decode-num-stages", default=str(EngineConfig.decode_num_stages),
                   help="paged decode: flex's num_stages (0 = flex's choice); W4 takes a comma list and runs each")
    p.add_argument("--decode-kv-block", default=str(EngineConfig.decode_kv_block),
                   help="paged decode: flex's BLOCK_N (0 = flex's choice); W4 takes a comma list and runs each")
    for flag, (name, default, tags, what) in SWITCHES.items():
        p.add_argument(f"--{flag}", default=default, help=f"W4: comma list of {'auto/' if None in tags else ''}1/0, "
                                                          f"EngineConfig.{name} ({what})")
    p.add_argument("--prefill-chunk-tokens", default="0",
                   help="W4: comma list of --prefill-chunk-tokens values to run side by side (0 = whole prompts)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="W1/W3 engines: prompt tokens in one prefill forward (default 32,768; the server's is 8,192, "
                        "which W4 always uses)")
    p.add_argument("--prefill", default="auto",
                   help="W4: comma list of prefill paths to run side by side: packed (fused, straight into pages; "
                        "paged layout only), hf (the HF forward, then embedded), auto (the engine's choice)")
    p.add_argument("--floor-variant", choices=FLOOR_VARIANTS, default=None,
                   help="floor stage: only this decode-step variant (on CUDA each runs in its own process)")
    p.add_argument("--decode", choices=("auto", "fused", "hf"), default="auto",
                   help="engine decode step: fused kernels, the HF forward, or auto (fused on CUDA where supported)")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="gRPC stages only: the engine shards the model over this many GPUs (a preset is built on "
                        "the meta device and each rank fills only its shards: a model larger than one GPU)")
    p.add_argument("--same-process", action="store_true",
                   help="run every stage in this process (default on CUDA: one child process per stage, "
                        "so no stage inherits another's device memory)")
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if not set(args.prefill.split(",")) <= set(PREFILL_PATHS):
        p.error(f"--prefill: packed, hf or auto, got {args.prefill!r}")
    if not set(args.kv_layout.split(",")) <= {"slab", "paged", "auto"}:
        p.error(f"--kv-layout: slab, paged or auto, got {args.kv_layout!r}")
    args.w1_max_output = args.max_output or 512
    args.w4_max_output = min(W4_OUTPUT[2], args.max_output or W4_OUTPUT[2])
    runs = list(dict.fromkeys(args.runs.split(",")))
    unknown = sorted(set(runs) - RUNS)
    if unknown:   # a typo must not silently measure nothing
        p.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(sorted(RUNS))})")
    if args.tensor_parallel > 1 and not set(runs) <= ENGINE_PROCESS_ONLY:
        p.error(f"--tensor-parallel: only the gRPC stages ({', '.join(sorted(ENGINE_PROCESS_ONLY))}) shard the engine")
    if len(runs) > 1 and torch.cuda.is_available() and not args.same_process:
        return _per_stage(args, argv, runs)

    bench = build_bench(args, argv, runs)
    for name in runs:
        bench.result.update(STAGES[name](bench))
        bench.save()
    add_ratios(bench.result)
    if bench.device.type == "cuda":
        bench.result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    bench.save()
    print(json.dumps(bench.result, indent=2))
    return 0


def build_bench(args, argv: list[str], runs: list[str]) -> Bench:
    from engine import model_loader
    from engine.build import resolve_kv_layout
    device = model_loader.resolve_device("auto")
    dtype = model_loader.resolve_dtype(args.dtype, device)
    tp = args.tensor_parallel
    load = functools.partial(load_model, args.preset, args.model, args.tokenizer,
                             torch.device("meta") if tp > 1 and args.preset else device, dtype)
    if args.preset and set(runs) <= ENGINE_PROCESS_ONLY:
        # only the engine process needs the weights: build none here (it would halve its memory)
        model, tokenizer, spec = load_model(args.preset, None, args.tokenizer, torch.device("meta"), dtype)
    else:
        model, tokenizer, spec = load()
    vocab = min(spec.vocab_size, len(tokenizer))
    cap = args.w1_max_output
    reqs = workloads.with_text(workloads.w1(args.requests, vocab=vocab, output=(min(16, cap), cap)), tokenizer)
    max_seq = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs) + 8
    fused = {"auto": None, "fused": True, "hf": False}[args.decode]
    # auto resolves here, as the server resolves it, so results name the layout that ran
    args.kv_layout = ",".join(resolve_kv_layout(layout, device.type) for layout in args.kv_layout.split(","))
    name = args.name or f"{args.preset or spec.name}-{device.type}"
    bench = Bench(args=args, device=device, model=model, tokenizer=tokenizer, spec=spec, load=load, reqs=reqs,
                  common=dict(max_batch=args.max_batch_size, max_seq_len=max_seq, fused=fused,
                              kv_layout=args.kv_layout.split(",")[0],
                              prefill_chunk_tokens=int(args.prefill_chunk_tokens.split(",")[0]),
                              decode_split_kv=int(args.decode_split_kv.split(",")[0]),
                              decode_num_stages=int(args.decode_num_stages.split(",")[0]),
                              decode_kv_block=int(args.decode_kv_block.split(",")[0]),
                              packed_prefill=PREFILL_PATHS[args.prefill.split(",")[0]], **prefill_bound(args),
                              **({"tensor_parallel": tp} if tp > 1 else {})),
                  out=Path(__file__).parent / "results" / f"{name}.json")
    bench.result.update({
        "command": "python -m benchmarks.bench " + " ".join(argv), "versions": versions(),
        "model": args.preset or spec.name, "dtype": str(dtype),
        "workload_w1": {"requests": len(reqs), "useful_tokens": sum(r.max_new_tokens for r in reqs)}})
    return bench


if __name__ == "__main__":
    sys.exit(main())
