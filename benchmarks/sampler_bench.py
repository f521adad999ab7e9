"""Sampler micro-benchmark: `python -m benchmarks.sampler_bench [--device cuda] [--json PATH]`.

Times one sampling call (host + compute, up to the token ids on the host) at batch 64 for the
Llama (32000) and SmolLM2 (49152) vocabularies, old per-row `sample()` (copied below as
`old_sample`) against the batched `engine.sampler.Sampler`, calls of the two interleaved.
Cases: all greedy; all sampled unseeded (temperature 0.8, top-p 0.95, top-k 50); all seeded (the
same with a seed each); a mix (a quarter each greedy / unseeded / seeded / seeded with top-p only,
repetition penalty on a quarter of the rows); and top-p only (no top-k: a sort over V either way).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from engine.request import SamplingParams
from engine.sampler import Sampler, make_generator

# ---- the per-row implementation this replaced (engine/sampler.py before the batched rewrite) ----


def _old_penalty(row: torch.Tensor, seen_ids: list[int], penalty: float) -> None:
    ids = torch.tensor(sorted(set(seen_ids)), device=row.device, dtype=torch.long)
    scores = row.index_select(0, ids)
    row.index_copy_(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))


def _old_filtered(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    finite = torch.finfo(row.dtype)
    row = row.nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min)
    row = (row - row.max()) / params.temperature
    if params.top_k > 0 and params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[-1] = False
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        row = row.masked_fill(remove, float("-inf"))
    return row


@torch.inference_mode()
def old_sample(logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
               generators: list[torch.Generator | None]) -> list[int]:
    logits = logits.float()
    for i, p in enumerate(params):
        if p.has_penalty:
            _old_penalty(logits[i], seen_ids[i], p.repetition_penalty)
    chosen = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = _old_filtered(logits[i], p).softmax(-1)
            chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    if chosen.is_cuda:
        torch.cuda.current_stream(chosen.device).synchronize()
    return chosen.tolist()


# ---- cases ----------------------------------------------------------------------------------

SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=50)


def _case(name: str, batch: int) -> list[SamplingParams]:
    def p(**kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=1, **kw)
    if name == "greedy":
        return [p() for _ in range(batch)]
    if name == "sampled":
        return [p(**SAMPLED) for _ in range(batch)]
    if name == "seeded":
        return [p(**SAMPLED, seed=i) for i in range(batch)]
    if name == "top-p only":
        return [p(temperature=0.8, top_p=0.95) for _ in range(batch)]
    if name == "mix+penalty":
        kinds = [{}, SAMPLED, dict(SAMPLED, seed=1), dict(temperature=0.7, top_p=0.9, seed=2)]
        return [p(**kinds[i % 4], repetition_penalty=1.2 if i % 4 == (i // 4) % 4 else 0.0)
                for i in range(batch)]
    raise ValueError(name)


CASES = ["greedy", "sampled", "seeded", "mix+penalty", "top-p only"]


def _inputs(params, vocab, device, dtype, context):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(len(params), vocab, generator=gen)).to(device, dtype)    # [n, V]
    seen = [torch.randint(0, vocab, (context,), generator=gen).tolist() if p.has_penalty else []
            for p in params]
    return logits, seen


def _time_case(name, args, device, dtype, vocab) -> dict:
    params = _case(name, args.batch)
    logits, seen = _inputs(params, vocab, device, dtype, args.context)
    new_gens = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
    old_gens = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
    sampler = Sampler(device, seed=0)
    calls = {"old": lambda: old_sample(logits, params, seen, old_gens),
             "new": lambda: sampler.sample(logits, params, seen, new_gens)}
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.warmup + args.iters):
        for key, call in calls.items():            # interleaved: both see the same machine noise
            start = time.perf_counter()
            call()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - start)
    old_ms, new_ms = (1000 * statistics.median(times[k]) for k in ("old", "new"))
    return {"vocab": vocab, "case": name, "batch": args.batch, "old_ms": old_ms, "new_ms": new_ms,
            "speedup": old_ms / new_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--context", type=int, default=512, help="seen ids per penalised row")
    ap.add_argument("--iters", type=int, default=None, help="timed calls each (default: 20 CPU, 200 CUDA)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    args.iters = args.iters or (200 if device.type == "cuda" else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({where}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"logits {dtype}, batch {args.batch}, {args.iters} timed calls each (median)")
    print(f"{'vocab':>6}  {'case':<12} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    results = []
    for vocab in args.vocab:
        for name in args.cases:
            r = _time_case(name, args, device, dtype, vocab)
            results.append(r)
            print(f"{vocab:>6}  {name:<12} {r['old_ms']:>9.3f} {r['new_ms']:>9.3f} {r['speedup']:>7.1f}x",
                  flush=True)
    if args.json:
        meta = {"device": str(device), "device_name": where, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "dtype": str(dtype), "iters": args.iters}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
