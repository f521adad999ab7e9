"""Prefix cache (--prefix-cache device|device+host): output with a cache hit equals output without
(HF `generate` alone, fp32 CPU, greedy), including after the cached K/V went to the host tier and
came back, with chunked prefill, and while the request the prefix came from is preempted or
cancelled; the block store keeps its invariants under random use.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from engine.prefix_cache import PrefixCache, block_hashes
from engine.request import PreemptAction
from tests.conftest import CPU, drive, hf_reference, make_engine

SYSTEM = ("You are a helpful assistant. Answer briefly, politely and accurately; when unsure, say so. "
          "Never invent facts. ") * 2


# ---- the block store (no model) ----------------------------------------------------------------
def _kv(tokens: list[int], block: int = 4) -> torch.Tensor:
    """K/V whose every value names its token (so a wrong block shows), [L=1, 2, H=1, n, D=2]."""
    t = torch.tensor(tokens, dtype=torch.float32)
    return t[None, None, None, :, None].expand(1, 2, 1, len(tokens), 2).clone()


def _cache(mode: str, device_blocks: int, host_blocks: int, block: int = 4, bring_up: float = 1.0) -> PrefixCache:
    block_bytes = 1 * 2 * 1 * block * 2 * 4
    return PrefixCache(mode, block, (1, 1, 2), torch.float32, CPU, device_blocks * block_bytes,
                       host_blocks * block_bytes, bring_up=bring_up)


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]     # same second block, different history
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], 4) == a[:1]     # only full blocks


def test_lookup_leaves_the_last_token_and_loads_the_right_values():
    cache = _cache("device", 8, 0)
    tokens = list(range(100, 112))                 # 3 blocks
    cache.insert(tokens, _kv(tokens))
    out = torch.zeros(1, 2, 1, 12, 2)
    hit = cache.load(tokens, out)                  # the whole prompt is cached: the last block is left
    assert (hit.tokens, hit.device_tokens, hit.host_tokens) == (8, 8, 0)
    assert torch.equal(out[..., :8, :], _kv(tokens)[..., :8, :]) and not out[..., 8:, :].any()
    assert cache.load(list(range(100, 106)) + [0] * 6, torch.zeros(1, 2, 1, 12, 2)).tokens == 4


def test_device_blocks_move_to_host_and_come_back():
    cache = _cache("device+host", 2, 4)
    first, second = list(range(10, 18)), list(range(50, 58))
    cache.insert(first, _kv(first))
    cache.insert(second, _kv(second))              # the device tier holds 2 blocks: `first` goes down
    assert cache.bytes_used()["host"] > 0
    out = torch.zeros(1, 2, 1, 9, 2)
    hit = cache.load(first + [1], out)
    assert (hit.tokens, hit.host_tokens) == (8, 8)
    assert torch.equal(out[..., :8, :], _kv(first))
    assert cache.load(first + [1], torch.zeros(1, 2, 1, 9, 2)).device_tokens == 8   # promoted
    cache.check()


def test_a_fraction_of_a_small_device_tier_still_brings_one_block_up():
    """A quarter of a 2-block device tier rounds to no block; it brings one up a load."""
    cache = _cache("device+host", 2, 4, bring_up=0.25)
    first, second = list(range(10, 18)), list(range(50, 58))
    cache.insert(first, _kv(first))
    cache.insert(second, _kv(second))              # `first` only in the host tier now
    assert cache.load(first + [1], torch.zeros(1, 2, 1, 9, 2)).host_tokens == 8
    again = cache.load(first + [1], torch.zeros(1, 2, 1, 9, 2))
    assert (again.device_tokens, again.host_tokens) == (4, 4)   # one of its two blocks came up
    cache.check()


def test_the_host_tier_holds_a_copy_of_every_new_block():
    """Write-through: a block new to the cache goes to the device tier and down to the host tier
    at once, so a full device tier drops its least recently used block (no copy then) and it
    comes back from host; a request's own K/V bring a block the host tier alone holds back up."""
    cache = _cache("device+host", 2, 8)
    first, second = list(range(10, 18)), list(range(50, 58))
    cache.insert(first, _kv(first))
    assert len(cache.device_tier.lru) == 2 and len(cache.host_tier.lru) == 2   # both tiers
    cache.insert(second, _kv(second))              # `first` dropped from the device tier only
    assert set(cache.device_tier.lru) == set(block_hashes(second, 4)) and len(cache.host_tier.lru) == 4
    cache.check()
    out = torch.zeros(1, 2, 1, 9, 2)
    hit = cache.load(first + [1], out)
    assert (hit.tokens, hit.host_tokens) == (8, 8) and torch.equal(out[..., :8, :], _kv(first))
    assert set(cache.device_tier.lru) == set(block_hashes(first, 4))   # brought up
    cache.insert(second + [7], _kv(second + [7]))  # a finished request's history: back up from its K/V
    assert set(cache.device_tier.lru) == set(block_hashes(second, 4)) and len(cache.host_tier.lru) == 4
    hit = cache.load(second + [1], torch.zeros(1, 2, 1, 9, 2))
    assert (hit.device_tokens, hit.host_tokens) == (8, 0)
    cache.check()


