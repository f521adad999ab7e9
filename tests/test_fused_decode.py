"""The fused decode step (engine/fused_decode.py) computes what the HF forward computes.

On CPU it runs uncompiled (the same functions Inductor fuses on CUDA), in fp32, so greedy tokens
must equal HF generate's exactly; tests/test_gpu.py checks the compiled CUDA path the same way.
"""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.fused_decode import FusedDecoder, _qkv_split_rotary, _silu_mul, unsupported_reason
from tests.conftest import CPU, drive, make_engine
from tests.test_engine_exact import _arrivals, _check_against_hf


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def loaded(request, tiny_model_dir):
    return model_loader.load(tiny_model_dir(request.param), CPU, torch.float32)


def test_fused_engine_matches_hf_generate(loaded):
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=128, fused_decode=True)
    assert engine.runner.fused is not None
    arrivals = _arrivals(lengths=[20, 35, 8, 16, 27, 5], steps=[0, 1, 2, 4, 4, 13], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)


def test_fused_step_logits_equal_hf_step(loaded):
    """One decode step of a ragged batch: fused and HF forwards give the same logits and write the
    same K/V column."""
    engine, _ = make_engine(loaded, max_batch_size=3, max_seq_len=64, fused_decode=True)
    runner, slab = engine.runner, engine.slab
    L, two, S, H, T, D = slab.data.shape
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((5, 17, 9)):
        slab.add_row(f"r{i}", torch.randn(L, two, H, n, D, generator=g))
    lo, hi = slab.prepare_decode()
    args = (torch.tensor([[11], [12], [13]]), torch.tensor(slab.lengths)[:, None], slab.decode_mask(lo, hi),
            3, lo, hi, torch.tensor([slab.write_col]))
    fused_logits = runner.forward_decode(*args)
    fused_kv = slab.data[:, :, :3, :, slab.write_col].clone()
    slab.data[:, :, :3, :, slab.write_col] = 0
    fused, runner.fused = runner.fused, None
    hf_logits = runner.forward_decode(*args)
    runner.fused = fused
    torch.testing.assert_close(fused_logits, hf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_kv, slab.data[:, :, :3, :, slab.write_col], rtol=1e-5, atol=1e-5)


def test_fusing_shares_the_weights(loaded):
    """q/k/v and gate/up become views of the fused tensors: no second copy of the weights."""
    model = loaded[0]
    before = sum(p.numel() for p in model.parameters())
    fused = FusedDecoder(model)
    attn = model.model.layers[0].self_attn
    qkv = fused.layers[0].qkv_w
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.out_features:].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


def test_unsupported_models_fall_back(tiny_model_dir):
    gpt2 = model_loader.load(tiny_model_dir("gpt2"), CPU, torch.float32)
    assert "gpt2" in unsupported_reason(gpt2[0])
    with pytest.raises(ValueError, match="gpt2"):
        make_engine(gpt2, fused_decode=True)
    engine, _ = make_engine(gpt2)               # auto: HF forward
    assert engine.runner.fused is None


def test_serve_refuses_bad_engine_flags_before_loading_the_model(capsys, monkeypatch):
    from service.cli import main
    monkeypatch.setattr("service.logs.configure", lambda level="info": None)
    for argv, field in ((["--decode", "fast"], "--decode"), (["--device", "tpu"], "device"),
                        (["--max-batch-size", "0"], "max_batch_size")):
        assert main(["serve", "--port", "0", *argv]) == 2, argv
        assert field in capsys.readouterr().err, argv


def test_compile_failure_falls_back_to_uncompiled(loaded, monkeypatch):
    """A machine where torch.compile cannot build kernels still serves, with the same functions
    uncompiled (the failure shows at the first call, so FusedDecoder makes that call itself)."""
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = FusedDecoder(loaded[0], compile=True)
    assert not fused.compiled
    assert (fused.qkv_rotary, fused.silu_mul) == (_qkv_split_rotary, _silu_mul)


