"""Tensor parallelism on CPU (gloo, fp32): an engine sharded over 2 ranks gives the same greedy
tokens as the unsharded engine (TP 1) and as Hugging Face `generate` on each request alone,
through staggered arrivals, preemption (parking and restoring each rank's K/V shard) and
SUSPEND/RESUME; both K/V layouts, chunked prefill, the Llama/Qwen2/Mistral families.

Each case starts one follower process (rank 1) and makes this process rank 0 of a gloo group,
for the length of the case."""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.build import build_engine
from engine.config import EngineConfig
from engine.inputs import GenerateInput, Limits
from engine.request import PreemptAction, RequestState
from tests.conftest import CPU, drive, hf_reference, make_engine

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "1, 2, 3,",
           "Why is the sky blue? Explain it to a child in two sentences.", "def fibonacci(n):"]

CASES = [("llama", dict(kv_layout="slab")),
         ("qwen2", dict(kv_layout="slab", prefill_chunk_tokens=8)),
         ("mistral", dict(kv_layout="paged", kv_page_size=16))]
IDS = ["llama-slab", "qwen2-slab-chunked", "mistral-paged"]


def _scenario():
    """Staggered arrivals through two rows; the high-priority ones preempt the low ones, and
    low1 is suspended and resumed twice. -> (arrivals, on_step)."""
    low = [GenerateInput(request_id=f"low{i}", prompt=PROMPTS[i], max_new_tokens=20, ignore_eos=True)
           for i in range(2)]
    high = [GenerateInput(request_id=f"high{i}", prompt=PROMPTS[2 + i], max_new_tokens=6, priority=5,
                          ignore_eos=True) for i in range(2)]
    late = GenerateInput(request_id="late", prompt=PROMPTS[4], max_new_tokens=8, ignore_eos=True)

    suspended_at = []

    def poke(step, eng, out):   # suspend low1 twice while it runs (its row is parked), resume 3 steps later
        state = getattr(eng.scheduler.by_id.get("low1"), "state", None)
        if state == RequestState.SUSPENDED and \
                (step == suspended_at[-1] + 3 or not eng.has_work()):
            return eng.preempt("low1", PreemptAction.RESUME)[1]
        if step >= 6 and len(suspended_at) < 2 and state == RequestState.RUNNING \
                and (not suspended_at or step > suspended_at[-1] + 3):
            suspended_at.append(step)
            return eng.preempt("low1", PreemptAction.SUSPEND)[1]

    return {0: low, 4: [high[0]], 9: [high[1], late]}, poke


def _run(engine, limits):
    arrivals, poke = _scenario()
    outputs = drive(engine, limits, arrivals, on_step=poke)
    return arrivals, outputs


@pytest.mark.parametrize(("family", "layout"), CASES, ids=IDS)
def test_tp2_equals_tp1_and_hf(tiny_model_dir, family, layout):
    folder = tiny_model_dir(family)
    settings = dict(max_batch_size=2, max_seq_len=128, warmup=False, **layout)
    engine, info, tokenizer = build_engine(EngineConfig(model=folder, device="cpu", tensor_parallel=2, **settings))
    try:
        assert engine.shards is not None and "tensor parallel 2" in info.decode
        assert engine.slab.dims[1] == 1          # 2 kv heads over 2 ranks: one per rank
        limits = Limits(info.max_context_length, 256, 4096, info.vocab_size)
        arrivals, sharded = _run(engine, limits)
        stats = engine.stats()
        assert stats.preemptions >= 3 and stats.bytes_restored == stats.bytes_offloaded > 0
        assert len(engine.parked) == 0 and engine.slab.num_rows == 0
        if layout.get("prefill_chunk_tokens"):
            assert stats.prefill_chunks > 0
    finally:
        engine.close()
    loaded = model_loader.load(folder, CPU, torch.float32)   # unsharded
    single, single_limits = make_engine(loaded, **{k: v for k, v in settings.items() if k != "warmup"})
    _, unsharded = _run(single, single_limits)
    for inputs in arrivals.values():
        for inp in inputs:
            expected = hf_reference(loaded[0], tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            assert sharded[inp.request_id].token_ids == expected, f"{inp.request_id}: TP 2 differs from HF"
            assert unsharded[inp.request_id].token_ids == expected, f"{inp.request_id}: TP 1 differs from HF"
            assert sharded[inp.request_id].text == unsharded[inp.request_id].text
    states = {rid: [e.state.name for e in sharded[rid].events if e.state is not None] for rid in ("low0", "low1")}
    assert states["low1"].count("SUSPENDED") == 2               # each while it ran: its row was parked
    assert "PREEMPTED" in states["low0"] + states["low1"]       # and a priority arrival parked one


def test_config_refuses_what_tp_does_not_support(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel"):
        EngineConfig(tensor_parallel=0)
    with pytest.raises(ValueError, match="prefix_cache"):
        EngineConfig(tensor_parallel=2, prefix_cache="device")
