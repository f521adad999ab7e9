"""CUDA checks (skipped without a GPU; run on the device machine):
- fp32 on CUDA, eager and CUDA-graph decode, staggered arrivals: equal to HF generate alone;
- preemption with real CUDA -> pinned-host copies: tests/test_engine_preemption.py (device cuda);
- bf16: the CUDA-graph path gives the same greedy tokens as the eager path of the same engine;
- each for the HF forward and for the fused, compiled decode step (engine/fused_decode.py), and
  for both K/V layouts (slab; paged: FlexAttention over each row's pages, or the gathered window).
"""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.inputs import GenerateInput
from tests.conftest import check_stops_on_tokens, chunk_pairs, drive, hf_reference, make_engine, without

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


LAYOUTS = [dict(kv_layout="slab"), dict(kv_layout="paged", kv_page_size=16)]


def _check_against_hf(loaded, arrivals, outputs) -> None:
    """Each request's tokens equal HF generate on it alone (the reference runs on the CPU)."""
    hf_model, tokenizer, _ = loaded
    for inputs in arrivals.values():
        for inp in inputs:
            expected = hf_reference(hf_model.cpu(), tokenizer(inp.prompt)["input_ids"], inp.max_new_tokens, ())
            hf_model.to(CUDA)
            assert outputs[inp.request_id].token_ids == expected, inp.request_id


@pytest.mark.parametrize("layout", LAYOUTS, ids=["slab", "paged"])
@pytest.mark.parametrize("fused", [False, True], ids=["hf-forward", "fused-compiled"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_fp32_matches_hf(tiny_cuda, graphs, fused, layout):
    """Paged and fused: compiled FlexAttention over each row's pages (CUDA graphs per row bucket);
    paged, HF forward: each row's tokens gathered into a padded window."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, limits = make_engine(tiny_cuda, max_batch_size=3, max_seq_len=128, cuda_graphs=graphs,
                                 fused_decode=fused, **layout)
    assert (engine.runner.fused is not None) == fused and (not fused or engine.runner.fused.compiled)
    arrivals = _arrivals()
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(tiny_cuda, arrivals, outputs)
    assert engine.stats().kv_pages_used == 0


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "overlap-only"])
def test_cuda_fp32_rows_stopping_on_a_token_match_hf(tiny_cuda, pipeline):
    """The CUDA defaults (fused paged step in graphs, the next decode launched from the sampled
    ids on the device before the host reads them): rows that stop on a token mid-batch drop their
    extra step, and every row keeps HF's tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, limits = make_engine(tiny_cuda, max_batch_size=4, max_seq_len=128, kv_layout="paged", kv_page_size=16,
                                 fused_decode=True, pipeline_decode=pipeline)
    assert engine.overlap_decode and engine.runner.paged is not None and engine.runner.paged.use_graphs
    check_stops_on_tokens(tiny_cuda, engine, limits, PROMPTS[:5])
    assert (engine.stats().pipelined_steps > 0) == pipeline


@pytest.mark.parametrize("layout", LAYOUTS, ids=["slab", "paged"])
def test_cuda_fp32_chunked_prefill_matches_hf(tiny_cuda, layout):
    """Chunks of 5 tokens (mid-page, mid-16-column block) beside CUDA-graph fused decode steps."""
    torch.backends.cuda.matmul.allow_tf32 = False
    engine, limits = make_engine(tiny_cuda, max_batch_size=3, max_seq_len=128, cuda_graphs=True,
                                 fused_decode=True, prefill_chunk_tokens=5, **layout)
    arrivals = _arrivals()
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(tiny_cuda, arrivals, outputs)
    assert engine.stats().prefill_chunks > 0 and engine.stats().kv_pages_used == 0


@pytest.mark.parametrize("layout", [dict(kv_layout="slab"), dict(kv_layout="paged")], ids=["slab", "paged"])
def test_cuda_fp32_prefix_cache_hits_match_hf(tiny_cuda, layout):
    """The prefix cache on CUDA (device tier of 2 blocks, host tier pinned, blocks copied down on
    a stream of their own): requests sharing a long prefix, hits from both tiers, the same tokens
    as HF generate alone."""
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = tiny_cuda[2]
    block_bytes = spec.num_layers * 2 * spec.num_kv_heads * 16 * spec.head_dim * 4
    engine, limits = make_engine(tiny_cuda, max_batch_size=3, max_seq_len=256, cuda_graphs=True, fused_decode=True,
                                 kv_page_size=16, prefix_cache="device+host", prefix_cache_device_bytes=2 * block_bytes,
                                 prefix_cache_host_bytes=1 << 24, **layout)
    assert engine.prefix_cache._copies is not None
    shared = "Once upon a time, in a land far away, there lived a king who had three daughters. " * 2
    arrivals = {0: [GenerateInput(request_id="a", prompt=shared + "The eldest", max_new_tokens=12, ignore_eos=True)],
                4: [GenerateInput(request_id="b", prompt=shared + "The youngest", max_new_tokens=12, ignore_eos=True)],
                20: [GenerateInput(request_id="c", prompt=shared + "The middle one", max_new_tokens=12,
                                   ignore_eos=True)]}
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(tiny_cuda, arrivals, outputs)
    stats = engine.stats()
    assert outputs["b"].final.cached_prompt_tokens > 0 and stats.prefix_hit_tokens_host > 0
    engine.prefix_cache.check()


@pytest.mark.parametrize("fused, layout", [(False, LAYOUTS[0]), (True, LAYOUTS[0]), (True, LAYOUTS[1])],
                         ids=["hf-forward", "fused-compiled", "paged-fused-compiled"])
def test_bf16_graph_path_equals_eager_path(tiny_model_dir, fused, layout):
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    results = []
    for graphs in (False, True):
        engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=256, cuda_graphs=graphs,
                                     fused_decode=fused, **layout)
        results.append({k: v.token_ids for k, v in drive(engine, limits, _arrivals(n_tokens=(60,) * 6)).items()})
    assert results[0] == results[1]


