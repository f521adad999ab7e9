"""Where a prefill forward's time goes (CUDA): `python -m benchmarks.profile_prefill`.

Builds the Llama-2-7B preset and, for single prompts of several lengths and one group of four,
times: the engine's prefill (`ModelRunner.prefill`: the HF forward with an explicit 4-D mask);
the same HF forward with no mask (SDPA's causal flash kernel); the fused packed prefill
(`engine.fused_prefill`: the fused decoder's kernels over the prompts' tokens packed end to end,
varlen flash attention); embedding the K/V into pages; and a profile of one forward of each
(kernel count, GPU kernel time against wall time: a forward whose wall time is far above its kernel
time is bound by launching kernels from Python). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench import build_preset, versions
from engine.kv_paged import PagedKV
from engine.kv_slab import SlabCache
from engine.model_runner import ModelRunner


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_profile(fn) -> dict:
    """Kernel count and GPU time; the time to enqueue the forward (no sync) against its wall time;
    the host ops with the most self CPU time (a host sync shows up as cudaStreamSynchronize or
    aten::item / _local_scalar_dense)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    enqueue = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    events = [e for e in averages if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    gpu = sum(e.device_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: -e.device_time_total)[:6]
    host = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"kernels": sum(e.count for e in events), "gpu_ms": 1000 * gpu, "enqueue_ms": 1000 * enqueue,
            "wall_ms": 1000 * wall,
            "top_kernels": [(e.key[:50], round(e.device_time_total / 1e3, 3), e.count) for e in top],
            "top_host_ops": [(e.key[:50], round(e.self_cpu_time_total / 1e3, 3), e.count) for e in host]}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,512,1024,2048")
    args = p.parse_args()
    dev = torch.device("cuda")
    out: dict = {"versions": versions()}
    try:
        from torch.nn.attention import varlen
        out["varlen_attn_signature"] = str(inspect.signature(varlen.varlen_attn))
    except Exception as exc:  # noqa: BLE001 - report what this torch has
        out["varlen_attn_signature"] = repr(exc)
    print("varlen_attn", out["varlen_attn_signature"], flush=True)
    model = build_preset("llama2-7b", dev, torch.bfloat16, vocab_size=49152)
    params = sum(p.numel() for p in model.parameters())
    kv = PagedKV(32, 32, 128, num_pages=200, page_size=128, max_len=4096, max_rows=8,
                 dtype=torch.bfloat16, device=dev)
    runner = ModelRunner(model, kv, dev, cuda_graphs=False, fused_decode=True)
    from engine.fused_prefill import FusedPrefill
    fused = FusedPrefill(runner.fused, kv)
    g = torch.Generator().manual_seed(0)
    cases = [[n] for n in map(int, args.lengths.split(","))] + [[512, 480, 400, 300]]
    for lengths in cases:
        prompts = [torch.randint(100, 30000, (n,), generator=g).tolist() for n in lengths]
        tokens = sum(lengths)
        key = "x".join(map(str, lengths))
        row = {"tokens": tokens, "ideal_ms_at_700TFLOPs": 1000 * 2 * params * tokens / 700e12}
        row["engine_prefill_ms"] = 1000 * timed(lambda: runner.prefill(prompts))
        if len(prompts) == 1:
            ids = torch.tensor(prompts, device=dev)
            P = ids.shape[1]
            tmp = torch.empty(32, 2, 1, 32, P, 128, dtype=torch.bfloat16, device=dev)

            def causal():
                return model(input_ids=ids, position_ids=torch.arange(P, device=dev)[None],
                             **{runner.cache_arg: SlabCache(tmp, num_rows=1, lo=0, hi=P,
                                                           write_index=torch.arange(P, device=dev))},
                             use_cache=True, logits_to_keep=1).logits[:, -1]
            row["hf_causal_nomask_ms"] = 1000 * timed(causal)
        result = runner.prefill(prompts)

        def embed():
            for i in range(len(prompts)):
                kv.add_row(f"r{i}", result.row_kv(i))
            for i in range(len(prompts)):
                kv.remove_row(f"r{i}")
        row["embed_pages_ms"] = 1000 * timed(embed)

        def packed():
            logits = fused.prefill(prompts, [f"f{i}" for i in range(len(prompts))])
            for i in range(len(prompts)):
                kv.remove_row(f"f{i}")
            return logits
        row["fused_packed_ms"] = 1000 * timed(packed)
        # same first tokens, and K/V close to the HF path's
        ref = result.logits.float()
        got = fused.prefill(prompts, [f"f{i}" for i in range(len(prompts))]).float()
        row["argmax_equal"] = bool((ref.argmax(-1) == got.argmax(-1)).all())
        row["logits_max_abs_diff"] = float((ref - got).abs().max())
        kv_diff = max(float((kv.row_kv(f"f{i}").float() - result.row_kv(i).float()).abs().max())
                      for i in range(len(prompts)))
        row["kv_max_abs_diff"] = kv_diff
        for i in range(len(prompts)):
            kv.remove_row(f"f{i}")
        print(key, json.dumps(row), flush=True)
        if lengths in ([128], [512], [512, 480, 400, 300]):
            row["profile_engine_prefill"] = kernel_profile(lambda: runner.prefill(prompts))
            row["profile_fused_packed"] = kernel_profile(packed)
            print(key, "profile hf", json.dumps(row["profile_engine_prefill"]), flush=True)
            print(key, "profile packed", json.dumps(row["profile_fused_packed"]), flush=True)
        out[key] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