def test_fused_paged_engine_matches_hf_generate(loaded):
    """The paged layout's fused step (FlexAttention over each row's own pages, uncompiled on CPU)
    gives HF generate's tokens through staggered arrivals and removal."""
    from engine.inputs import GenerateInput
    from tests.conftest import drive, hf_reference
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=128, fused_decode=True,
                                 kv_layout="paged", kv_page_size=16)
    assert engine.runner.paged is not None
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "1, 2, 3,",
               "Why is the sky blue?"]
    lengths, steps = [20, 35, 8, 16], [0, 1, 2, 4]
    arrivals: dict = {}
    for i, (p, n, step) in enumerate(zip(prompts, lengths, steps)):
        arrivals.setdefault(step, []).append(GenerateInput(request_id=f"r{i}", prompt=p, max_new_tokens=n,
                                                           ignore_eos=True))
    outputs = drive(engine, limits, arrivals)
    hf_model, tokenizer, _ = loaded
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert outputs[f"r{i}"].token_ids == hf_reference(hf_model, tokenizer(p)["input_ids"], n, ()), i
    assert engine.stats().kv_pages_used == 0


def test_compiled_pieces_never_recompile(tiny_model_dir):
    """The compiled point-wise pieces are traced at start (1 token, then the dynamic code), so no
    token count a later step, prefill or chunk brings makes dynamo trace again: a recompile mid-run
    stalls every stream for seconds (docs/benchmarks.md note 25). The sizes include the ones that
    equal a model dimension (duck shaping would take them for one symbol) and 1 (specialised)."""
    from torch._dynamo.utils import counters
    model = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)[0]
    fused = FusedDecoder(model, compile=True)
    if not fused.compiled:
        pytest.skip("torch.compile cannot build kernels on this machine")
    traced = counters["stats"]["unique_graphs"]
    hq, hkv, d = fused.num_heads, fused.num_kv_heads, fused.head_dim
    qkv_width, gate_up_width = fused.layers[0].qkv_w.shape[0], fused.layers[0].gate_up_w.shape[0]
    sizes = sorted({1, 2, 3, 5, 37, 512, hq, hkv, d, hq * d, qkv_width, gate_up_width // 2, gate_up_width})
    for inference in (True, False):   # steps and prefills run under inference_mode; the slab's graph capture not
        with torch.inference_mode(inference):
            for n in sizes:
                qkv, cos, sin = torch.randn(n, qkv_width), torch.randn(n, d), torch.randn(n, d)
                for got, want in zip(fused.qkv_rotary(qkv, cos, sin, hq, hkv, d),
                                     _qkv_split_rotary(qkv, cos, sin, hq, hkv, d)):
                    torch.testing.assert_close(got, want)
                gate_up = torch.randn(n, gate_up_width)
                torch.testing.assert_close(fused.silu_mul(gate_up), _silu_mul(gate_up))
    assert counters["stats"]["unique_graphs"] == traced, "a token count recompiled the fused pieces"


def test_decode_split_kv_reaches_the_paged_attention(tiny_model_dir):
    """EngineConfig.decode_split_kv becomes flex's SPLIT_KV in the fused paged step (where the
    benchmarks compare it, on CUDA), beside the default num_stages (BLOCK_N 128 does not divide
    these pages of 16, so it is left to flex), and the engine still gives HF generate's tokens;
    with every setting 0 flex chooses alone."""
    from tests.test_engine_exact import _check_against_hf as check
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=128, fused_decode=True,
                                 kv_layout="paged", kv_page_size=16, decode_split_kv=4)
    assert engine.runner.paged.attention.kernel_options == {"SPLIT_KV": 4, "num_stages": 2}
    arrivals = _arrivals(lengths=[20, 35, 8, 16], steps=[0, 1, 2, 4], ignore_eos=True)
    check(loaded, engine, drive(engine, limits, arrivals), arrivals)
    own, _ = make_engine(loaded, max_batch_size=2, max_seq_len=64, fused_decode=True,
                         kv_layout="paged", kv_page_size=16, decode_num_stages=0, decode_kv_block=0)
    assert own.runner.paged.attention.kernel_options is None


def _paged_rows(tiny_model_dir, lengths: list[int], seed: int):
    """A fused paged engine (tiny Llama, pages of 16, up to 8 rows) holding rows r0.. of random K/V
    of these lengths. -> (its PagedKV, its PagedDecoder)."""
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, _ = make_engine(loaded, max_batch_size=8, max_seq_len=128, fused_decode=True,
                            kv_layout="paged", kv_page_size=16)
    kv = engine.slab
    L, H, D = kv.dims
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lengths):
        kv.add_row(f"r{i}", torch.randn(L, 2, H, n, D, generator=g))
    return kv, engine.runner.paged


