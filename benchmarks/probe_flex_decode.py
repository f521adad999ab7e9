"""Paged decode attention with flex's decode-kernel settings varied (CUDA):
`python -m benchmarks.probe_flex_decode [--batches 32,128] [--variants "default;SPLIT_KV=4;..."]`.

Why: the W4 decode step is 1.85x its real-token floor (docs/benchmarks.md note 25) and attention
over pages runs at ~50% of bandwidth. Flex picks SPLIT_KV = 2 x SMs // (rows x kv heads), which is 1
from 66 row-heads up on an H200 (132 SMs): one program walks the whole of one row's K/V for one
head, so with long-tailed lengths the longest rows set each layer's time. Splitting each row's
pages over several programs (SPLIT_KV) should bring the layer nearer the bandwidth floor.

For each batch: rows of chat-like lengths (lognormal, median ~600 tokens, as `decode_chat`), one
layer of the Llama-2-7B shape (32 heads, head dim 128, bf16) in pages of 128 tokens; every variant
is an `engine.paged_attention.PagedDecodeAttention` with those `kernel_options`, compiled, ten
calls captured in one CUDA graph and replayed (as the engine replays its step). Reports the time
per call, the floor (the rows' real K/V bytes / copy bandwidth measured in the same process), the
fraction of bandwidth reached, and each variant's largest difference from the default's output.
Prints one JSON line per (batch, variant).

`--heads 32,16` also times one TP 2 rank's half of the heads (each rank attends its own heads,
so a TP 2 layer has half the programs over the same rows); `--lengths uniform:96:576` draws the
rows' lengths uniformly (tp_bench's batch: W1 prompts of 32-512 tokens plus up to 128 generated)
instead of chat-like.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.bench import copy_bandwidth, versions
from benchmarks.decode_chat import chat_lengths
from engine.cuda_graphs import capture
from engine.paged_attention import PagedDecodeAttention

HEAD_DIM, PAGE = 128, 128


def parse_variant(text: str) -> dict | None:
    if text == "default":
        return None
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        out[key] = int(value)
    return out


def graph_time(fn, calls: int = 10, replays: int = 20) -> float:
    """Seconds per call: `calls` calls captured in one CUDA graph, median over replays."""
    graph, _ = capture(lambda: [fn() for _ in range(calls)], pool=None)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times[2:])


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="32,128")
    p.add_argument("--heads", default="32", help="heads (= kv heads) per layer, one run each: 32,16")
    p.add_argument("--lengths", default="chat", help="chat, or uniform:LO:HI")
    p.add_argument("--variants", default="default;SPLIT_KV=2;SPLIT_KV=4;SPLIT_KV=8;SPLIT_KV=16;"
                                         "SPLIT_KV=8,BLOCK_N=64;SPLIT_KV=8,num_warps=8")
    args = p.parse_args()
    dev = torch.device("cuda")
    bandwidth = copy_bandwidth(dev)
    print(json.dumps({"versions": versions(), "copy_bandwidth_GBps": bandwidth / 1e9}), flush=True)
    for heads, batch in ((int(h), int(b)) for h in args.heads.split(",") for b in args.batches.split(",")):
        if args.lengths == "chat":
            lengths = chat_lengths(batch, 4096)
        else:
            _kind, lo, hi = args.lengths.split(":")
            lengths = torch.randint(int(lo), int(hi) + 1, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
        pages = [-(-n // PAGE) for n in lengths]
        num_pages = sum(pages) + 8
        max_pages = max(pages)
        perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(batch)).tolist()
        table = torch.zeros(batch, max_pages, dtype=torch.int32)
        for r, n in enumerate(pages):
            table[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
            perm = perm[n:]
        k = torch.randn(heads, num_pages * PAGE, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, 1, HEAD_DIM, dtype=torch.bfloat16, device=dev)
        real_bytes = sum(lengths) * heads * HEAD_DIM * 2 * 2
        floor = real_bytes / bandwidth
        reference = None
        for text in args.variants.split(";"):
            options = parse_variant(text)
            row = {"heads": heads, "batch": batch, "variant": text, "tokens": sum(lengths), "longest": max(lengths)}
            try:
                att = PagedDecodeAttention(heads, heads, HEAD_DIM, PAGE, batch, max_pages, dev, True,
                                           num_pages=num_pages, kernel_options=options)
                att.update(table.to(dev), torch.tensor(lengths, dtype=torch.int32, device=dev), batch)

                def call(att=att, k=k, v=v):
                    return att(q, k, v, rows=batch, scale=HEAD_DIM ** -0.5)

                out = call()
                reference = out if reference is None else reference
                seconds = graph_time(call)
                row.update(ms=round(1000 * seconds, 4), floor_ms=round(1000 * floor, 4),
                           fraction_of_bandwidth=round(floor / seconds, 3),
                           max_abs_diff_vs_first=float((out.float() - reference.float()).abs().max()))
            except Exception as exc:  # noqa: BLE001 - a variant flex refuses is reported, the rest still run
                row["error"] = repr(exc)[:300]
            print(json.dumps(row), flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
