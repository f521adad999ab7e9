"""W5: multi-turn chat. Many conversations at once, each resending its whole history every turn:
a shared system prompt, then per turn a user message and the model's own answer.

Closed loop: a conversation's next turn is sent when its previous answer has finished. Measured per
turn index: TTFT p50 / p99; per run: prompt tokens offered, prompt tokens computed by prefill (the
rest came from the prefix cache), cached tokens per tier, wall time. One engine per variant
(--prefix-cache off / device / device+host), same model, same conversations.
"""
from __future__ import annotations

import random
import statistics
import time

SYSTEM_TOKENS, USER_TOKENS, ANSWER_TOKENS = 500, 100, 150


def conversations(count: int, vocab: int, seed: int = 0) -> tuple[list[int], list[list[list[int]]]]:
    """-> (system prompt ids, per conversation a list of user-message ids per turn). Random ids
    above 10 (clear of special tokens); the answers are the model's, generated during the run."""
    rng = random.Random(seed)
    system = [rng.randrange(10, vocab) for _ in range(SYSTEM_TOKENS)]
    users = [[[rng.randrange(10, vocab) for _ in range(USER_TOKENS)] for _ in range(64)] for _ in range(count)]
    return system, users


def run_w5(model, tokenizer, spec, *, count: int, turns: int, config_kw: dict, vocab: int,
           device, label: str = "w5") -> dict:
    from engine.build import assemble_engine
    from engine.config import EngineConfig
    from engine.request import Request, SamplingParams

    config = EngineConfig(**{**dict(warmup=False, aging_seconds=0, max_batch_size=max(count, 1)), **config_kw})
    engine, _info = assemble_engine(model, tokenizer, spec, config)
    warm = random.Random(1)   # one prefill and a few steps first (first-use costs), then the figures
    engine.add_request(Request("warm", [warm.randrange(10, vocab) for _ in range(SYSTEM_TOKENS + USER_TOKENS)],
                               SamplingParams(max_new_tokens=4, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    system, users = conversations(count, vocab)
    history = [list(system) for _ in range(count)]
    turn_of = [0] * count
    ttft: dict[int, list[float]] = {t: [] for t in range(turns)}
    sent: dict[str, tuple[int, float]] = {}
    answers: dict[str, list[int]] = {}
    offered = 0
    before = engine.stats()
    start = time.monotonic()

    def send(c: int) -> None:
        nonlocal offered
        history[c] += users[c][turn_of[c]]
        rid = f"c{c}t{turn_of[c]}"
        sent[rid] = (c, time.monotonic())
        answers[rid] = []
        offered += len(history[c])
        engine.add_request(Request(rid, list(history[c]), SamplingParams(max_new_tokens=ANSWER_TOKENS, ignore_eos=True)))

    for c in range(count):
        send(c)
    while engine.has_work():
        for events in engine.step_phases():
            now = time.monotonic()
            for out in events:
                c, t0 = sent[out.request_id]
                if out.token_ids and not answers[out.request_id]:
                    ttft[turn_of[c]].append(now - t0)
                answers[out.request_id].extend(out.token_ids)
                if out.finished:
                    history[c] += answers[out.request_id]
                    turn_of[c] += 1
                    if turn_of[c] < turns:
                        send(c)
    wall = time.monotonic() - start
    after = engine.stats()
    counts = dict(engine.prefix_cache.counts) if engine.prefix_cache is not None else {}
    engine.close()
    per_turn = {str(t + 1): {"ttft_p50_s": statistics.median(v), "ttft_p99_s": sorted(v)[int(0.99 * (len(v) - 1))]}
                for t, v in ttft.items() if v}
    first, last = per_turn.get("1"), per_turn.get(str(turns))
    later = [v["ttft_p50_s"] for t, v in per_turn.items() if t != "1"]
    return {
        "conversations": count, "turns": turns, "wall_s": wall, "ttft_by_turn": per_turn,
        "mean_ttft_p50_turns_2_on_s": statistics.mean(later) if later else None,
        # every request of turns 2 on, not one median a turn: a lockstep turn's median is one
        # request's TTFT, which moves with how the burst happened to be batched (note 31)
        "mean_ttft_turns_2_on_s": statistics.mean(x for t, v in ttft.items() if t > 0 for x in v) if turns > 1 else None,
        "last_over_first_ttft_p50": last["ttft_p50_s"] / first["ttft_p50_s"] if first and last else None,
        "prompt_tokens_offered": offered,
        "prefill_tokens_computed": after.prefill_tokens - before.prefill_tokens,
        "cached_tokens_device": after.prefix_hit_tokens_device - before.prefix_hit_tokens_device,
        "cached_tokens_host": after.prefix_hit_tokens_host - before.prefix_hit_tokens_host,
        "prefix_cache_counts": counts,   # evictions, copies down, blocks brought up, waits on a copy down
        "config": {k: v for k, v in config_kw.items()},
    }