def test_paged_step_runs_rows_longest_first_with_the_same_results(tiny_model_dir):
    """The paged step runs its rows longest first (flex's decode programs are launched in row
    order, so a long row that starts last sets the layer's time: note 27) and hands back logits
    and writes K/V in the rows' own order: the same as the step in row order."""
    lengths = [9, 40, 17, 33, 2]   # out of order, across page boundaries
    kv, paged = _paged_rows(tiny_model_dir, lengths, seed=3)
    ids = [11, 23, 5, 42, 7]
    data, before = kv.data.clone(), list(kv.lengths)
    results = {}
    for sort in (True, False):
        kv.data.copy_(data)
        kv.lengths = list(before)
        paged.sort_rows = sort
        logits = paged.decode(ids)
        if sort:   # the attention's tables hold the rows longest first
            assert paged.attention.lengths[:len(lengths)].tolist() == sorted((n + 1 for n in lengths), reverse=True)
        results[sort] = (logits.clone(), [kv.row_kv(f"r{i}").clone() for i in range(len(lengths))])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert kv.lengths == [n + 1 for n in lengths]


def test_paged_step_rows_that_leave_become_padding(tiny_model_dir):
    """The step's inputs live in one buffer rewritten each step; rows past the live ones take the
    padding template (length 0, write to the scratch slot). After a step of five rows, a step of
    two must leave the three former rows' K/V alone and give the two rows what a fresh decoder
    gives them (a template that a step had overwritten made former rows attend and write again)."""
    kv, paged = _paged_rows(tiny_model_dir, [9, 40, 17, 33, 2], seed=4)
    template = paged.padding.clone()
    paged.decode([11, 23, 5, 42, 7])
    assert torch.equal(paged.padding, template)
    for i in (4, 3, 2):
        kv.remove_row(f"r{i}")
    data = kv.data.clone()
    others = kv.data.clone()
    logits = paged.decode([3, 8])
    rows = [kv.row_kv(f"r{i}").clone() for i in range(2)]
    kv.data.copy_(data)
    kv.lengths = [n - 1 for n in kv.lengths]
    paged.padding.copy_(template)
    paged.inputs.copy_(template)
    fresh = paged.decode([3, 8])
    torch.testing.assert_close(logits, fresh, rtol=1e-6, atol=1e-6)
    for i, row in enumerate(rows):
        torch.testing.assert_close(kv.row_kv(f"r{i}"), row, rtol=1e-6, atol=1e-6)
    held = torch.zeros(kv.data.shape[3], dtype=torch.bool)   # slots of the two live rows
    for i in range(2):
        held[kv._slots(torch.arange(kv.lengths[i])[None], first_row=i)[0]] = True
    torch.testing.assert_close(kv.data[:, :, :, ~held], others[:, :, :, ~held])   # nothing else written


