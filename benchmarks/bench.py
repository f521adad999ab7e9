"""`baton bench`: the engine and its peers on the same requests, in one process and one run.

  python -m benchmarks.bench --preset llama2-7b --runs engine,engine-eager,hf-static,hf-cb,floor
Writes benchmarks/results/<name>.json (device, versions, every figure, the command).
Presets build random-weight models in-process (the GPU machine cannot fetch weights).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import workloads
from benchmarks.workloads import BenchRequest

PRESETS = {
    # Llama-2-7B shape
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048),
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


RUNS = {"engine", "engine-eager", "grpc", "grpc-thread", "grpc-w2", "hf-static", "hf-cb", "floor", "w2", "w3",
        "w3-low"}


def load_model(preset: str | None, model: str | None, tokenizer_folder: str | None, device: torch.device,
               dtype: torch.dtype):
    """-> (model, tokenizer, spec): a preset with random weights, or a local/built-in model. Module
    level, so functools.partial of it can be sent to an engine process (run_grpc). On the "meta"
    device a preset costs nothing: for its spec alone."""
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
    hf_model = build_preset(preset, device, dtype, vocab_size=max(PRESETS[preset]["vocab_size"], len(tokenizer)))
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


# ---- the engine, in process --------------------------------------------------------------------
def run_engine(model, tokenizer, spec, reqs: list[BenchRequest], *, cuda_graphs: bool, max_batch: int,
               max_seq_len: int, label: str, host_budget: int = 64 << 30,
               slo: tuple[float, float] | None = None, fused: bool | None = None) -> dict:
    from engine.api import assemble_engine
    from engine.config import EngineConfig

    config = EngineConfig(max_batch_size=max_batch, max_seq_len=max_seq_len, warmup=False,
                          cuda_graphs=cuda_graphs, max_prefill_tokens=32768, host_kv_budget_bytes=host_budget,
                          aging_seconds=0, fused_decode=fused)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    device = model.device
    # warm-up (captures graphs for the buckets it touches; the rest are captured on first use)
    _drive(engine, [BenchRequest([5] * 16, 4)], None, device)
    sync(device)
    stats = _drive(engine, reqs, tqdm(total=sum(r.max_new_tokens for r in reqs), desc=label, unit="tok",
                                      file=sys.stderr, mininterval=2), device, slo)
    stats.update(max_batch_size=info.max_batch_size, cuda_graphs=cuda_graphs, decode=engine.runner.describe(),
                 graphs_captured=len(engine.runner.graphs.graphs) if engine.runner.graphs else 0,
                 bytes_offloaded=engine.bytes_offloaded, bytes_restored=engine.bytes_restored,
                 preemptions=engine.num_parked_total, seconds_prefill=engine.seconds_prefill,
                 seconds_decode=engine.seconds_decode, slab_relocations=engine.slab.num_relocations,
                 offload_GBps=engine.bytes_offloaded / engine.seconds_offload / 1e9 if engine.seconds_offload else None,
                 restore_GBps=engine.bytes_restored / engine.seconds_restore / 1e9 if engine.seconds_restore else None)
    engine.close()
    del engine
    _free(device)
    return stats


def _drive(engine, reqs: list[BenchRequest], bar, device, slo: tuple[float, float] | None = None) -> dict:
    from engine.request import Request, SamplingParams
    records = {}
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    start = time.monotonic()
    step_times = []

    def sink_for(i: int):
        rec = records[i]

        def sink(out) -> None:
            if out.token_ids:
                now = time.monotonic()
                rec["times"].extend([now] * len(out.token_ids))
                if bar is not None:
                    bar.update(len(out.token_ids))
            if out.finished:
                rec["done"] = time.monotonic()
                rec["tokens"] = out.completion_tokens
        return sink

    while pending or engine.has_work():
        now = time.monotonic() - start
        while pending and reqs[pending[0]].arrival_s <= now:
            i = pending.pop(0)
            r = reqs[i]
            records[i] = {"arrival": start + r.arrival_s, "times": [], "priority": r.priority}
            engine.add_request(Request(f"b{i}", list(r.prompt_ids), SamplingParams(max_new_tokens=r.max_new_tokens,
                                                                                   ignore_eos=True),
                                       priority=r.priority), sink_for(i))
        if engine.has_work():
            t0 = time.monotonic()
            engine.step()
            step_times.append(time.monotonic() - t0)
        elif pending:
            time.sleep(min(0.005, max(0.0, reqs[pending[0]].arrival_s - now)))
    sync(device)
    wall = time.monotonic() - start
    if bar is not None:
        bar.close()
    return summarize(records, wall, step_times, slo)


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
    by_prio: dict[int, list[float]] = {}
    for r in records.values():
        if r["times"]:
            by_prio.setdefault(r["priority"], []).append(r["times"][0] - r["arrival"])
    if len(by_prio) > 1:
        out["ttft_by_priority"] = {str(p): {"p50_s": pct(v, 50), "p99_s": pct(v, 99), "n": len(v)}
                                   for p, v in sorted(by_prio.items())}
        low = [r for r in records.values() if r["priority"] == min(by_prio)]
        out["low_priority_tok_per_s"] = sum(r["tokens"] for r in low) / (max(r["done"] for r in low) - min(r["arrival"] for r in low))
    if slo is not None:
        slo_ttft, slo_tpot = slo
        good = [r for r in records.values() if r["times"] and r["times"][0] - r["arrival"] <= slo_ttft and
                (len(r["times"]) < 2 or (r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) <= slo_tpot)]
        out.update(slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot,
                   goodput_requests_fraction=len(good) / len(records) if records else float("nan"),
                   goodput_tok_per_s=sum(r["tokens"] for r in good) / wall)
    return out


# ---- the full gRPC path: the server here, clients streaming over loopback from another process ---
def run_grpc(reqs: list[BenchRequest], *, load, transport: str, max_batch: int, max_seq_len: int,
             fused: bool | None = None, slo: tuple[float, float] | None = None) -> dict:
    """`transport` "process": the engine loop in its own process, as `baton serve` runs it (`load`,
    a picklable () -> (model, tokenizer, spec), builds the model there); "thread": the engine loop
    as a thread of this process on `load()`'s model (`baton serve --engine-in-thread`). The client
    streams run in a child process (benchmarks.grpc_load), so they compete with neither."""
    import asyncio
    import os
    import subprocess
    import tempfile
    import threading

    from engine.api import EngineClient, assemble_engine
    from engine.config import EngineConfig
    from engine.process import EngineProcess
    from service.server import BatonServer, ServerConfig

    config = EngineConfig(max_batch_size=max_batch, max_seq_len=max_seq_len, warmup=True, max_prefill_tokens=32768,
                          aging_seconds=0, max_new_tokens_limit=max_seq_len, fused_decode=fused)
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
    try:
        with tempfile.TemporaryDirectory(prefix="baton-grpc-load-") as tmp:
            workload, out = Path(tmp) / "workload.json", Path(tmp) / "records.json"
            workload.write_text(json.dumps([{"text": r.text, "max_new_tokens": r.max_new_tokens,
                                             "arrival_s": r.arrival_s, "priority": r.priority} for r in reqs]))
            code = subprocess.call([sys.executable, "-m", "benchmarks.grpc_load", "--port", str(server.port),
                                    "--workload", str(workload), "--out", str(out)], env=env, cwd=root)
            if code != 0:
                raise RuntimeError(f"gRPC load client exited with {code}")
            result = json.loads(out.read_text())
        # where the engine loop's time went meanwhile (GPU-synchronised, as in run_engine)
        after = _idle_stats(client)
        engine_side = {"seconds_prefill": after.seconds_prefill - before.seconds_prefill,
                       "seconds_decode": after.seconds_decode - before.seconds_decode,
                       "seconds_idle": after.seconds_idle - before.seconds_idle,
                       "engine_steps": after.steps - before.steps}
    finally:
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
    from engine.api import assemble_engine
    from engine.config import EngineConfig
    config = EngineConfig(max_batch_size=batch, max_seq_len=context + 64, warmup=False, cuda_graphs=cuda_graphs,
                          fused_decode=fused)
    engine, _info = assemble_engine(model, tokenizer, spec, config)
    fill_slab(engine.slab, batch, context)
    step_s = median_decode_step(engine.runner)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = batch * context * engine.slab.bytes_per_token
    decode = engine.runner.describe()
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


def _per_stage(args, argv: list[str], runs: list[str]) -> int:
    import subprocess
    name = args.name or f"{args.preset or 'model'}-cuda"
    merged: dict = {}
    base = [a for i, a in enumerate(argv) if a not in ("--runs", "--name", "--rates") and
            (i == 0 or argv[i - 1] not in ("--runs", "--name", "--rates"))]
    stages: list[tuple[str, list[str]]] = []
    for run in runs:
        if run in ("w2", "grpc-w2"):  # one engine per rate: each rate in a fresh process too
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
        for key in ("grpc", "grpc_thread"):
            if key in merged and "engine" in merged:
                merged[f"{key}_over_engine"] = merged[key]["tok_per_s"] / merged["engine"]["tok_per_s"]
        for peer in ("hf_static", "hf_cb", "engine_eager"):
            if peer in merged and "engine" in merged and "tok_per_s" in merged[peer]:
                merged[f"engine_over_{peer}"] = merged["engine"]["tok_per_s"] / merged[peer]["tok_per_s"]
        (Path(__file__).parent / "results" / f"{name}.json").write_text(json.dumps(merged, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="baton bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random-weight model built in-process")
    p.add_argument("--model", default=None, help="local HF folder (default: the built-in SmolLM2 when no preset)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for presets (default: the built-in one)")
    p.add_argument("--runs", default="engine,hf-static", help="comma list: engine, engine-eager, grpc (engine "
                   "process, as served), grpc-thread (engine thread in the server), grpc-w2 (W2 through gRPC), hf-static, "
                   "hf-cb, floor, w2, w3, w3-low")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--rates", default="2,4,8", help="W2 Poisson arrival rates, requests/s")
    p.add_argument("--slo-ttft-s", type=float, default=1.0, help="W2 goodput: time-to-first-token SLO, seconds")
    p.add_argument("--slo-tpot-s", type=float, default=0.05, help="W2 goodput: time-per-output-token SLO, seconds")
    p.add_argument("--name", default=None, help="result file name (default: preset/model and device)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--floor-variant", choices=FLOOR_VARIANTS, default=None,
                   help="floor stage: only this decode-step variant (on CUDA each runs in its own process)")
    p.add_argument("--decode", choices=("auto", "fused", "hf"), default="auto",
                   help="engine decode step: fused kernels, the HF forward, or auto (fused on CUDA where supported)")
    p.add_argument("--same-process", action="store_true",
                   help="run every stage in this process (default on CUDA: one child process per stage, "
                        "so no stage inherits another's device memory)")
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - RUNS)
    if unknown:   # a typo must not silently measure nothing
        p.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(sorted(RUNS))})")
    if len(runs) > 1 and torch.cuda.is_available() and not args.same_process:
        return _per_stage(args, argv, runs)

    import functools

    from engine import model_loader
    device = model_loader.resolve_device("auto")
    dtype = model_loader.resolve_dtype(args.dtype, device)
    load = functools.partial(load_model, args.preset, args.model, args.tokenizer, device, dtype)
    if args.preset and set(runs) <= {"grpc", "grpc-w2"}:
        # only the engine process needs the weights: build none here (it would halve its memory)
        model, tokenizer, spec = load_model(args.preset, None, args.tokenizer, torch.device("meta"), dtype)
    else:
        model, tokenizer, spec = load()
    vocab = min(spec.vocab_size, len(tokenizer))
    reqs = workloads.with_text(workloads.w1(args.requests, vocab=vocab, output=(16, args.max_output)), tokenizer)
    max_seq = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs) + 8
    result = {"command": "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": versions(), "model": args.preset or spec.name, "dtype": str(dtype),
              "workload_w1": {"requests": len(reqs), "useful_tokens": sum(r.max_new_tokens for r in reqs)}}
    fused = {"auto": None, "fused": True, "hf": False}[args.decode]
    common = dict(max_batch=args.max_batch_size, max_seq_len=max_seq, fused=fused)
    name = args.name or f"{args.preset or spec.name}-{device.type}"
    out = Path(__file__).parent / "results" / f"{name}.json"

    def save() -> None:  # after every run, so a time-out keeps what finished
        out.write_text(json.dumps(result, indent=2))
    if "floor" in runs and device.type == "cuda":
        bw = copy_bandwidth(device)
        result["copy_bandwidth_Bps"] = bw
        result["host_link"] = host_link_bandwidth(device)
        # the engine's decode (--decode), and the HF forward with and without CUDA graphs beside it
        variants = {"graph": (True, fused), "hf_graph": (True, False), "eager": (False, False)}
        for variant in FLOOR_VARIANTS:
            if args.floor_variant not in (None, variant):
                continue
            batch, label = int(variant.split(":")[0]), variant.split(":")[1]
            graphs, mode = variants[label]
            m = decode_step_micro(model, tokenizer, spec, batch, 1024, graphs, mode)
            m["floor_ms"] = 1000 * (m["weights_bytes"] + m["kv_bytes"]) / bw
            m["ratio_to_floor"] = m["step_ms"] / m["floor_ms"]
            result[f"decode_step_b{batch}_ctx1024_{label}"] = m
            save()
        if "decode_step_b32_ctx1024_graph" in result:
            result["floor_w1_tok_per_s_b32"] = 32 / (result["decode_step_b32_ctx1024_graph"]["floor_ms"] / 1000)
    save()
    if "engine" in runs:
        result["engine"] = run_engine(model, tokenizer, spec, reqs, cuda_graphs=True, label="engine", **common)
    save()
    if "engine-eager" in runs:
        result["engine_eager"] = run_engine(model, tokenizer, spec, reqs, cuda_graphs=False, label="engine-eager", **common)
    save()
    if "w2" in runs:
        for rate in [float(x) for x in args.rates.split(",")]:
            # the same tokens as grpc-w2 sends (text round trip, as for W1)
            w2 = workloads.with_text(workloads.w2(rate, num_requests=args.requests, vocab=vocab,
                                                  output=(16, args.max_output)), tokenizer)
            save()
            result[f"engine_w2_rate{rate:g}"] = run_engine(model, tokenizer, spec, w2, cuda_graphs=True,
                                                           label=f"w2@{rate:g}/s", **common,
                                                           slo=(args.slo_ttft_s, args.slo_tpot_s))
    save()
    if "w3" in runs and device.type == "cuda" and "host_link" not in result:
        result["host_link"] = host_link_bandwidth(device)
    if "w3" in runs or "w3-low" in runs:
        # a saturated batch of priority-0 work; priority-10 arrivals preempt into it ("w3-low":
        # the same low-priority work alone, to price what the preemptions cost it)
        w3 = workloads.w3(num_low=args.max_batch_size, num_high=16, high_every_s=0.5, vocab=vocab)
        max3 = max(len(r.prompt_ids) + r.max_new_tokens for r in w3) + 8
        if "w3" in runs:
            result["engine_w3"] = run_engine(model, tokenizer, spec, w3, cuda_graphs=True, label="w3",
                                             max_batch=args.max_batch_size, max_seq_len=max3, fused=fused)
        if "w3-low" in runs:
            low_only = [r for r in w3 if r.priority == 0]
            result["engine_w3_low_only"] = run_engine(model, tokenizer, spec, low_only, cuda_graphs=True,
                                                      label="w3-low", max_batch=args.max_batch_size, max_seq_len=max3, fused=fused)
    save()
    if "grpc-w2" in runs:       # W2 through the served path: Poisson arrivals from the client process
        for rate in [float(x) for x in args.rates.split(",")]:
            w2 = workloads.with_text(workloads.w2(rate, num_requests=args.requests, vocab=vocab,
                                                  output=(16, args.max_output)), tokenizer)
            result[f"grpc_w2_rate{rate:g}"] = run_grpc(w2, load=load, transport="process", **common,
                                                       slo=(args.slo_ttft_s, args.slo_tpot_s))
            save()
    if "grpc-thread" in runs:   # the engine loop as a thread of the server (it shares the GIL)
        result["grpc_thread"] = run_grpc(reqs, load=lambda: (model, tokenizer, spec), transport="thread", **common)
    if "grpc" in runs:          # the engine loop in its own process, as `baton serve` runs it
        result["grpc"] = run_grpc(reqs, load=load, transport="process", **common)
    for key in ("grpc", "grpc_thread"):
        if key in result and "engine" in result:
            result[f"{key}_over_engine"] = result[key]["tok_per_s"] / result["engine"]["tok_per_s"]
    save()
    if "hf-static" in runs:
        result["hf_static"] = run_hf_static(model, reqs)
    save()
    if "hf-cb" in runs:
        try:
            result["hf_cb"] = run_hf_cb(model, reqs)
        except Exception as exc:  # noqa: BLE001 - record why a peer could not run
            result["hf_cb"] = {"error": repr(exc)}
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
