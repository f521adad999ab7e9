"""`--runs api`: what issue 14's API additions cost the engine, side by side in one run.

1. A batch of --api-batch requests arriving at once (prompts of --api-prompt-tokens random ids,
   outputs of up to --max-output tokens, greedy), one engine per variant:
     plain          EOS ignored: every row decodes --max-output tokens (the baseline);
     json_schema    schema(--max-output) on every row (the grammar decides where a row ends, so
                    EOS counts; the schema is too long to complete within the cap, so rows run to
                    it: mean_output_tokens_per_row and finish_reasons show it);
     top_logprobs5  logprobs with 5 alternatives on every row, EOS ignored.
   Reported per variant: TPOT p50, decode step p50, and the decode step p50 over the steps that
   had the full batch (rows that end early shrink the batch and flatter TPOT); their ratios to
   plain (issue 14's targets on the H200: json_schema <= 1.10, top_logprobs5 <= 1.05).
2. n completions: one request of n = --api-n over a prompt of --api-n-prompt-tokens against n
   separate requests with the same prompt (seeded sampling, temperature 1, seed i for request i:
   completion i of the one request has seed 0 + i, engine/request.completion_seed). Reported:
   the prompt tokens the engine's prefill computed (EngineStats.prefill_tokens; the target is one
   prompt for the one request, n prompts for the separate ones), TTFT and wall time of each.

The figures come from run_engine (benchmarks/bench.py), the same in-process path as `engine`.
"""
from __future__ import annotations

import dataclasses
import json
import random

from benchmarks.workloads import BenchRequest

TARGETS = {"json_schema": 1.10, "top_logprobs5": 1.05}   # issue 14: TPOT over plain's, on the H200
RATIO_FIGURES = ("tpot_p50_s", "decode_step_p50_ms", "decode_step_at_peak_rows_p50_ms")


def schema(output: int) -> str:
    """An object whose array needs at least `output` strings of at least 16 characters (19 with
    quotes and comma, ~3 tokens of ~7 characters): a row cannot complete it in `output` tokens, even
    with a model that would close it early, so constrained rows decode as long as plain ones; the
    mask is made at string, separator and bracket states."""
    return json.dumps({"type": "object", "required": ["notes"], "properties": {"notes": {
        "type": "array", "minItems": output, "items": {"type": "string", "minLength": 16}}}})


def variants(output: int) -> dict[str, dict]:
    """Name -> the SamplingParams fields of every row (a grammar decides where a row ends: EOS counts)."""
    return {"plain": {},
            "json_schema": {"response_format": ("json_schema", schema(output)), "ignore_eos": False},
            "top_logprobs5": {"logprobs": True, "top_logprobs": 5}}


def random_prompt(rng: random.Random, tokens: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(tokens)]   # ids above 100: clear of special tokens


def stage_api(b) -> dict:
    """The stage (b: benchmarks.bench.Bench): both parts, each engine's figures saved as it ends."""
    from benchmarks.bench import run_engine
    args = b.args
    spec = b.spec
    if not spec.eos_token_ids and b.tokenizer.eos_token_id is not None:
        # presets drop EOS (plain rows ignore it anyway); a grammar needs it to end a row
        spec = dataclasses.replace(spec, eos_token_ids=(b.tokenizer.eos_token_id,))
    output = args.max_output or 256
    common = dict(cuda_graphs=True, fused=b.fused, kv_layout=b.layouts[0])
    out: dict = {}

    rng = random.Random(14)
    prompts = [random_prompt(rng, args.api_prompt_tokens, b.vocab) for _ in range(args.api_batch)]
    for name, sampling in variants(output).items():
        reqs = [BenchRequest(p, output, sampling=sampling) for p in prompts]
        figures = run_engine(b.model, b.tokenizer, spec, reqs, label=f"api-{name}", max_batch=args.api_batch,
                             max_seq_len=args.api_prompt_tokens + output + 8, **common)
        figures["mean_output_tokens_per_row"] = figures["useful_tokens"] / figures["requests"]
        figures["sampling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}
        out.update(b.keep(f"api_{name}", figures))

    n = args.api_n
    prompt = random_prompt(random.Random(15), args.api_n_prompt_tokens, b.vocab)
    runs = {"one_request": [BenchRequest(prompt, output, sampling={"temperature": 1.0, "seed": 0}, n=n)],
            "separate": [BenchRequest(prompt, output, sampling={"temperature": 1.0, "seed": i}) for i in range(n)]}
    for name, reqs in runs.items():
        figures = run_engine(b.model, b.tokenizer, spec, reqs, label=f"api-n{n}-{name}", max_batch=n,
                             max_seq_len=args.api_n_prompt_tokens + output + 8, **common)
        out.update(b.keep(f"api_n{n}_{name}", figures))

    out.update(b.keep("api_summary", summary(out, n, args.api_n_prompt_tokens)))
    return out


def summary(out: dict, n: int, prompt_tokens: int) -> dict:
    """The ratios to plain and the prefill counts, beside issue 14's targets."""
    plain = out["api_plain"]
    result: dict = {"targets_tpot_over_plain": TARGETS}
    for name in TARGETS:
        for figure in RATIO_FIGURES:
            if plain.get(figure):
                result[f"{name}_over_plain_{figure}"] = out[f"api_{name}"][figure] / plain[figure]
    one, separate = out[f"api_n{n}_one_request"], out[f"api_n{n}_separate"]
    result.update({
        "n": n, "n_prompt_tokens": prompt_tokens,
        "n_one_request_prefill_tokens": one["prefill_tokens"], "n_separate_prefill_tokens": separate["prefill_tokens"],
        "n_one_request_prefills_once": one["prefill_tokens"] == prompt_tokens,
        "n_one_request_over_separate_wall_s": one["wall_s"] / separate["wall_s"],
        "n_one_request_over_separate_ttft_p50_s": one["ttft_p50_s"] / separate["ttft_p50_s"],
    })
    return result