def test_fused_epilogues_drop_kernels_and_keep_the_tokens(tiny_model_dir):
    """fused_epilogues (the default): each residual add inside the o and down GEMMs (addmm_: two
    operations a layer fewer, each a kernel launch on CUDA) and each RMSNorm's scale inside
    rms_norm (on CUDA PyTorch's one fused kernel takes the weight; on CPU rms_norm decomposes, so
    no count shows it here), with the same logits in fp32 and the same greedy tokens as HF
    through the engine."""
    from engine.fused_decode import _rms_norm, _rms_norm_scaled
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.names = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engines = {on: make_engine(loaded, max_batch_size=3, max_seq_len=128, fused_decode=True, kv_layout="paged",
                               kv_page_size=16, fused_epilogues=on) for on in (True, False)}
    fused = {on: engine.runner.fused for on, (engine, _) in engines.items()}
    assert fused[True].residual_in_gemm and not fused[False].residual_in_gemm
    assert (fused[True].norm, fused[False].norm) == (_rms_norm_scaled, _rms_norm)
    ids, positions = torch.randint(5, 200, (5, 1)), torch.arange(5)[:, None]

    def attend(layer, q, k, v):   # any attention will do: the epilogues are around it
        return q.reshape(q.shape[0], -1)

    counts, logits, names = {}, {}, {}
    for on in (True, False):
        with Count() as mode:
            logits[on] = fused[on](ids, positions, attend)
        counts[on], names[on] = mode.ops, mode.names
    assert counts[False] - counts[True] == 2 * len(fused[True].layers), counts
    # in place: an out-of-place addmm first copies the residual into its result on CUDA (a kernel
    # more a GEMM, pytorch/pytorch#153590)
    assert names[True].count("addmm_.default") == 2 * len(fused[True].layers) and "addmm.default" not in names[True]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    engine, limits = engines[True]
    arrivals = _arrivals(lengths=[20, 35, 8, 16], steps=[0, 1, 2, 4], ignore_eos=True)
    _check_against_hf(loaded, engine, drive(engine, limits, arrivals), arrivals)


def test_tensor_parallel_fused_all_reduce_plumbing(tiny_model_dir):
    """Under tensor parallelism the step hands each row-parallel partial output, its residual and
    the next norm's weight to the fused all-reduce + add + RMSNorm (engine/allreduce_norm.py, CUDA)
    where it serves the rows, and sums with the plain all-reduce, then adds and normalises, where it
    returns None (a packed prefill's rows beyond the decode batch). One rank on CPU: a stand-in
    with the kernel's contract (the sum over one rank is the partial itself) gives the logits of
    the step without tensor parallelism, and each path is taken exactly where it should be."""
    from engine.fused_decode import _rms_norm
    from engine.tensor_parallel import LocalShards
    model = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)[0]

    def attend(layer, q, k, v):   # any attention will do: the reductions are around it
        return q.reshape(q.shape[0], -1)
    fused_rows, reduced = [], []

    def all_reduce_add_norm(partial, residual, weight, eps):
        if partial.shape[0] > 3:
            return None
        fused_rows.append(partial.shape[0])
        x = residual + partial
        return x, _rms_norm(x, weight, eps)

    def all_reduce(partial):
        reduced.append(partial.shape[0])
        return partial
    reference = FusedDecoder(model)
    model._baton_tp = LocalShards(all_reduce, False, all_reduce_add_norm)
    try:
        sharded = FusedDecoder(model)
    finally:
        del model._baton_tp
    assert not sharded.residual_in_gemm and sharded.reduce_add_norm is all_reduce_add_norm
    layers = len(sharded.layers)
    for rows, fused_calls, plain_calls in ((3, 2 * layers, 0), (5, 0, 2 * layers)):
        fused_rows.clear(), reduced.clear()
        ids, positions = torch.randint(5, 200, (rows, 1)), torch.arange(rows)[:, None]
        got = sharded(ids, positions, attend)
        assert (len(fused_rows), len(reduced)) == (fused_calls, plain_calls)
        torch.testing.assert_close(got, reference(ids, positions, attend), rtol=1e-5, atol=1e-5)
