"""Benchmark workloads: fixed-seed request sets, no model needed."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0      # offset from the start of the run
    priority: int = 0
    text: str = ""              # the prompt as text (for the gRPC path); prompt_ids = tokenize(text)
    sampling: dict = field(default_factory=dict)   # more SamplingParams fields (in process only), e.g. top_logprobs
    n: int = 1                  # completions from one prefill (in process only)


def with_text(reqs: list[BenchRequest], tokenizer) -> list[BenchRequest]:
    """Give each request a text prompt, and make prompt_ids what the server's tokenizer makes of
    that text, so the in-process engine and the gRPC path run on identical tokens."""
    out = []
    for r in reqs:
        text = tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
        ids = tokenizer(text)["input_ids"] or [0]
        out.append(BenchRequest(ids, r.max_new_tokens, r.arrival_s, r.priority, text))
    return out


def w1(num_requests: int = 128, vocab: int = 32000, seed: int = 0, prompt=(32, 512), output=(16, 512)) -> list[BenchRequest]:
    """W1: all at once; prompt and output lengths uniform; EOS ignored by the runner."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(100, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output))
            for _ in range(num_requests)]


def w2(rate_per_s: float, **kwargs) -> list[BenchRequest]:
    """W2: W1's requests with Poisson arrivals at `rate_per_s`."""
    rng = random.Random(kwargs.get("seed", 0) + 1)
    t, out = 0.0, []
    for r in w1(**kwargs):
        t += rng.expovariate(rate_per_s)
        out.append(BenchRequest(r.prompt_ids, r.max_new_tokens, arrival_s=t))
    return out


def w3(num_low: int, num_high: int, high_every_s: float, vocab: int = 32000, seed: int = 0) -> list[BenchRequest]:
    """W3: a saturating set of priority-0 requests at t=0, then priority-10 requests arriving
    every `high_every_s` seconds (short prompts and outputs, like interactive chat)."""
    rng = random.Random(seed + 2)
    low = [BenchRequest([rng.randrange(100, vocab) for _ in range(rng.randint(64, 512))], rng.randint(256, 512))
           for _ in range(num_low)]
    high = [BenchRequest([rng.randrange(100, vocab) for _ in range(rng.randint(32, 128))], 32,
                         arrival_s=(i + 1) * high_every_s, priority=10) for i in range(num_high)]
    return low + high


def _lognormal_length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return min(cap, max(1, round(rng.lognormvariate(math.log(median), sigma))))


def w4(rate_per_s: float, num_requests: int = 128, vocab: int = 32000, seed: int = 0,
       prompt=(400, 1.0, 3000), output=(200, 0.8, 1000), high_fraction: float = 0.15,
       high_priority: int = 10) -> list[BenchRequest]:
    """W4, chat traffic: lognormal lengths, `prompt` and `output` = (median, sigma, cap) tokens
    (each at least 1), Poisson arrivals at `rate_per_s`, and `high_fraction` of the requests at
    `high_priority` (the others 0). The requests (lengths, tokens, priorities) depend on `seed`
    alone and the arrivals on their own stream, so every rate runs the same requests: the
    arrival times at rate r are those at rate 1 divided by r."""
    rng = random.Random(seed + 4)
    arrivals = random.Random(seed + 5)
    out, t = [], 0.0
    for _ in range(num_requests):
        n_prompt = _lognormal_length(rng, *prompt)
        n_output = _lognormal_length(rng, *output)
        priority = high_priority if rng.random() < high_fraction else 0
        ids = [rng.randrange(100, vocab) for _ in range(n_prompt)]
        t += arrivals.expovariate(rate_per_s)
        out.append(BenchRequest(ids, n_output, arrival_s=t, priority=priority))
    return out