def test_without_bring_up_host_blocks_stay_in_host_and_new_ones_go_to_the_device():
    """prefix_cache_bring_up 0: a hit from the host tier, and a finished history holding a block
    the host tier alone has, leave that block in host memory; new blocks still go to the device
    tier (and down). The counts say what the tiers did."""
    cache = PrefixCache("device+host", 4, (1, 1, 2), torch.float32, CPU, 2 * 64, 8 * 64, bring_up=0.0)
    first, second = list(range(10, 18)), list(range(50, 58))
    cache.insert(first, _kv(first))
    cache.insert(second, _kv(second))              # `first` dropped from the device tier only
    out = torch.zeros(1, 2, 1, 9, 2)
    hit = cache.load(first + [1], out)
    assert (hit.tokens, hit.host_tokens) == (8, 8) and torch.equal(out[..., :8, :], _kv(first))
    cache.insert(first + [1, 2, 3, 4], _kv(first + [1, 2, 3, 4]))   # its history: one new block
    assert set(block_hashes(first, 4)).isdisjoint(cache.device_tier.lru)
    assert block_hashes(first + [1, 2, 3, 4], 4)[2] in cache.device_tier.lru
    assert cache.load(first + [1], torch.zeros(1, 2, 1, 9, 2)).host_tokens == 8
    assert cache.counts == {"evictions": 3, "copies_down": 5, "brought_up": 0, "waits_on_copy_down": 0}
    cache.check()


def test_bring_up_at_most_a_fraction_of_the_device_tier_a_request():
    """prefix_cache_bring_up 0.5 with a device tier of 4 blocks: a load of 4 host-only blocks, and
    a finished history holding 4 of them, each bring at most 2 back up (the first ones)."""
    cache = PrefixCache("device+host", 4, (1, 1, 2), torch.float32, CPU, 4 * 64, 16 * 64, bring_up=0.5)
    first, second = list(range(10, 26)), list(range(50, 66))      # 4 blocks each
    cache.insert(first, _kv(first))
    cache.insert(second, _kv(second))              # `first` is in the host tier alone
    out = torch.zeros(1, 2, 1, 17, 2)
    assert cache.load(first + [1], out).host_tokens == 16 and torch.equal(out[..., :16, :], _kv(first))
    assert cache.counts["brought_up"] == 2
    assert [h in cache.device_tier.lru for h in block_hashes(first, 4)] == [True, True, False, False]
    cache.insert(second, _kv(second))   # its first 2 blocks had been dropped: back up, dropping its last 2
    assert cache.counts["brought_up"] == 4
    assert [h in cache.device_tier.lru for h in block_hashes(second, 4)] == [True, True, False, False]
    with pytest.raises(ValueError, match="prefix_cache_bring_up"):
        PrefixCache("device+host", 4, (1, 1, 2), torch.float32, CPU, 64, 64, bring_up=1.5)
    from engine.config import EngineConfig
    with pytest.raises(ValueError, match="prefix_cache_bring_up"):
        EngineConfig(device="cpu", prefix_cache_bring_up=-0.1)
    cache.check()


