"""Preemption and SUSPEND/RESUME park K/V in host memory and embed them back: the final output
is exactly what an uninterrupted run gives (HF generate alone), and the host pool empties.
Runs on CPU here and, on the GPU machine, with real CUDA -> pinned-host copies."""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from engine.request import PreemptAction
from tests.conftest import drive, hf_reference, make_engine

PROMPTS = ["The capital of France is", "Once upon a time there", "1, 2, 3,", "Why is the sky blue?"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("layout", [dict(kv_layout="slab"), dict(kv_layout="paged", kv_page_size=16),
                                    dict(kv_layout="paged", kv_page_size=16, overlap_decode=True, decode_before_prefill=True)],
                         ids=["slab", "paged", "paged-overlap"])   # the last: CUDA's step order, on CPU too
@pytest.mark.parametrize("device", DEVICES)
def test_preemption_and_suspend_cycles_are_exact(tiny_model_dir, device, layout):
    loaded = model_loader.load(tiny_model_dir("llama"), torch.device(device), torch.float32)
    hf_model, tokenizer, _ = loaded
    engine, limits = make_engine(loaded, max_batch_size=2, max_seq_len=128, **layout)
    low = [GenerateInput(request_id=f"low{i}", prompt=PROMPTS[i], max_new_tokens=40, ignore_eos=True)
           for i in range(2)]
    high = [GenerateInput(request_id=f"high{i}", prompt=PROMPTS[2 + i], max_new_tokens=6, priority=5,
                          ignore_eos=True) for i in range(2)]
    host_bytes = []

    def poke(step, eng, out):
        host_bytes.append(eng.stats().kv_bytes_on_host)
        if step in (20, 30):
            return eng.preempt("low1", PreemptAction.SUSPEND)[1]
        if step in (24, 33):
            return eng.preempt("low1", PreemptAction.RESUME)[1]

    outputs = drive(engine, limits, {0: low, 5: [high[0]], 12: [high[1]]}, on_step=poke)
    stats = engine.stats()
    # two suspends and one or two preemptions by the high-priority arrivals: whether the second
    # arrival finds a row to take or a free one depends on where the arrivals fall between decode
    # steps, which CUDA's step order (decode before prefill, steady steps launched early) moves
    assert stats.preemptions >= 3
    assert stats.bytes_restored == stats.bytes_offloaded > 0
    assert max(host_bytes) > 0 and len(engine.parked) == 0
    assert stats.kv_bytes_on_host == 0 and stats.rows_parked == 0
    assert stats.kv_pages_used == 0   # every page came back (paged layout; 0 with the slab)
    reference_model = hf_model.cpu()
    for inp in low + high:
        expected = hf_reference(reference_model, tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
        assert outputs[inp.request_id].token_ids == expected, inp.request_id
    states = [e.state.name for e in outputs["low1"].events if e.state is not None]
    assert "SUSPENDED" in states and "PREEMPTED" in states or states.count("SUSPENDED") == 2
    assert outputs["high0"].final.stats.queued_seconds >= 0
    assert sum(outputs[f"low{i}"].final.stats.num_preemptions for i in range(2)) >= 3
    assert any(e.state is not None and e.state.name == "PREEMPTED"
               for i in range(2) for e in outputs[f"low{i}"].events)   # a preemption by priority
    if layout.get("overlap_decode"):   # the commands above met decodes launched early, and drained them
        assert stats.overlapped_steps > 0
