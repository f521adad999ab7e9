"""Tensor parallel against one rank, side by side in one invocation: `python -m benchmarks.tp_bench`.

Each variant builds its engine with `engine.build.build_engine` (the path `baton serve` takes:
followers spawned, the model loaded and sharded on every rank) around a preset (random weights)
or the built-in model, and runs the same batch of W1-style requests (all at once, EOS ignored):
  - tp1:         one rank, the engine's defaults (fused decode and CUDA graphs where it has them);
  - tp1-hf:      one rank, the HF forward, eager;
  - tpN:         --tensor-parallel N, the engine's defaults (on CUDA the fused step, each rank
                 replaying CUDA graphs that hold its collectives: in bf16 the fused all-reduce +
                 add + RMSNorm kernel, tp_allreduce "auto"; on CPU the HF forward);
  - tpN-noprefill-graphs: as tpN with packed whole-prompt prefills eager (EngineConfig.prefill_graphs
                 off; on by default since note 34, graphed up to 1,280 tokens per rank);
  - tpN-prefill-graphs: as tpN with prefill graphs forced on (the default before note 34 was off);
  - tpN-wholehead: as tpN with the whole LM head on every rank (EngineConfig.tp_vocab_parallel off;
                 the default splits its rows over the ranks and gathers the logits since note 34);
  - tp1-flexown, tpN-flexown: flex's own num_stages and BLOCK_N for the paged decode attention (1
                 and 64 on an H200; EngineConfig.decode_num_stages / decode_kv_block 0; the defaults are 2
                 and 128 since note 34);
  - tpN-nccl:    as tpN with NCCL's all-reduce, then liger's add + RMSNorm (the default before note 32);
  - tpN-unfused: as tpN-nccl with each residual add and the RMSNorm after it as two kernels
                 (EngineConfig.fused_add_norm off);
  - tpN-one-shot: as tpN-nccl with a decode step's partial outputs summed by symmetric memory's
                 one-shot all-reduce (EngineConfig.tp_allreduce);
  - tpN-fused:   each decode all-reduce, the residual add and the RMSNorm after it as one kernel
                 over symmetric memory (tp_allreduce "fused", engine/allreduce_norm.py; tpN's in bf16);
  - tpN-split2, tpN-split4: as tpN with the paged decode attention's flex SPLIT_KV at 2 / 4
                 (flex's own choice is 1 at 32 rows x 16 kv heads a rank);
  - tp1-shard:   one rank, the engine's defaults, on the preset cut to one rank's shard of N (1/N of
                 the heads and the MLP; engine and K/V the same): a TP N rank's work with no
                 collectives, so tpN - tp1-shard is what the all-reduces and the ranks' skew cost;
  - tp1-rope-off, tpN-rope-off: as tp1 / tpN with each layer's rotary embedding and K/V write as
                 the four kernels they were before engine/rope_store.py;
  - tp1-torchnorms: as tp1 with PyTorch's RMSNorm kernel, not liger's (EngineConfig.fused_add_norm off);
  - tp1-nopipe, tpN-nopipe: as tp1 / tpN with a steady step's next decode launched only after the
                 host has read the step's tokens (EngineConfig.pipeline_decode off: the default before note 33);
  - tpN-eager:   the fused step on every rank, eager;
  - tpN-hf:      the HF forward on every rank, eager (one all-reduce after attention and one
                 after the MLP).
Each variant runs in a process of its own (a closed engine's device memory lingers, and a
process whose ranks captured collectives in graphs keeps its process group: engine/tensor_parallel.py).
Reports throughput, TPOT, TTFT and the decode step against the per-GPU floor: (this rank's share
of the weights + of the K/V the rows hold) / the device copy bandwidth. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import workloads
from benchmarks.bench import _drive, copy_bandwidth, load_model, sync, versions


def rank_weight_bytes(model) -> int:
    """Bytes of the weights this rank holds (a sharded parameter counts its local shard only)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


@dataclass(frozen=True)
class Variant:
    ranks: int
    fused: bool | None = None          # the fused decode step (None: the engine's default)
    graphs: bool = True
    allreduce: str = "auto"
    add_norm: bool | None = None       # EngineConfig.fused_add_norm
    split_kv: int | None = None        # the paged decode's SPLIT_KV (None: --decode-split-kv)
    shard: int = 1                     # the preset cut to one rank's shard of this many
    rope_store: bool | None = None     # EngineConfig.fused_rope_store
    prefill_graphs: bool | None = None  # EngineConfig.prefill_graphs (None: the engine's default, on)
    pipeline: bool = True              # EngineConfig.pipeline_decode
    vocab_parallel: bool = True        # EngineConfig.tp_vocab_parallel
    flex_own: bool = False             # EngineConfig.decode_num_stages and decode_kv_block 0: flex's own settings


