"""The fused step with and without its fused epilogues (CUDA): `python -m benchmarks.probe_epilogues`.

Builds the Llama-2-7B preset (random bf16), two FusedDecoders over it (`fuse_epilogues` on and
off; point-wise pieces uncompiled, so the probe starts in seconds), and times one decode step per
batch captured as a CUDA graph, without attention (each layer's attention output is its query:
the epilogues are around it), alternating the two, median of 50 replays each. Prints JSON lines.
"""
from __future__ import annotations

import json
import statistics

import torch

from benchmarks.bench import build_preset, versions
from engine.cuda_graphs import capture, capturing
from engine.fused_decode import FusedDecoder


def _attend(layer, q, k, v):
    return q.reshape(q.shape[0], -1)


def main() -> None:
    dev = torch.device("cuda")
    model = build_preset("llama2-7b", dev, torch.bfloat16)
    print(json.dumps({"versions": versions()}), flush=True)
    decoders = {on: FusedDecoder(model, compile=False, fuse_epilogues=on) for on in (True, False)}
    for batch in (32, 64, 128):
        ids = torch.randint(5, 30000, (batch, 1), device=dev)
        positions = torch.randint(0, 2000, (batch, 1), device=dev)
        graphs = {}
        with torch.inference_mode(), capturing():
            for on, fused in decoders.items():
                graphs[on] = capture(lambda f=fused: f(ids, positions, _attend), torch.cuda.graph_pool_handle())
        times = {True: [], False: []}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(50):
            for on in (True, False):
                start.record()
                graphs[on][0].replay()
                end.record()
                end.synchronize()
                times[on].append(start.elapsed_time(end))
        same = torch.equal(graphs[True][1].argmax(-1), graphs[False][1].argmax(-1))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(json.dumps({"batch": batch, "step_ms_fused_epilogues": round(on, 4), "step_ms_plain": round(off, 4),
                          "saved_ms": round(off - on, 4), "same_argmax": same}), flush=True)


if __name__ == "__main__":
    main()
