"""Where a chunked prefill's time goes: `python -m benchmarks.profile_chunks --tokenizer TOKDIR`.

W3 and W4 on the H200 (docs/benchmarks.md note 25) ran slower with `--prefill-chunk-tokens 512`
than with whole prompts, by far more than one extra forward a step predicts. This builds one
engine per chunk size (paged, fused, CUDA graphs, as the server runs), feeds the same burst of
prompts, and times every phase of every step with a device sync after it, by kind: membership,
whole prompts (the packed forward), chunks, decode. Also: the caching allocator's retries (a
cudaMalloc that failed, freed the cache and tried again: each one a device sync and frees) and
device mallocs, and a profile of a few chunked steps (top host ops and kernels). Prints JSON.
Order of runs per chunk size: no syncs, a sync after every phase, no syncs again, no syncs on a
burst of other lengths (a cost per new shape shows there again); then one run per `--sync-after`
set (syncs after those phase kinds only); with --profile-whole, a repeat and a run over new
lengths each profiled from start to end.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import _free, load_model, sync, versions


def _alloc_counts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    s = torch.cuda.memory_stats(device)
    return {"alloc_retries": s.get("num_alloc_retries", 0), "device_mallocs": s.get("num_device_alloc", 0),
            "device_frees": s.get("num_device_free", 0)}


KINDS = frozenset({"membership", "whole", "chunk", "decode"})


def _kind(before, after) -> str:
    if after.prefill_chunks > before.prefill_chunks:
        return "chunk"
    if after.prefill_tokens > before.prefill_tokens:
        return "whole"   # whole prompts (the packed forward), or a chunk that ended a prompt
    if after.seconds_decode > before.seconds_decode:
        return "decode"
    return "membership"


def run(model, tokenizer, spec, chunk: int, prompts: list[list[int]], new_tokens: int, max_batch: int,
        sync_after: frozenset[str], profile_steps: int = 0) -> dict:
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    from engine.request import Request, SamplingParams
    device = model.device
    config = EngineConfig(max_batch_size=max_batch, warmup=False, kv_layout="paged", prefill_chunk_tokens=chunk,
                          aging_seconds=0, max_prefill_tokens=8192)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    engine.add_request(Request("warm", [5] * 600, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    sync(device)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
    allocs = _alloc_counts(device)
    times: dict[str, list[float]] = collections.defaultdict(list)
    prof = None
    steps = 0
    t_start = time.perf_counter()
    while engine.has_work():
        if profile_steps and steps == (0 if profile_steps < 0 else 2):   # < 0: the whole run
            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        before, mark = engine.stats(), time.perf_counter()
        for _events in engine.step_phases():
            after = engine.stats()
            kind = _kind(before, after)
            if kind in sync_after:
                sync(device)
            now = time.perf_counter()
            times[kind].append(now - mark)
            before, mark = after, now
        steps += 1
        if prof is not None and profile_steps > 0 and steps == 2 + profile_steps:
            sync(device)
            prof.__exit__(None, None, None)
    sync(device)
    wall = time.perf_counter() - t_start
    if prof is not None and profile_steps < 0:
        prof.__exit__(None, None, None)
    allocs = {k: v - allocs[k] for k, v in _alloc_counts(device).items()}
    out = {"chunk": chunk, "decode": info.decode, "wall_s": round(wall, 3), "steps": steps,
           "phases": {k: {"n": len(v), "total_s": round(sum(v), 3), "mean_ms": round(1000 * sum(v) / len(v), 2)}
                      for k, v in times.items()}, **allocs}
    if prof is not None:
        averages = prof.key_averages()
        top = 12 if profile_steps > 0 else 25
        host = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:top]
        out["top_host_ops"] = [(e.key[:60], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in host]
        if device.type == "cuda":
            kernels = [e for e in averages if e.device_time_total > 0 and e.device_type.name == "CUDA"]
            out["top_kernels"] = [(e.key[:60], round(e.device_time_total / 1e3, 2), e.count)
                                  for e in sorted(kernels, key=lambda e: -e.device_time_total)[:12]]
    engine.close()
    del engine
    _free(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunks", default="0,512")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-whole", action="store_true",
                   help="also profile two whole runs, a repeat and one over new lengths (top 25 host ops each)")
    p.add_argument("--sync-after", default="", help="also runs syncing after these phase kinds only (a,b;c)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer, spec = load_model(args.preset, None, args.tokenizer, device, dtype)
    def burst(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(200, 1500, (args.requests,), generator=g).tolist()
        return [torch.randint(100, 30000, (n,), generator=g).tolist() for n in lengths]

    prompts, other = burst(0), burst(1)
    result = {"versions": versions(), "preset": args.preset, "prompt_tokens": sum(map(len, prompts)), "runs": []}
    for chunk in (int(c) for c in args.chunks.split(",")):
        # (label, prompts, phases synced after, profiled): unsynced first and last, since the first
        # run of a chunked engine in a process was 2x the later ones in note 25 whichever phases
        # were synced; then prompts of other lengths (slow again = a cost per new shape)
        plan = [("no syncs", prompts, frozenset(), False), ("all phases synced", prompts, KINDS, bool(chunk)),
                ("no syncs", prompts, frozenset(), False), ("no syncs, other lengths", other, frozenset(), False)]
        plan += [(f"synced after {kinds}", prompts, frozenset(kinds.split(",")), False)
                 for kinds in filter(None, args.sync_after.split(";"))]
        if args.profile_whole and chunk:   # what a run over new lengths does that a repeat does not
            plan += [("whole run profiled, repeat", prompts, frozenset(), -1),
                     ("whole run profiled, other lengths", burst(2), frozenset(), -1)]
        for label, burst_prompts, sync_after, profiled in plan:
            steps = -1 if profiled == -1 else args.profile_steps if profiled else 0
            r = run(model, tokenizer, spec, chunk, burst_prompts, args.new_tokens, args.max_batch, sync_after,
                    profile_steps=steps)
            r["run"] = label
            print(json.dumps(r), flush=True)
            result["runs"].append(r)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