@pytest.mark.parametrize("seed", range(6))
def test_random_use_keeps_invariants_and_returns_what_was_inserted(seed):
    rng = random.Random(seed)
    cache = _cache(rng.choice(["device", "device+host"]), rng.randint(0, 5), rng.randint(0, 6))
    prefixes = [[rng.randint(1, 5) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    for _ in range(200):
        tokens = rng.choice(prefixes) + [rng.randint(1, 5) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.5:
            cache.insert(tokens, _kv(tokens))
        else:
            out = torch.full((1, 2, 1, len(tokens), 2), -1.0)
            hit = cache.load(tokens, out)
            assert hit.tokens <= len(tokens) - 1 and hit.tokens % 4 == 0
            assert torch.equal(out[..., :hit.tokens, :], _kv(tokens)[..., :hit.tokens, :])
        cache.check()


# ---- exactness (model) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)


def _expect(loaded, prompt: str, n: int) -> list[int]:
    hf_model, tokenizer, _ = loaded
    return hf_reference(hf_model, tokenizer(prompt)["input_ids"], n, ())


LAYOUTS = {"slab": dict(kv_layout="slab", kv_page_size=16), "paged": dict(kv_layout="paged", kv_page_size=16),
           # misses prefilled straight into pages, hits' rests on the same kernels (engine/fused_prefill.py)
           "packed": dict(kv_layout="paged", kv_page_size=16, fused_decode=True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode, device_blocks, chunk, bring_up", [("device", 1000, 0, 1.0), ("device+host", 3, 0, 1.0),
                                                                 ("device+host", 3, 12, 1.0),
                                                                 ("device+host", 3, 0, 0.0)],
                         ids=["device", "host-tier", "host-tier-chunked", "host-tier-no-bring-up"])
def test_cache_hits_give_the_same_tokens(tiny, layout, mode, device_blocks, chunk, bring_up):
    """Three conversations sharing a system prompt, then the first one's second turn (its history
    with the model's own answer). With a device tier of 3 blocks, blocks go to host and back (or,
    without bringing up, stay there)."""
    _, _, spec = tiny
    engine, limits = make_engine(tiny, max_batch_size=3, max_seq_len=256, prefix_cache=mode,
                                 prefix_cache_device_bytes=device_blocks * block_bytes(spec.num_layers,
                                                                                       spec.num_kv_heads, spec.head_dim),
                                 prefix_cache_host_bytes=1 << 24, prefill_chunk_tokens=chunk,
                                 prefix_cache_bring_up=bring_up, **LAYOUTS[layout])
    three_conversations(engine, limits, tiny, host_tier=mode == "device+host")


@pytest.mark.parametrize("chunk", [0, 12])
def test_cache_hits_through_the_chunk_graph(tiny, chunk):
    """The conversations with the rests after cached prefixes (and chunks) through the chunk
    graphs' forward (fused_prefill.StaticChunk, eager on CPU): the cached prefix is loaded into
    its workspace, from the device tier and the host tier, and the tokens equal HF generate."""
    from tests.test_fused_prefill import _with_chunk_graph
    _, _, spec = tiny
    engine, limits = make_engine(tiny, max_batch_size=3, max_seq_len=256, prefix_cache="device+host",
                                 prefix_cache_device_bytes=3 * block_bytes(spec.num_layers, spec.num_kv_heads,
                                                                           spec.head_dim),
                                 prefix_cache_host_bytes=1 << 24, prefill_chunk_tokens=chunk, **LAYOUTS["packed"])
    static, used = _with_chunk_graph(engine, 64)
    three_conversations(engine, limits, tiny, host_tier=True)
    assert any(start for _, _, start in used), "no rest after a cached prefix went through the chunk graph"
    assert not static.held and not engine._partial


def test_a_prompt_starting_its_chunks_keeps_the_chunk_workspace_from_a_hit(tiny):
    """A step with a cache hit (a whole prompt) and a long prompt starting its chunks: the long
    prompt gets the chunk graphs' workspace (it needs it for several steps; the hit for one)."""
    from engine.request import Request, SamplingParams
    from tests.test_fused_prefill import _with_chunk_graph
    engine, _ = make_engine(tiny, max_batch_size=3, max_seq_len=256, prefix_cache="device", prefill_chunk_tokens=64,
                            **LAYOUTS["packed"])
    static, used = _with_chunk_graph(engine, 64)
    first = list(range(20, 60))                                        # 40 tokens: 2 blocks of 16
    engine.add_request(Request("a", first, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    engine.add_request(Request("hit", first + [7, 8, 9], SamplingParams(max_new_tokens=2, ignore_eos=True)))
    engine.add_request(Request("long", list(range(100, 200)), SamplingParams(max_new_tokens=2, ignore_eos=True)))
    engine.step()
    assert engine.stats().prefix_hit_tokens_device == 32
    assert static.holds(engine._partial["long"]) and "hit" not in engine._partial
    while engine.has_work():
        engine.step()
    assert [(T, c, start) for T, c, start in used] == [(64, 21, 0), (64, 64, 21), (64, 15, 85)]
    assert not static.held


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cache_hits_with_decode_launched_before_prefill(tiny, layout):
    """The same conversations with the step order CUDA uses (decode_before_prefill: the running
    rows' decode is issued before the step's prefill, which here includes cache hits, host-tier
    restores and chunks)."""
    _, _, spec = tiny
    engine, limits = make_engine(tiny, max_batch_size=3, max_seq_len=256, prefix_cache="device+host",
                                 prefix_cache_device_bytes=3 * block_bytes(spec.num_layers, spec.num_kv_heads,
                                                                           spec.head_dim),
                                 prefix_cache_host_bytes=1 << 24, prefill_chunk_tokens=12, decode_before_prefill=True,
                                 **LAYOUTS[layout])
    assert engine.decode_before_prefill
    three_conversations(engine, limits, tiny, host_tier=True)


def block_bytes(layers: int, kv_heads: int, head_dim: int) -> int:
    """One 16-token block of fp32 K/V."""
    return layers * 2 * kv_heads * 16 * head_dim * 4


def three_conversations(engine, limits, loaded, host_tier: bool) -> None:
    """Drive the conversations of test_cache_hits_give_the_same_tokens through `engine` (also a
    tensor-parallel one, tests/test_tensor_parallel.py) and check them against HF `generate`."""
    tokenizer = loaded[1]
    prompts = [SYSTEM + "What is the capital of France?", SYSTEM + "Name a prime number.",
               SYSTEM + "Why is the sky blue?"]
    arrivals = {0: [GenerateInput(request_id="a", prompt=prompts[0], max_new_tokens=20, ignore_eos=True)],
                3: [GenerateInput(request_id="b", prompt=prompts[1], max_new_tokens=12, ignore_eos=True)],
                30: [GenerateInput(request_id="c", prompt=prompts[2], max_new_tokens=12, ignore_eos=True)]}
    first = drive(engine, limits, arrivals)
    answer = tokenizer.decode(first["a"].token_ids)
    turn2 = prompts[0] + answer + " And of Italy?"
    second = drive(engine, limits, {0: [GenerateInput(request_id="a2", prompt=turn2, max_new_tokens=10,
                                                      ignore_eos=True)]})
    for rid, prompt, n in (("a", prompts[0], 20), ("b", prompts[1], 12), ("c", prompts[2], 12)):
        assert first[rid].token_ids == _expect(loaded, prompt, n), rid
    assert second["a2"].token_ids == _expect(loaded, turn2, 10)
    usage_b, usage_a2 = first["b"].final, second["a2"].final
    system_blocks = len(tokenizer(SYSTEM)["input_ids"]) // 16 * 16
    assert usage_b.cached_prompt_tokens >= system_blocks - 16      # the shared system prompt
    assert usage_a2.cached_prompt_tokens > len(tokenizer(prompts[0])["input_ids"]) // 16 * 16 - 16  # + turn 1
    stats = engine.stats()
    assert stats.prefix_hit_tokens_device + stats.prefix_hit_tokens_host >= usage_b.cached_prompt_tokens
    if host_tier:
        assert stats.prefix_hit_tokens_host > 0 and stats.prefix_bytes_host > 0
    engine.prefix_cache.check()
    assert engine.stats().kv_pages_used == 0 and engine._partial == {}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hit_while_the_prefix_owner_is_suspended_then_cancelled(tiny, layout):
    engine, limits = make_engine(tiny, max_batch_size=3, max_seq_len=256, prefix_cache="device+host",
                                 prefix_cache_device_bytes=1 << 24, **LAYOUTS[layout])
    p_owner, p_other = SYSTEM + "Tell me a long story.", SYSTEM + "Count to ten."
    arrivals = {0: [GenerateInput(request_id="owner", prompt=p_owner, max_new_tokens=60, ignore_eos=True)],
                4: [GenerateInput(request_id="other", prompt=p_other, max_new_tokens=15, ignore_eos=True)]}

    def commands(step, eng, out):
        if step == 3:
            return eng.preempt("owner", PreemptAction.SUSPEND)[1]
        if step == 6:
            return eng.abort("owner")

    outputs = drive(engine, limits, arrivals, on_step=commands)
    assert outputs["owner"].final.finish_reason.name == "CANCELLED"
    assert outputs["other"].final.cached_prompt_tokens > 0
    assert outputs["other"].token_ids == _expect(tiny, p_other, 15)


# ---- host copies in flight across steps (CUDA's async loads, simulated) ------------------------
def _slow_link(engine, monkeypatch, polls: int = 3) -> list[str]:
    """Make the engine's prefix cache report each load with host blocks as still in flight for its
    first `polls` `loaded` checks, as CUDA's copy stream does (on CPU the copies are synchronous,
    so the data is already right: this exercises the engine's and scheduler's holding of those
    requests). -> the ids held, in order."""
    from engine.prefix_cache import PrefixCache
    cache, left, held = engine.prefix_cache, {}, []
    monkeypatch.setattr(PrefixCache, "async_loads", property(lambda self: True))
    load, hold = cache.load, engine.scheduler.hold

    def slow_load(prompt_ids, out, key=""):
        hit = load(prompt_ids, out, key)
        if hit.host_tokens:
            left[key] = polls
        return hit

    def loaded(key):
        left[key] = left.get(key, 0) - 1
        return left[key] < 0

    def recording_hold(request):
        held.append(request.request_id)
        hold(request)
    monkeypatch.setattr(cache, "load", slow_load)
    monkeypatch.setattr(cache, "loaded", loaded)
    monkeypatch.setattr(engine.scheduler, "hold", recording_hold)
    return held


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_host_hits_held_until_their_copies_land(tiny, layout, monkeypatch):
    """Requests whose cached prefix comes from the host tier wait, admitted, for their copies
    while the engine decodes and prefills others, then are prefilled: the same tokens as HF
    generate; two such requests of one step (the second held past it), and the conversations."""
    _, _, spec = tiny
    engine, limits = make_engine(tiny, max_batch_size=4, max_seq_len=256, prefix_cache="device+host",
                                 prefix_cache_device_bytes=1 * block_bytes(spec.num_layers, spec.num_kv_heads,
                                                                           spec.head_dim),
                                 prefix_cache_host_bytes=1 << 24, **LAYOUTS[layout])
    held = _slow_link(engine, monkeypatch)
    three_conversations(engine, limits, tiny, host_tier=True)
    assert held, "no request was held for its host blocks"
    prompts = {f"q{i}": SYSTEM + q for i, q in enumerate(("Count to five.", "Name two colours.", "Say hello."))}
    outputs = drive(engine, limits, {0: [GenerateInput(request_id=rid, prompt=p, max_new_tokens=8, ignore_eos=True)
                                         for rid, p in prompts.items()]})
    for rid, prompt in prompts.items():
        assert outputs[rid].token_ids == _expect(tiny, prompt, 8), rid
    assert {"q0", "q1", "q2"} <= set(held) and not engine._loading and not engine.scheduler.loading
    engine.prefix_cache.check()
    assert engine.stats().kv_pages_used == 0 and engine._partial == {}


@pytest.mark.parametrize("action", ["cancel", "suspend"])
def test_a_held_request_cancelled_or_suspended(tiny, action, monkeypatch):
    """A request held for its host blocks is cancelled, or SUSPENDed and RESUMEd, before its
    copies land: its partial K/V and pending load go, nobody else is affected, and a resumed one
    is loaded again and gives HF generate's tokens."""
    _, _, spec = tiny
    engine, limits = make_engine(tiny, max_batch_size=4, max_seq_len=256, prefix_cache="device+host",
                                 prefix_cache_device_bytes=1 * block_bytes(spec.num_layers, spec.num_kv_heads,
                                                                           spec.head_dim),
                                 prefix_cache_host_bytes=1 << 24, **LAYOUTS["paged"])
    held = _slow_link(engine, monkeypatch, polls=50)
    warm, new, late = SYSTEM + "Warm the cache.", "A different prompt entirely, with no shared prefix.", SYSTEM + "Go."
    drive(engine, limits, {0: [GenerateInput(request_id="warm", prompt=warm, max_new_tokens=2, ignore_eos=True)]})
    state = {}

    def commands(step, eng, out):
        if step == 1 and "late" in eng._loading:   # held behind `new`, a whole prompt of the same step
            state["held"] = True
            if action == "cancel":
                return eng.abort("late")
            return eng.preempt("late", PreemptAction.SUSPEND)[1]
        if step == 2 and action == "suspend":
            assert "late" not in eng._loading and "late" not in eng._partial
            return eng.preempt("late", PreemptAction.RESUME)[1]

    outputs = drive(engine, limits, {0: [GenerateInput(request_id="new", prompt=new, max_new_tokens=6, ignore_eos=True),
                                         GenerateInput(request_id="late", prompt=late, max_new_tokens=6, ignore_eos=True)]},
                    on_step=commands)
    assert state.get("held") and "late" in held
    assert outputs["new"].token_ids == _expect(tiny, new, 6)
    if action == "cancel":
        assert outputs["late"].final.finish_reason.name == "CANCELLED"
    else:
        assert outputs["late"].token_ids == _expect(tiny, late, 6) and held.count("late") == 2
    assert not engine._loading and not engine.scheduler.loading and engine._partial == {}
    engine.prefix_cache.check()
