"""CUDA checks (skipped without a GPU; run on the device machine):
- fp32 on CUDA, eager and CUDA-graph decode, staggered arrivals: equal to HF generate alone;
- preemption with real CUDA -> pinned-host copies: tests/test_engine_preemption.py (device cuda);
- bf16: the CUDA-graph path gives the same greedy tokens as the eager path of the same engine;
- each for the HF forward and for the fused, compiled decode step (engine/fused_decode.py).
"""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from tests.conftest import drive, hf_reference, make_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
PROMPTS = ["The capital of France is", "Once upon a time there", "1, 2, 3,", "Why is the sky blue?",
           "def main():", "Water boils at"]


def _arrivals(n_tokens=(20, 35, 8, 16, 27, 5), steps=(0, 1, 2, 4, 4, 13), **kw):
    out: dict[int, list[GenerateInput]] = {}
    for i, (p, n, s) in enumerate(zip(PROMPTS, n_tokens, steps)):
        out.setdefault(s, []).append(GenerateInput(request_id=f"r{i}", prompt=p, max_new_tokens=n,
                                                   ignore_eos=True, **kw))
    return out


@pytest.fixture(scope="module")
def tiny_cuda(tiny_model_dir):
    return model_loader.load(tiny_model_dir("llama"), CUDA, torch.float32)


@pytest.mark.parametrize("fused", [False, True], ids=["hf-forward", "fused-compiled"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_fp32_matches_hf(tiny_cuda, graphs, fused):
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, limits = make_engine(tiny_cuda, max_batch_size=3, max_seq_len=128, cuda_graphs=graphs,
                                 fused_decode=fused)
    assert (engine.runner.fused is not None) == fused and (not fused or engine.runner.fused.compiled)
    arrivals = _arrivals()
    outputs = drive(engine, limits, arrivals)
    hf_model, tokenizer, _ = tiny_cuda
    for inputs in arrivals.values():
        for inp in inputs:
            expected = hf_reference(hf_model.cpu(), tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            hf_model.to(CUDA)
            assert outputs[inp.request_id].token_ids == expected, inp.request_id


@pytest.mark.parametrize("fused", [False, True], ids=["hf-forward", "fused-compiled"])
def test_bf16_graph_path_equals_eager_path(tiny_model_dir, fused):
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    results = []
    for graphs in (False, True):
        engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=256, cuda_graphs=graphs,
                                     fused_decode=fused)
        results.append({k: v.token_ids for k, v in drive(engine, limits, _arrivals(n_tokens=(60,) * 6)).items()})
    assert results[0] == results[1]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_fp32_paged_matches_hf(tiny_cuda, graphs):
    """The paged layout's fused step (compiled FlexAttention over each row's pages, CUDA graphs
    per row bucket) gives HF generate's tokens, and every page comes back."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, limits = make_engine(tiny_cuda, max_batch_size=3, max_seq_len=128, cuda_graphs=graphs,
                                 fused_decode=True, kv_layout="paged", kv_page_size=16)
    assert engine.runner.paged is not None and engine.runner.paged.attention.compiled
    arrivals = _arrivals()
    outputs = drive(engine, limits, arrivals)
    hf_model, tokenizer, _ = tiny_cuda
    for inputs in arrivals.values():
        for inp in inputs:
            expected = hf_reference(hf_model.cpu(), tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            hf_model.to(CUDA)
            assert outputs[inp.request_id].token_ids == expected, inp.request_id
    assert engine.stats().kv_pages_used == 0


def test_bf16_paged_graph_path_equals_eager_path(tiny_model_dir):
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    results = []
    for graphs in (False, True):
        engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=256, cuda_graphs=graphs,
                                     fused_decode=True, kv_layout="paged", kv_page_size=16)
        results.append({k: v.token_ids for k, v in drive(engine, limits, _arrivals(n_tokens=(60,) * 6)).items()})
    assert results[0] == results[1]
