"""The decode step's GEMMs at small batch: cuBLAS (what F.linear runs) against what Inductor's
max-autotune picks for the same shape (its Triton GEMM templates, split-K among them, timed against
cuBLAS itself), one GPU:

    python -m benchmarks.probe_gemm

Note 32: a 7B step's GEMMs take 3.74 ms at TP 1 (~72% of the H200's copy bandwidth over the
weights) and 2.15 ms at TP 2 (~63%): half-width GEMMs at batch 32 lose the most, and they are the
largest lever left on the step at either width (issue 15's ratio and W4's TPOT alike).

For each of the 7B step's four GEMMs (q/k/v, o, gate/up, down) at TP 1 and at one TP 2 rank's
shard, and rows 32 and 128: captures a CUDA graph of calls that cycle through enough weight
copies to miss the 50 MB L2 (each call reads its weights from memory, as in the step) and times
its replay (median of 20). Prints JSON lines: microseconds a call and GB/s over the weights for
cuBLAS and for the compiled call, the compile's seconds, and how close the compiled results are
to cuBLAS's (max |difference| over max |value|; both accumulate in fp32 and round once). Then a
line per width: a step's 32 layers of the four GEMMs at 32 rows, either way.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
L2_BYTES = 50 << 20
# a TP batch of 32 and a busy W4 step; each shape autotunes (seconds to tens of seconds); GEMM_ROWS=32 for one
ROWS = tuple(int(r) for r in os.environ.get("GEMM_ROWS", "32,128").split(","))


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """The 7B step's GEMMs of one rank at `tp`: name -> (in features, out features)."""
    return {"qkv": (HIDDEN, 3 * HIDDEN // tp), "o": (HIDDEN // tp, HIDDEN),
            "gate_up": (HIDDEN, 2 * INTERMEDIATE // tp), "down": (INTERMEDIATE // tp, HIDDEN)}


def _graph_time(fn, calls: int) -> float:
    """Seconds a call: a CUDA graph of `calls` calls, median of 20 replays after 3."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls


def main() -> None:
    device = torch.device("cuda")
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name()}), flush=True)
    per_step: dict[tuple[int, str], float] = {}
    for tp in (1, 2):
        for name, (k, n) in shapes(tp).items():
            weight_bytes = n * k * 2
            copies = max(2, -(-4 * L2_BYTES // weight_bytes))   # 4x the L2 between two reads of one copy
            gen = torch.Generator(device=device).manual_seed(n + k)
            weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k ** 0.5
                       for _ in range(copies)]
            for rows in ROWS:
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
                out = {"tp": tp, "gemm": name, "rows": rows, "in": k, "out": n, "weight_copies": copies}
                cublas = _graph_time(lambda i: F.linear(x, weights[i % copies]), 4 * copies)
                out["cublas_us"] = round(1e6 * cublas, 2)
                out["cublas_GBps"] = round(weight_bytes / cublas / 1e9)
                try:
                    torch.compiler.reset()
                    compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
                    t0 = time.perf_counter()
                    got = compiled(x, weights[0])
                    torch.cuda.synchronize()
                    out["compile_s"] = round(time.perf_counter() - t0, 1)
                    ref = F.linear(x, weights[0]).float()
                    out["max_rel_diff"] = float((got.float() - ref).abs().max() / ref.abs().max())
                    out["equal_fraction"] = float((got.float() == ref).float().mean())
                    tuned = _graph_time(lambda i: compiled(x, weights[i % copies]), 4 * copies)
                    out["compiled_us"] = round(1e6 * tuned, 2)
                    out["compiled_GBps"] = round(weight_bytes / tuned / 1e9)
                    out["compiled_over_cublas"] = round(tuned / cublas, 3)
                    if rows == 32:
                        per_step[(tp, "cublas")] = per_step.get((tp, "cublas"), 0.0) + LAYERS * cublas
                        per_step[(tp, "compiled")] = per_step.get((tp, "compiled"), 0.0) + LAYERS * tuned
                except Exception as exc:  # noqa: BLE001 - report why it could not compile
                    out["error"] = repr(exc)[:400]
                print(json.dumps(out), flush=True)
            weights.clear()
            torch.cuda.empty_cache()
    for tp in (1, 2):
        if (tp, "compiled") in per_step:
            print(json.dumps({"tp": tp, "rows": 32, "step_gemms_cublas_ms": round(1e3 * per_step[(tp, "cublas")], 3),
                              "step_gemms_compiled_ms": round(1e3 * per_step[(tp, "compiled")], 3)}), flush=True)


if __name__ == "__main__":
    main()
