"""The engine's host time per decode step outside the model: `python -m benchmarks.profile_host`.

On the H200, W4's steps are ~1 ms longer than their decode phase (note 27): between the GPU
finishing one decode graph and the host launching the next, the host samples, detokenises,
checks stops, builds events, schedules and prepares the next step's tables, and the GPU idles.
That time is Python and does not depend on the device, so this measures it here on CPU: the
engine with the fused step on the tiny preset (4 layers), `--rows` requests decoding together,
cProfile over `--steps` steps, and the time per step of the engine's pieces with the model's
forward counted apart. `--kv-layout slab` by default: on CPU the paged step's attention is
flex's eager reference over the whole pool (minutes), while the bookkeeping measured here is the
same for both layouts but for the paged tables (prepare_decode, the attention tables). Prints JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

from benchmarks.bench import load_model, versions

PIECES = {   # (file suffix, function) -> label
    ("engine/engine.py", "step_phases"): "step (all)",
    ("engine/paged_decode.py", "_forward"): "model forward (decode)",
    ("engine/paged_decode.py", "decode"): "runner decode (incl. forward)",
    ("engine/model_runner.py", "forward_decode"): "model forward (decode)",
    ("engine/model_runner.py", "decode"): "runner decode (incl. forward)",
    ("engine/scheduler.py", "schedule"): "schedule",
    ("engine/engine.py", "_membership"): "membership",
    ("engine/engine.py", "_sample"): "sample",
    ("engine/engine.py", "_append"): "append + stops",
    ("engine/engine.py", "_flush"): "flush (detokenise, event)",
    ("engine/engine.py", "_finish"): "finish",
    ("engine/engine.py", "stats"): "stats",
    ("engine/detokenizer.py", "push"): "detokeniser push",
    ("engine/kv_ledger.py", "can_grow"): "ledger can_grow",
    ("engine/kv_paged.py", "prepare_decode"): "prepare_decode",
    ("engine/paged_attention.py", "update"): "attention tables update",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--kv-layout", default="slab")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as W4")
    args = p.parse_args()
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    from engine.request import Request, SamplingParams
    torch.set_num_threads(1)
    model, tokenizer, spec = load_model("tiny", None, None, torch.device("cpu"), torch.float32)
    config = EngineConfig(max_batch_size=args.rows, max_seq_len=1024, warmup=False, kv_layout=args.kv_layout,
                          fused_decode=True, aging_seconds=0)
    engine, info = assemble_engine(model, tokenizer, spec, config)
    g = torch.Generator().manual_seed(0)
    for i in range(args.rows):
        prompt = torch.randint(100, 30000, (int(torch.randint(50, 400, (1,), generator=g)),), generator=g).tolist()
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=args.steps + 20, ignore_eos=True,
                                                                   temperature=args.temperature)))
    while engine.stats().rows_on_device < args.rows:   # prefill them all first
        engine.step()
    for _ in range(3):
        engine.step()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    pieces = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for (suffix, name), label in PIECES.items():
            if func == name and file.endswith(suffix):
                pieces[label] = round(1000 * ct / args.steps, 3)
    own = sorted(((tt, f"{file.split('/')[-1]}:{func}") for (file, _l, func), (_cc, _nc, tt, _ct, _c) in stats.stats.items()),
                 reverse=True)[:args.top]
    forward = pieces.get("model forward (decode)", 0.0)
    print(json.dumps({"versions": versions(), "rows": args.rows, "steps": args.steps, "decode": info.decode,
                      "wall_ms_per_step": round(1000 * wall / args.steps, 3),
                      "host_ms_per_step_outside_forward": round(pieces.get("step (all)", 0.0) - forward, 3),
                      "pieces_ms_per_step": pieces,
                      "top_own_time_ms_per_step": [(name, round(1000 * t / args.steps, 3)) for t, name in own]}))
    engine.close()


if __name__ == "__main__":
    main()