AGAIN = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "step_p50_ms", "tokens_sha256", "prefill_steps")   # --repeats' figures


def run(v: Variant, args, reqs, tokenizer_dir) -> dict:
    tp = v.ranks
    from engine import model_loader
    from engine.build import build_engine
    from engine.config import EngineConfig
    device = model_loader.resolve_device(args.device)
    dtype = model_loader.resolve_dtype("auto", device)
    # --lazy: every rank builds the preset on the meta device; sharding then allocates only its shards
    loader = functools.partial(load_model, args.preset, None, tokenizer_dir,
                               torch.device("meta") if args.lazy and tp > 1 else device, dtype, v.shard)
    max_seq = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs) + 8
    config = EngineConfig(device=args.device, max_batch_size=len(reqs), max_seq_len=max_seq, warmup=False,
                          cuda_graphs=v.graphs, fused_decode=v.fused, tensor_parallel=tp, kv_layout=args.kv_layout,
                          aging_seconds=0, decode_split_kv=args.decode_split_kv if v.split_kv is None else v.split_kv,
                          tp_allreduce=v.allreduce, fused_add_norm=v.add_norm, fused_rope_store=v.rope_store,
                          prefill_graphs=v.prefill_graphs, pipeline_decode=v.pipeline,
                          tp_vocab_parallel=v.vocab_parallel,
                          **({"decode_num_stages": 0, "decode_kv_block": 0} if v.flex_own else {}))
    t0 = time.monotonic()
    engine, info, _tok = build_engine(config, loader)
    built = time.monotonic() - t0
    try:
        # warm-up: a short prompt (as `baton serve`'s), or --warmup-prompt tokens (note 33's TTFT stall)
        _drive(engine, [workloads.BenchRequest([5] * args.warmup_prompt, 4)], None, engine.runner.device)
        figures, decodes = _drive(engine, reqs, None, engine.runner.device)
        # the same batch again in this process: what the first run paid once (a compile, a first
        # collective's set-up) shows as the difference (note 32's TTFT stall)
        again = [_drive(engine, reqs, None, engine.runner.device)[0] for _ in range(args.repeats - 1)]
        figures["again"] = [{k: a[k] for k in AGAIN if k in a} for a in again]
        weights = rank_weight_bytes(engine.runner.model)
        if engine.runner.device.type == "cuda":
            bw = copy_bandwidth(engine.runner.device)
            floors = [(weights + kv) / bw for _s, _r, kv in decodes]
            steps = sorted(s for s, _r, _k in decodes)
            floor = sorted(floors)[len(floors) // 2]
            # With overlap_decode (the CUDA default) a steady step's decode was launched during the
            # previous step, so the decode phase's own time reads low; the engine step's wall time
            # (step_p50_ms: decode, sampling and events, one token per row) is the one to hold
            # against the floor.
            figures.update(copy_bandwidth_Bps=bw, weights_bytes_per_rank=weights,
                           decode_step_p50_ms=1000 * steps[len(steps) // 2],
                           floor_per_gpu_p50_ms=1000 * floor,
                           step_over_floor_p50=figures["step_p50_ms"] / (1000 * floor))
        if args.profile_steps and engine.runner.device.type == "cuda":
            figures["profile"] = profile_decode(engine, args.profile_steps)
        if args.profile_prefill and engine.runner.device.type == "cuda":
            figures["prefill_profile"] = profile_prefill(engine, reqs)
        shards = getattr(engine.runner.model, "_baton_tp", None)
        figures.update(tensor_parallel=tp, decode=info.decode, build_s=built,
                       allreduce=getattr(shards.all_reduce, "kind", "?") if shards is not None else None,
                       fused_allreduce_norm=shards is not None and shards.all_reduce_add_norm is not None,
                       add_norm=engine.runner.fused is not None and engine.runner.fused.add_norm is not None,
                       rope_store=engine.runner.fused is not None and engine.runner.fused.rope_store is not None,
                       pipelined_steps=engine.stats().pipelined_steps, overlapped_steps=engine.stats().overlapped_steps)
        return figures
    finally:
        engine.close()


KERNEL_KINDS = (("collective", ("nccl", "all_reduce", "allreduce")), ("attention", ("flex", "attention", "attn")),
                ("gemm", ("gemm", "gemv", "sm90", "cutlass", "cublas", "xmma", "matmul", "nvjet")))


GAP_US = 20.0   # an idle gap at least this long (µs) counts as the host's turn, not a kernel launch's


def profile_decode(engine, steps: int) -> dict:
    """Rank 0's kernels over `steps` steady decode steps (torch.profiler, CUPTI sees the kernels
    a graph replays): per step, the kernel time by kind (collectives, attention, GEMMs, the rest),
    the time the GPU was busy (the union of its kernels) and the wall time. A collective's kernel
    on rank 0 includes any wait for a peer that is late to it. The GPU's idle time is split into
    short gaps (kernel to kernel) and long ones (the host's turn between steps, see GAP_US).
    Only CUDA activity is recorded, so the host runs at its own speed."""
    from torch.profiler import ProfilerActivity, profile

    from engine.request import Request, SamplingParams
    reqs = workloads.w1(32, vocab=32000, prompt=(128, 512), output=(steps + 8, steps + 8))
    for i, r in enumerate(reqs):
        engine.add_request(Request(f"prof{i}", list(r.prompt_ids),
                                   SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)))
    device = engine.runner.device
    for _ in range(4):   # the prefills and a few steps first
        engine.step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.monotonic()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall = time.monotonic() - t0
    while engine.has_work():
        engine.step()
    return {"steps": steps, "wall_ms_per_step": 1000 * wall / steps, **_kernel_summary(prof, steps)}


def profile_prefill(engine, reqs) -> list[dict]:
    """Rank 0's kernels in each step of a burst that has prefill work (each such step profiled
    alone, CUDA activity only): its prompt tokens, wall and GPU-busy time, and kernel time by kind,
    as profile_decode's. A step bound by its host shows a wall well above its busy time."""
    from torch.profiler import ProfilerActivity, profile

    from engine.request import Request, SamplingParams
    for i, r in enumerate(reqs):
        engine.add_request(Request(f"pp{i}", list(r.prompt_ids),
                                   SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)))
    device, out = engine.runner.device, []
    while engine.has_work():
        if not (engine.scheduler.waiting or engine.scheduler.prefilling):
            engine.step()
            continue
        before = engine.stats().prefill_tokens
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.monotonic()
            engine.step()
            sync(device)
            wall = time.monotonic() - t0
        out.append({"prefill_tokens": engine.stats().prefill_tokens - before, "wall_ms": 1000 * wall,
                    **_kernel_summary(prof, 1)})
    return out