def test_bf16_packed_prefill_close_to_hf_prefill(tiny_model_dir):
    """The packed prefill in bf16 (varlen flash attention straight into pages) against the HF
    prefill of the same prompts: same first tokens, K/V and logits within bf16 rounding."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    engine, _ = make_engine(loaded, max_batch_size=4, max_seq_len=256, kv_layout="paged", kv_page_size=16,
                            fused_decode=True)
    runner, kv = engine.runner, engine.slab
    assert runner.packed is not None and runner.packed.varlen is not None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (17, 1, 140, 64)]
    ref = runner.prefill(prompts)
    logits = runner.packed.prefill(prompts, [f"r{i}" for i in range(len(prompts))])
    assert torch.equal(logits.argmax(-1), ref.logits.argmax(-1))
    torch.testing.assert_close(logits.float(), ref.logits.float(), rtol=0.05, atol=0.05)
    for i in range(len(prompts)):
        torch.testing.assert_close(kv.row_kv(f"r{i}").float(), ref.row_kv(i).float(), rtol=0.05, atol=0.05)


def test_bf16_packed_chunks_close_to_hf_chunks(tiny_model_dir):
    """A prompt prefilled in chunks on the fused kernels (lower-right causal SDPA over the partial
    K/V) against the HF forward's chunks: same argmax, logits and K/V within bf16 rounding."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    engine, _ = make_engine(loaded, max_batch_size=4, max_seq_len=256, kv_layout="paged", kv_page_size=16,
                            fused_decode=True)
    runner = engine.runner
    prompt = torch.randint(5, 200, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, ref = runner.new_partial_kv(len(prompt)), runner.new_partial_kv(len(prompt))
    for _end, logits, expected in chunk_pairs(runner, ours, ref, prompt, ((0, 37), (37, 100), (100, 150)),
                                              lambda: without(runner, "packed")):
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(logits.float(), expected.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(ours[..., :150, :].float(), ref[..., :150, :].float(), rtol=0.05, atol=0.05)


def test_bf16_mixed_forward_close_to_separate_forwards(tiny_model_dir):
    """One packed forward of whole prompts and chunks of other prompts (a step's prefill on the
    packed path) against the same work as separate forwards: same argmax, logits and K/V within
    bf16 rounding (varlen flash for the prompts, lower-right causal SDPA for the chunks)."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    engine, _ = make_engine(loaded, max_batch_size=8, max_seq_len=256, kv_layout="paged", kv_page_size=16,
                            fused_decode=True)
    runner, kv, packed = engine.runner, engine.slab, engine.runner.packed
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (23, 90)]
    long = torch.randint(5, 200, (120,), generator=g).tolist()
    mixed_partial, alone_partial = runner.new_partial_kv(len(long)), runner.new_partial_kv(len(long))
    packed.prefill_chunk(mixed_partial, long[:40], 0)   # an earlier chunk, the same for both
    alone_partial.copy_(mixed_partial)
    mixed = packed.prefill(prompts, ["m0", "m1"], [(mixed_partial, long[40:100], 40)])
    alone = torch.cat([packed.prefill(prompts, ["a0", "a1"]), packed.prefill_chunk(alone_partial, long[40:100], 40)])
    assert torch.equal(mixed.argmax(-1), alone.argmax(-1))
    torch.testing.assert_close(mixed.float(), alone.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(mixed_partial[..., :100, :].float(), alone_partial[..., :100, :].float(),
                               rtol=0.05, atol=0.05)
    for i in range(2):
        torch.testing.assert_close(kv.row_kv(f"m{i}").float(), kv.row_kv(f"a{i}").float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kernel_options", [None, {"num_stages": 2, "BLOCK_N": 64}, {"SPLIT_KV": 4},
                                            {"SPLIT_KV": 16, "BLOCK_N": 32}],
                         ids=["flex-default", "stages2-block-page", "split4", "split16-block32"])
def test_compiled_paged_decode_kernel_options_match_gathered_sdpa(kernel_options):
    """The compiled paged decode (Triton on CUDA) with flex's decode settings overridden, as
    benchmarks/probe_flex_decode.py compares them, still equals SDPA over each row's gathered K/V,
    and reads only the row's pages (NaN everywhere else)."""
    from engine.paged_attention import PagedDecodeAttention
    from tests.test_paged_attention import _pools, _reference, _tables
    gen = torch.Generator().manual_seed(5)
    ps, num_pages, max_pages, hq, hkv, d = 64, 32, 6, 8, 4, 16   # d: the D of test_paged_attention's pools
    lengths = [1, 64, 100, 330, 0, 77]
    table, lens = _tables(gen, lengths, ps, num_pages, max_pages)
    k, v = _pools(gen, hkv, num_pages, ps)
    held = torch.zeros(num_pages, dtype=torch.bool)
    for r, n in enumerate(lengths):
        if n:
            held[table[r, :-(-n // ps)].long()] = True
    k.view(hkv, num_pages, ps, d)[:, ~held] = float("nan")
    v.view(hkv, num_pages, ps, d)[:, ~held] = float("nan")
    att = PagedDecodeAttention(hq, hkv, d, ps, 8, max_pages, CUDA, True, num_pages=num_pages,
                               kernel_options=kernel_options)
    att.update(table.to(CUDA), lens.to(CUDA), rows=len(lengths))
    q = torch.randn(len(lengths), hq, 1, d, generator=gen)
    out = att(q.to(CUDA), k.to(CUDA), v.to(CUDA), rows=len(lengths), scale=0.3)
    torch.testing.assert_close(out.cpu(), _reference(q, k, v, table, lens, ps), rtol=1e-4, atol=1e-4)


def test_chunk_attention_never_takes_cudnn():
    """A chunk's keys are a slice of its request's partial K/V, strided by the prompt's length, so
    cuDNN's attention would build a new plan for every prompt (note 26). The chunk attention runs
    on a kernel without per-shape set-up: over prompts of three lengths, first chunks (square
    causal) and later ones (lower-right), no cuDNN attention call, and the output equals the math
    kernel's within bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    from engine.fused_prefill import ChunkAttend
    h, d, c = 32, 128, 64
    g = torch.Generator(device=CUDA).manual_seed(3)
    calls = []
    for length in (300, 417, 529):
        partial = torch.zeros(1, 2, 1, h, length, d, device=CUDA, dtype=torch.bfloat16)
        for start in (0, c, 2 * c):
            q, k, v = (torch.randn(c, h, 1, d, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(3))
            attend = ChunkAttend(partial, start, start + c, scale=d ** -0.5)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = attend(0, q, k, v)
            calls += [e.name for e in prof.events() if "attention" in e.name]
            keys, values = partial[0, 0, 0, None, :, :start + c], partial[0, 1, 0, None, :, :start + c]
            with sdpa_kernel([SDPBackend.MATH]):
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, 0].transpose(0, 1)[None].float(), keys.float(), values.float(),
                    attn_mask=attend.bias, scale=d ** -0.5)[0].transpose(0, 1).reshape(c, h * d)
            torch.testing.assert_close(out.float(), ref, rtol=0.03, atol=0.03)
    assert calls and not [n for n in calls if "cudnn" in n], sorted(set(calls))


def test_bf16_graphed_prefill_close_to_eager_packed_prefill(tiny_model_dir):
    """prefill_graphs: whole-prompt forwards replay a CUDA graph per token bucket (padded, varlen
    attention over static boundaries): against the eager packed forward of the same prompts, the
    same argmax, logits and K/V within bf16 rounding, in two buckets and twice in one (a replay
    over other prompts), and the engine reports the graphs."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    engine, _ = make_engine(loaded, max_batch_size=8, max_seq_len=256, kv_layout="paged", kv_page_size=16,
                            fused_decode=True, prefill_graphs=True, max_prefill_tokens=512)
    runner, kv, packed = engine.runner, engine.slab, engine.runner.packed
    static = packed.static
    chunks = packed.chunk_static
    assert static is not None and static.use_graphs and chunks is not None and chunks.use_graphs
    assert runner.num_prefill_graphs == len(static.buckets) + len(chunks.buckets)
    g = torch.Generator().manual_seed(5)
    for n, lengths in enumerate(((23, 90), (7, 30, 21), (200, 150, 3))):
        prompts = [torch.randint(5, 200, (m,), generator=g).tolist() for m in lengths]
        graphed = packed.prefill(prompts, [f"g{n}.{i}" for i in range(len(prompts))]).clone()
        packed.static = None
        try:
            eager = packed.prefill(prompts, [f"e{n}.{i}" for i in range(len(prompts))])
        finally:
            packed.static = static
        assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
        torch.testing.assert_close(graphed.float(), eager.float(), rtol=0.05, atol=0.05)
        for i in range(len(prompts)):
            torch.testing.assert_close(kv.row_kv(f"g{n}.{i}").float(), kv.row_kv(f"e{n}.{i}").float(),
                                       rtol=0.05, atol=0.05)
        for i in range(len(prompts)):   # max_batch_size 8: each round's rows leave before the next
            kv.remove_row(f"g{n}.{i}")
            kv.remove_row(f"e{n}.{i}")


def test_bf16_graphed_chunks_close_to_eager_chunks(tiny_model_dir):
    """A prompt in chunks through the chunk graphs (fused_prefill.StaticChunk: padded to a
    bucket, varlen attention over the workspace, causal aligned to the end) against the eager
    chunks of the same prompt into a partial K/V of its own: same argmax, logits and K/V within
    bf16 rounding, chunks that split pages and buckets."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    engine, _ = make_engine(loaded, max_batch_size=8, max_seq_len=512, kv_layout="paged", kv_page_size=16,
                            fused_decode=True, prefill_graphs=True, max_prefill_tokens=256)
    runner, packed = engine.runner, engine.runner.packed
    static = packed.chunk_static
    assert static is not None and static.use_graphs and len(static.graphs) == len(static.buckets)
    prompt = torch.randint(5, 200, (420,), generator=torch.Generator().manual_seed(6)).tolist()
    ours = runner.new_partial_kv(len(prompt))
    assert static.holds(ours)
    packed.chunk_static = None
    ref = runner.new_partial_kv(len(prompt))
    packed.chunk_static = static
    used, run = [], static.run
    static.run = lambda T, ids, start: used.append(T) or run(T, ids, start)
    spans = ((0, 37), (37, 200), (200, 330), (330, 420))
    for end, logits, expected in chunk_pairs(runner, ours, ref, prompt, spans, lambda: without(packed, "chunk_static")):
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), end
        torch.testing.assert_close(logits.float(), expected.float(), rtol=0.05, atol=0.05)
        torch.testing.assert_close(ours[..., :end, :].float(), ref[..., :end, :].float(), rtol=0.05, atol=0.05)
    assert used == [64, 256, 256, 128]
    runner.release_partial(ours)
    assert not static.held


def test_bf16_engine_with_chunk_graphs_equals_eager_chunks(tiny_model_dir):
    """The engine prefilling in chunks with the chunk graphs gives the same greedy tokens as the
    same engine with eager chunks (prefill graphs off), staggered arrivals, decode graphs on."""
    loaded = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)
    outputs = []
    for graphs in (True, False):
        engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=256, kv_layout="paged", kv_page_size=16,
                                     fused_decode=True, prefill_graphs=graphs, prefill_chunk_tokens=16)
        assert (engine.runner.packed.chunk_static is not None) == graphs
        arrivals = {step: [GenerateInput(request_id=f"r{step}.{i}", prompt=" ".join(PROMPTS[i:] + PROMPTS[:i]) * 2,
                                         max_new_tokens=12, ignore_eos=True) for i in range(2)]
                    for step in (0, 3, 9)}   # prompts of ~60 tokens: 4 chunks each
        outputs.append(drive(engine, limits, arrivals))
        assert engine.stats().prefill_chunks > 0 and not engine._partial
    for rid, got in outputs[0].items():
        assert got.token_ids == outputs[1][rid].token_ids, rid


def test_bf16_fused_epilogues_close_to_plain_epilogues(tiny_model_dir):
    """fused_epilogues (RMSNorm's scale inside the rms kernel, residual adds inside addmm) against
    the same compiled step without them, bf16 on CUDA, a decode-sized and a prefill-sized batch:
    the same argmax and logits within bf16 rounding."""
    from engine.fused_decode import FusedDecoder
    model = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)[0]
    _steps_agree({on: FusedDecoder(model, compile=True, fuse_epilogues=on) for on in (True, False)})


def _steps_agree(fused: dict) -> None:
    """Two fused steps (keys True and False) on a decode-sized and a prefill-sized batch of random
    tokens: the same argmax and logits within bf16 rounding."""
    def attend(layer, q, k, v):   # the epilogues are around the attention; any attention will do
        return q.reshape(q.shape[0], -1)

    g = torch.Generator().manual_seed(7)
    for rows in (24, 300):
        ids = torch.randint(5, 200, (rows, 1), generator=g).to(CUDA)
        positions = torch.randint(0, 100, (rows, 1), generator=g).to(CUDA)
        with torch.inference_mode():
            logits = {on: f(ids, positions, attend).float() for on, f in fused.items()}
        assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() >= 0.98
        torch.testing.assert_close(logits[True], logits[False], rtol=0.05, atol=0.05)


def test_bf16_fused_add_norm_close_to_the_pair_and_batch_invariant(tiny_model_dir):
    """The fused step's residual add + RMSNorm as one kernel (liger-kernel, used under tensor
    parallelism) against the add and the norm as two: the residual bit for bit, the normalised
    value within bf16 rounding, liger's norm alone (every other norm on CUDA) equal to it, and a
    row's result the same in a batch of 3 as of 300 (CUDA graph
    buckets pad the batch); then the whole step with and without it, bf16: same argmax, close logits."""
    from engine.fused_decode import FusedDecoder, _rms_norm, liger_add_norm, liger_norm
    add_norm, norm = liger_add_norm(), liger_norm()
    assert add_norm is not None and norm is not None, "liger-kernel did not import"
    g = torch.Generator(device=CUDA).manual_seed(3)
    x, y = (torch.randn(300, 4096, device=CUDA, generator=g, dtype=torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, device=CUDA, generator=g)).to(torch.bfloat16)
    with torch.inference_mode():
        total, h = add_norm(y, x, w, 1e-5)
        assert torch.equal(total, x + y)
        torch.testing.assert_close(h.float(), _rms_norm(x + y, w, 1e-5).float(), rtol=0.02, atol=0.02)
        assert torch.equal(add_norm(y[:3], x[:3], w, 1e-5)[1], h[:3])
        alone = norm(x + y, w, 1e-5)   # the norm alone (no TP: the add is inside the GEMM): the same kernel's arithmetic
        assert torch.equal(alone, h) and torch.equal(norm(x[:3] + y[:3], w, 1e-5), h[:3])

    model = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)[0]
    fused = {on: FusedDecoder(model, compile=True, fuse_epilogues=False, add_norm=on) for on in (True, False)}
    assert fused[True].add_norm is not None and fused[False].add_norm is None
    _steps_agree(fused)


def test_bf16_rope_store_equals_the_compiled_rotary_and_copies(tiny_model_dir):
    """engine/rope_store.py (on by default on CUDA) against what it replaces, bf16 at a 7B TP 2
    rank's heads: the compiled rotary (q, k) and the two index copies of k and v into the pool, with
    the write slots a column of the step's inputs as the paged step holds them. Equal up to the
    rounding of one fused multiply-add (both are Triton, fp32 inside)."""
    from engine.fused_decode import FusedDecoder, _qkv_split_rotary
    from engine.rope_store import rope_store
    store = rope_store()
    assert store is not None
    compiled = torch.compile(_qkv_split_rotary, dynamic=True, fullgraph=True)
    hq, hkv, d, b, n = 16, 8, 128, 32, 200
    g = torch.Generator(device=CUDA).manual_seed(5)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=CUDA, generator=g, dtype=torch.bfloat16)
    angle = torch.rand(b, d // 2, device=CUDA, generator=g) * 1000
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    inputs = torch.zeros(b, 7, dtype=torch.long, device=CUDA)
    inputs[:, 3] = torch.randperm(n, device=CUDA, generator=g)[:b]
    pool = torch.zeros(2, hkv, n, d, device=CUDA, dtype=torch.bfloat16)
    expected = pool.clone()
    with torch.inference_mode():
        q = store(qkv, cos, sin, pool, inputs[:, 3], hq, hkv, d)
        q_ref, k_ref, v_ref = compiled(qkv, cos, sin, hq, hkv, d)
        expected[0].index_copy_(1, inputs[:, 3], k_ref[:, :, 0].transpose(0, 1))
        expected[1].index_copy_(1, inputs[:, 3], v_ref[:, :, 0].transpose(0, 1))
    assert torch.equal(pool[1], expected[1])                            # v: copied as it is
    for ours, ref in ((q, q_ref), (pool[0], expected[0])):
        assert (ours == ref).float().mean() >= 0.99
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1 / 128, atol=1 / 128)
    model = model_loader.load(tiny_model_dir("llama"), CUDA, torch.bfloat16)[0]
    assert FusedDecoder(model, compile=True).rope_store is not None      # the engine's default on CUDA


def test_cuda_warmup_also_prefills_a_long_prompt(tiny_model_dir):
    """On CUDA the warm-up runs a short prompt and then one of hundreds of tokens (under tensor
    parallelism the first prefill of that size cost ~0.5 s once, note 33), both to their end."""
    from engine.api import WARMUP_LONG_WORDS, EngineClient
    from engine.config import EngineConfig
    client = EngineClient(EngineConfig(model=tiny_model_dir("llama"), device="cuda", max_batch_size=2,
                                       max_seq_len=4096))
    try:
        client.start()
        stats = client.engine.stats()
        words = min(WARMUP_LONG_WORDS, client.info.max_context_length // 4)
        assert stats.prefill_tokens >= words and stats.rows_on_device == 0
    finally:
        client.stop()
