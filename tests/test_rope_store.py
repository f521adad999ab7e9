"""engine/rope_store.py: the paged decode step's rotary embedding and K/V write in one Triton
kernel. On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported, so in a process of its own): it must equal the four-kernel path it replaces, and the
engine with it must give HF generate's greedy tokens. The bf16 CUDA check is in tests/test_gpu.py."""
from __future__ import annotations

import pytest

from tests.conftest import interpreted

pytest.importorskip("triton")


def _kernel_equals_the_four_kernels() -> None:
    import torch

    from engine.fused_decode import _qkv_split_rotary
    from engine.rope_store import rope_store
    torch.manual_seed(0)
    b, hq, hkv, d, slots_in_pool = 5, 4, 2, 16, 40
    qkv = torch.randn(b, (hq + 2 * hkv) * d)
    angle = torch.rand(b, d // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    pool, expected = torch.zeros(2, hkv, slots_in_pool, d), torch.zeros(2, hkv, slots_in_pool, d)
    slots = torch.tensor([[3, 9], [17, 9], [9, 9], [30, 9], [1, 9]])[:, 0]   # a column, as the step's inputs hold it
    q = rope_store()(qkv, cos, sin, pool, slots, hq, hkv, d)
    q_ref, k_ref, v_ref = _qkv_split_rotary(qkv, cos, sin, hq, hkv, d)
    expected[0].index_copy_(1, slots, k_ref[:, :, 0].transpose(0, 1))
    expected[1].index_copy_(1, slots, v_ref[:, :, 0].transpose(0, 1))
    assert torch.equal(q, q_ref) and torch.equal(pool, expected)


def _engine_with_it_equals_hf() -> None:
    """The built-in model (real weights: a tiny random model's greedy tokens hardly depend on the
    attention, and passed with k left unrotated)."""
    import torch

    from engine import model_loader
    from engine.inputs import GenerateInput
    from tests.conftest import CPU, drive, hf_reference, make_engine
    loaded = model_loader.load(None, CPU, torch.float32)
    engine, limits = make_engine(loaded, kv_layout="paged", kv_page_size=16, fused_decode=True,
                                 fused_rope_store=True)
    fused = engine.runner.fused
    assert fused.rope_store is not None
    calls, kernel = [0], fused.rope_store

    def counted(*args):
        calls[0] += 1
        return kernel(*args)
    fused.rope_store = counted
    prompts = {0: ["The capital of France is"], 1: ["Once upon a time, in a land far away, there lived a"]}
    arrivals = {step: [GenerateInput(request_id=f"{step}-{i}", prompt=p, max_new_tokens=4, ignore_eos=True)
                       for i, p in enumerate(ps)] for step, ps in prompts.items()}
    out = drive(engine, limits, arrivals)
    hf_model, tokenizer, _spec = loaded
    for step, ps in prompts.items():
        for i, p in enumerate(ps):
            expected = hf_reference(hf_model, tokenizer(p)["input_ids"], 4, ())
            assert out[f"{step}-{i}"].token_ids == expected, f"{step}-{i} differs from HF generate"
    assert calls[0] >= 2 * len(fused.layers)   # decode steps went through the kernel, every layer


def test_rope_store_kernel_equals_rotary_and_index_copies():
    interpreted("tests.test_rope_store", "_kernel_equals_the_four_kernels")


def test_engine_with_rope_store_matches_hf():
    interpreted("tests.test_rope_store", "_engine_with_it_equals_hf")