def _kernel_summary(prof, steps: int) -> dict:
    """A profile's CUDA kernels per step: busy time (their union), idle split into short and long
    gaps (GAP_US), kernel time by kind and the top kernels."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    names: dict[str, float] = {}
    spans = []
    for e in kernels:
        us = e.time_range.elapsed_us()
        low = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + us
        names[e.name[:80]] = names.get(e.name[:80], 0.0) + us
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, end, gaps = 0.0, float("-inf"), []
    for a, b in spans:
        if b > end:
            if end > float("-inf") and a > end:
                gaps.append(a - end)   # the GPU idle between one kernel's end and the next's start
            busy += b - max(a, end)
            end = b
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    # Idle split by gap length: inside a graph replay kernels follow each other within a few µs;
    # the long gaps are the host's turn between steps (sampling's sync, bookkeeping, the next
    # step's inputs and launch), which no kernel work can remove.
    long_gaps = sorted((g for g in gaps if g >= GAP_US), reverse=True)
    return {"gpu_busy_ms_per_step": busy / 1000 / steps,
            "idle_short_gaps_ms_per_step": sum(g for g in gaps if g < GAP_US) / 1000 / steps,
            "idle_long_gaps_ms_per_step": sum(long_gaps) / 1000 / steps,
            "long_gaps_per_step": len(long_gaps) / steps,
            "long_gaps_us_top": [round(g, 1) for g in long_gaps[:8]],
            "kernels_per_step": len(kernels) / steps,
            "kernel_ms_per_step": {k: v / 1000 / steps for k, v in sorted(by_kind.items())},
            "top_kernels_ms_per_step": {k: round(v / 1000 / steps, 3) for k, v in top}}


def _median_of_runs(figures: dict, key: str) -> float:
    """`key`'s median over the first run and --repeats' others ('again')."""
    return statistics.median([figures[key]] + [a[key] for a in figures["again"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="benchmarks.bench preset (random weights), default the built-in model")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--kv-layout", default="auto")
    p.add_argument("--decode-split-kv", type=int, default=0, help="the paged decode's flex SPLIT_KV (0: flex's)")
    p.add_argument("--variants", default="tp1,tp1-hf,tpN")
    p.add_argument("--lazy", action="store_true",
                   help="tensor parallel: build the preset on the meta device, then each rank's shards (a model "
                        "larger than one GPU)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="CUDA: after the run, profile this many steady decode steps on rank 0 (kernel time by kind)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="CUDA: after the run, the batch once more with each step that has prefill work profiled alone")
    p.add_argument("--warmup-prompt", type=int, default=16, help="tokens of the warm-up request's prompt")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the batch this many times in each variant's process; the first is reported, "
                        "the others' TTFT, TPOT, step and token digest go under 'again'")
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one variant, write its figures here
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    reqs = workloads.w1(args.batch, vocab=32000, prompt=(128, 512), output=(args.max_output, args.max_output))
    n = args.tp
    table = {"tp1": Variant(1), "tp1-hf": Variant(1, fused=False, graphs=False), "tp1-shard": Variant(1, shard=n),
             "tp1-torchnorms": Variant(1, add_norm=False), "tp1-nopipe": Variant(1, pipeline=False),
             "tpN-nopipe": Variant(n, pipeline=False),
             "tp1-flexown": Variant(1, flex_own=True), "tpN-flexown": Variant(n, flex_own=True),
             "tpN-wholehead": Variant(n, vocab_parallel=False),
             "tpN": Variant(n), "tpN-one-shot": Variant(n, allreduce="one-shot"),
             "tpN-fused": Variant(n, allreduce="fused"), "tpN-nccl": Variant(n, allreduce="nccl"),
             "tpN-prefill-graphs": Variant(n, prefill_graphs=True),
             "tpN-noprefill-graphs": Variant(n, prefill_graphs=False),
             "tpN-unfused": Variant(n, allreduce="nccl", add_norm=False), "tpN-split2": Variant(n, split_kv=2),
             "tpN-split4": Variant(n, split_kv=4), "tp1-rope-off": Variant(1, rope_store=False),
             "tpN-rope-off": Variant(n, rope_store=False), "tpN-eager": Variant(n, fused=True, graphs=False),
             "tpN-hf": Variant(n, fused=False, graphs=False)}
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in table]:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(table)})")
    if args.one:
        try:
            figures = run(table[names[0]], args, reqs, args.tokenizer)
        except Exception as exc:  # noqa: BLE001 - record why a variant could not run
            figures = {"error": repr(exc)[:1000]}
        Path(args.one).write_text(json.dumps(figures))
        return 0
    out: dict = {"command": "python -m benchmarks.tp_bench " + " ".join(argv), "versions": versions()}
    base = [a for i, a in enumerate(argv) if a not in ("--variants", "--out") and
            (i == 0 or argv[i - 1] not in ("--variants", "--out"))]
    with tempfile.TemporaryDirectory(prefix="baton-tp-bench-") as tmp:
        for name in names:
            part = Path(tmp) / f"{name}.json"
            code = subprocess.call([sys.executable, "-m", "benchmarks.tp_bench", *base, "--variants", name,
                                    "--one", str(part)])
            key = name.replace("N", str(args.tp))
            out[key] = json.loads(part.read_text()) if part.exists() else {"error": f"exit code {code}"}
            print(name, json.dumps(out[key])[:1500], flush=True)
    for name in args.variants.split(","):   # every TP N variant's (and the shard's) TPOT and step over TP 1's
        mine = out.get(name.replace("N", str(args.tp)), {})
        for ref in ("tp1", "tp1-hf"):
            if (name.startswith("tpN") or name == "tp1-shard") and ref != name and "tpot_p50_s" in mine \
                    and "tpot_p50_s" in out.get(ref, {}):
                out[f"{name}_over_{ref}_tpot_p50"] = mine["tpot_p50_s"] / out[ref]["tpot_p50_s"]
                if "step_p50_ms" in mine and "step_p50_ms" in out[ref]:
                    out[f"{name}_over_{ref}_step_p50"] = mine["step_p50_ms"] / out[ref]["step_p50_ms"]
                if mine.get("again") and out[ref].get("again"):   # --repeats: the ratio of the runs' medians
                    for key, tag in (("tpot_p50_s", "tpot"), ("step_p50_ms", "step")):
                        out[f"{name}_over_{ref}_{tag}_median_of_{args.repeats}"] = \
                            _median_of_runs(mine, key) / _median_of_runs(out[ref], key)
    base = out.get(f"tp{args.tp}", {})
    for name in args.variants.split(","):   # another way to sum the same partials (one-shot, fused): same tokens?
        mine = out.get(name.replace("N", str(args.tp)), {})
        if name.startswith("tpN-") and "tokens_sha256" in mine and "tokens_sha256" in base:
            out[f"{name}_same_tokens_as_tpN"] = mine["tokens_sha256"] == base["tokens_sha256"]
            if "step_p50_ms" in mine and "step_p50_ms" in base:
                out[f"{name}_over_tpN_step_p50"] = mine["step_p50_ms"] / base["step_p50_ms"]
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
