"""Prefill straight into pages (engine/fused_prefill.py) computes what the HF prefill computes.

On CPU (fp32, uncompiled, SDPA's causal kernel per prompt) the first-token logits and every
layer's K/V equal the HF prefill's up to rounding, for prompts packed end to end and for one
prompt in chunks that split pages, and the engine that prefills this way (whole or in chunks)
gives HF generate's greedy tokens; tests/test_gpu.py checks the CUDA path
(varlen flash attention) the same way.
"""
from __future__ import annotations

import pytest
import torch

from engine import model_loader
from engine.kv_pages import OutOfPages
from tests.conftest import CPU, chunk_pairs, drive, make_engine, without
from tests.test_engine_exact import _arrivals, _check_against_hf


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, tiny_model_dir):
    return model_loader.load(tiny_model_dir(request.param), CPU, torch.float32)


def _engine(loaded, **kw):
    engine, limits = make_engine(loaded, kv_layout="paged", kv_page_size=16, fused_decode=True, **kw)
    assert engine.runner.packed is not None
    return engine, limits


@pytest.mark.parametrize("decode_first", [True, False], ids=["decode-first", "prefill-first"])
def test_a_step_with_prefill_launches_the_running_rows_decode_first(loaded, decode_first):
    """decode_before_prefill: in a step with prefill work the running rows' decode step is issued
    before the prefill forward (so on CUDA the host issues the prefill while the GPU decodes), and
    a row prefilled in that step decodes from the next one; off: the old order, new rows decode
    in their own step. Tokens equal HF generate alone either way, whole prompts and chunks."""
    engine, limits = _engine(loaded, max_batch_size=4, max_seq_len=128, prefill_chunk_tokens=10,
                             decode_before_prefill=decode_first)
    runner, packed, calls = engine.runner, engine.runner.packed, []
    decode, prefill = runner.decode, packed.prefill

    def log_decode(input_ids):
        calls.append(("decode", engine.stats().steps, len(input_ids)))
        return decode(input_ids)

    def log_prefill(prompts, row_ids, chunks=()):
        calls.append(("prefill", engine.stats().steps, engine.slab.num_rows))
        return prefill(prompts, row_ids, chunks)

    runner.decode, packed.prefill = log_decode, log_prefill
    phases, step_phases = [], engine.step_phases

    def recording():   # per phase: (it prefilled, it counted decode time), as the bench reads phases
        before = engine.stats()
        for events in step_phases():
            after = engine.stats()
            phases.append((after.prefill_tokens + after.prefill_chunks > before.prefill_tokens + before.prefill_chunks,
                           after.seconds_decode > before.seconds_decode))
            before = after
            yield events

    engine.step_phases = recording
    arrivals = _arrivals(lengths=[12, 20, 9, 15, 10], steps=[0, 0, 1, 1, 3], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    assert (True, False) in phases and (False, True) in phases and (True, True) not in phases
    # steps whose prefill found rows already running (in the first one the prefilled rows
    # decode right after it, either way)
    both = [step for kind, step, rows in calls if kind == "prefill" and rows]
    assert both, "no step had a prefill forward while rows were running"
    for step in both:
        kinds = [kind for kind, s, _ in calls if s == step]
        assert kinds == (["decode", "prefill"] if decode_first else ["prefill", "decode"]), (step, kinds)
        if decode_first:   # the rows there before this step's prefill, no more
            rows_before = next(rows for kind, s, rows in calls if kind == "prefill" and s == step)
            assert next(n for kind, s, n in calls if kind == "decode" and s == step) == rows_before


def test_packed_prefill_equals_hf_prefill(loaded):
    engine, _ = _engine(loaded, max_batch_size=4, max_seq_len=128)
    runner, kv = engine.runner, engine.slab
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (17, 1, 40, 16)]   # mid-page, one token, page-aligned
    ref = runner.prefill(prompts)
    logits = runner.packed.prefill(prompts, [f"r{i}" for i in range(len(prompts))])
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    for i in range(len(prompts)):
        torch.testing.assert_close(kv.row_kv(f"r{i}"), ref.row_kv(i), rtol=1e-4, atol=1e-4)
    assert kv.lengths == [17, 1, 40, 16]


def test_static_prefill_padded_to_a_bucket_equals_the_packed_prefill(loaded):
    """The graphed prefill's forward (fused_prefill.StaticPrefill, run eagerly here: the CUDA
    capture is checked in tests/test_gpu.py) pads the packed tokens to a bucket: same logits and
    K/V as the unpadded forward, the padding's K/V only in the scratch slot, nothing else of the
    pool touched, and each bucket shape reused across calls."""
    from engine.fused_prefill import StaticPrefill
    engine, _ = _engine(loaded, max_batch_size=8, max_seq_len=128)
    runner, kv = engine.runner, engine.slab
    static = StaticPrefill(runner.packed, max_tokens=200, graphs=False)
    assert static.buckets == [64, 128, 200]
    assert static.bucket(64, 3) == 64 and static.bucket(65, 1) == 128 and static.bucket(201, 1) is None
    g = torch.Generator().manual_seed(4)
    for lengths, bucket in (((17, 1, 40), 64), ((30, 33, 16, 9), 128), ((64,), 64)):
        prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in lengths]
        ref_ids, ids = [f"ref{i}" for i in range(len(prompts))], [f"s{i}" for i in range(len(prompts))]
        expected = runner.packed.prefill(prompts, ref_ids)
        before = kv.data.clone()
        runner.packed.static = static
        try:
            logits = runner.packed.prefill(prompts, ids)
        finally:
            runner.packed.static = None
        assert static.bucket(sum(lengths), len(prompts)) == bucket
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        allowed = torch.zeros(kv.data.shape[3], dtype=torch.bool)   # the new rows' slots, and scratch
        allowed[kv.scratch_slot] = True
        for i in range(len(prompts)):
            torch.testing.assert_close(kv.row_kv(ids[i]), kv.row_kv(ref_ids[i]), rtol=1e-5, atol=1e-5)
            index = kv.row_ids.index(ids[i])
            allowed[kv._row_slots(index, kv.lengths[index])] = True
        changed = (kv.data != before).flatten(0, 2).any(0).any(-1)   # [N]: slots written
        assert not (changed & ~allowed).any()
        for rid in ids + ref_ids:
            kv.remove_row(rid)


def test_prefill_graph_buckets_stop_where_the_eager_forward_is_gpu_bound():
    """The engine's prefill graphs cover forwards of up to 1,280 tokens per GPU of the
    tensor-parallel group (a graph costs its padded bucket's GPU time; past ~1,300 tokens at TP 1
    the eager forward's host time hides under its GPU time: note 27; a rank's GPU time shrinks
    with the group, the host's does not: note 34), in steps of at most 256 tokens up to 1,280 and
    of at most a quarter above, and are on by default at every tensor-parallel size."""
    from engine.config import PREFILL_GRAPH_TOKENS_PER_GPU, EngineConfig
    from engine.fused_prefill import PREFILL_BUCKETS
    assert PREFILL_GRAPH_TOKENS_PER_GPU == 1280 and 1280 in PREFILL_BUCKETS
    assert all(b - a <= 256 if b <= 1280 else b <= 1.25 * a for a, b in zip(PREFILL_BUCKETS, PREFILL_BUCKETS[1:]))
    assert EngineConfig().use_prefill_graph_tokens == 1280
    assert EngineConfig(tensor_parallel=2).use_prefill_graph_tokens == 2560 <= PREFILL_BUCKETS[-1]
    assert EngineConfig(tensor_parallel=2, prefill_graph_tokens=1024).use_prefill_graph_tokens == 1024
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        EngineConfig(prefill_graph_tokens=0)
    assert EngineConfig().use_prefill_graphs and EngineConfig(tensor_parallel=2).use_prefill_graphs
    assert not EngineConfig(prefill_graphs=False).use_prefill_graphs
    assert EngineConfig(tensor_parallel=2, prefill_graphs=True).use_prefill_graphs


def test_engine_with_bucketed_prefill_matches_hf_generate(loaded):
    """The engine with its whole-prompt forwards through StaticPrefill's buckets (eager here):
    the same tokens as HF generate alone; forwards over the largest bucket run unpadded."""
    from engine.fused_prefill import StaticPrefill
    engine, limits = _engine(loaded, max_batch_size=3, max_seq_len=128)
    static = engine.runner.packed.static = StaticPrefill(engine.runner.packed, max_tokens=40, graphs=False)
    used, run = [], static.run
    static.run = lambda T, ids, *rest: used.append(T) or run(T, ids, *rest)
    arrivals = _arrivals(lengths=[20, 35, 8, 16, 27, 5], steps=[0, 0, 2, 4, 4, 13], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    assert used and set(used) <= {40}   # buckets (64,) capped at max_tokens 40
    assert engine.slab.num_rows == 0 and engine.slab.num_pages_used == 0


def test_packed_prefill_out_of_pages_changes_nothing(loaded):
    """The second prompt does not fit: the first one's row and pages are given back too."""
    engine, _ = _engine(loaded, max_batch_size=4, max_seq_len=128)
    kv = engine.slab
    kv.pages.allocate("hog", (kv.num_pages_free - 3) * kv.page_size)   # 3 pages left
    free = kv.num_pages_free
    with pytest.raises(OutOfPages):
        engine.runner.packed.prefill([[7] * 40, [8] * 40], ["a", "b"])   # 3 pages, then 3 more
    assert kv.num_rows == 0 and kv.num_pages_free == free


def test_packed_chunks_equal_hf_chunks(loaded):
    engine, _ = _engine(loaded, max_batch_size=4, max_seq_len=128)
    runner = engine.runner
    prompt = torch.randint(5, 200, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, ref = runner.new_partial_kv(len(prompt)), runner.new_partial_kv(len(prompt))
    # chunks ending mid-page (pages of 16), against the HF forward's chunks
    for end, logits, expected in chunk_pairs(runner, ours, ref, prompt, ((0, 13), (13, 29), (29, 40)),
                                             lambda: without(runner, "packed")):
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[..., :end, :], ref[..., :end, :], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [0, 8])
def test_engine_with_packed_prefill_matches_hf_generate(loaded, chunk):
    engine, limits = _engine(loaded, max_batch_size=3, max_seq_len=128, prefill_chunk_tokens=chunk)
    arrivals = _arrivals(lengths=[20, 35, 8, 16, 27, 5], steps=[0, 0, 2, 4, 4, 13], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    tokenizer = loaded[1]
    prompts = [len(tokenizer(i.prompt)["input_ids"]) for step in arrivals.values() for i in step]
    assert engine.stats().prefill_tokens == sum(prompts)
    assert (engine.stats().prefill_chunks > 0) == (chunk > 0)
    assert engine.slab.num_rows == 0 and engine.slab.num_pages_used == 0


def test_a_steps_prompts_and_chunks_are_one_forward(loaded):
    """With chunks on the packed path, a step's whole prompts and chunks (of other prompts) go
    through one forward (engine/fused_prefill.py MixedAttend), and the tokens still equal HF
    generate alone."""
    engine, limits = _engine(loaded, max_batch_size=4, max_seq_len=128, prefill_chunk_tokens=10)
    packed, calls = engine.runner.packed, []
    original = packed.prefill

    def counting(prompts, row_ids, chunks=()):
        calls.append((engine.stats().steps, len(prompts), len(chunks)))
        return original(prompts, row_ids, chunks)

    packed.prefill = counting
    arrivals = _arrivals(lengths=[12, 20, 9, 15, 10], steps=[0, 0, 1, 1, 3], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    steps = [step for step, _, _ in calls]
    assert len(steps) == len(set(steps)), "a step ran more than one prefill forward"
    assert any(m and k for _, m, k in calls), "no step had both a whole prompt and a chunk"


def test_static_chunk_padded_to_a_bucket_equals_the_eager_chunk(loaded):
    """A chunk through the chunk graphs' forward (fused_prefill.StaticChunk, run eagerly here;
    the CUDA capture with varlen attention is checked in tests/test_gpu.py): its tokens padded to
    a bucket, its K/V in the workspace: the same logits and prompt K/V as the unpadded chunk into
    a partial K/V of its own, for chunks that split pages (16) and buckets; the workspace is one
    prompt's at a time and free again once released."""
    from engine.fused_prefill import StaticChunk
    engine, _ = _engine(loaded, max_batch_size=4, max_seq_len=128)
    runner, packed = engine.runner, engine.runner.packed
    static = packed.chunk_static = StaticChunk(packed, max_tokens=40, graphs=False)
    try:
        assert static.buckets == [40] and static.bucket(40) == 40 and static.bucket(41) is None
        static.buckets = [8, 16, 40]   # smaller buckets than PREFILL_BUCKETS, so chunks pad
        prompt = torch.randint(5, 200, (75,), generator=torch.Generator().manual_seed(2)).tolist()
        ours = runner.new_partial_kv(len(prompt))
        assert static.holds(ours) and runner.new_partial_kv(10).data_ptr() != ours.data_ptr()
        packed.chunk_static = None      # the reference: the eager chunk into a zeroed partial K/V
        ref = runner.new_partial_kv(len(prompt))
        packed.chunk_static = static
        used, run = [], static.run
        static.run = lambda T, ids, start: used.append(T) or run(T, ids, start)
        spans = ((0, 13), (13, 29), (29, 69), (69, 75))   # pads 13→16, 16, 40→40, 6→8
        for end, logits, expected in chunk_pairs(runner, ours, ref, prompt, spans,
                                                 lambda: without(packed, "chunk_static")):
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours[..., :end, :], ref[..., :end, :], rtol=1e-4, atol=1e-4)
        assert used == [16, 16, 40, 8]
        runner.release_partial(ref)     # not the workspace: nothing changes
        assert static.held
        runner.release_partial(ours)
        assert not static.held and static.holds(runner.new_partial_kv(128))
        assert runner.new_partial_kv(129) is not None and static.acquire(10) is None
    finally:
        packed.chunk_static = None


def _with_chunk_graph(engine, max_tokens: int):
    """Give the engine's packed prefill the chunk graphs' forward (StaticChunk, eager on CPU);
    -> (it, the (bucket, chunk tokens, start) of each chunk it ran)."""
    from engine.fused_prefill import StaticChunk
    packed = engine.runner.packed
    static = packed.chunk_static = StaticChunk(packed, max_tokens=max_tokens, graphs=False)
    used, run = [], static.run
    static.run = lambda T, ids, start: used.append((T, len(ids), start)) or run(T, ids, start)
    return static, used


@pytest.mark.parametrize("chunk, top", [(16, 16), (12, 8)], ids=["fits-the-bucket", "over-the-bucket"])
def test_engine_with_chunk_graphs_matches_hf_generate(loaded, chunk, top):
    """The engine with its prompts' chunks through the chunk graphs' forward (eager here): HF
    generate's tokens, chunks padded to the bucket and later chunks of a prompt through it too,
    and the workspace free at the end; chunks larger than the largest bucket run the eager chunk
    on the workspace."""
    engine, limits = _engine(loaded, max_batch_size=3, max_seq_len=128, prefill_chunk_tokens=chunk)
    static, used = _with_chunk_graph(engine, top)
    held, acquire = [], static.acquire
    static.acquire = lambda n: held.append(n) or acquire(n)
    arrivals = _arrivals(lengths=[20, 35, 8, 16, 27, 5], steps=[0, 0, 2, 4, 4, 13], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    assert held and engine.stats().prefill_chunks > 0
    if chunk > top:   # the full chunks ran eagerly on the workspace, only short last ones through it
        assert all(c <= top for _, c, _ in used) and not static.held
        return
    assert used and all(T == 16 for T, _, _ in used)
    assert any(c < 16 for _, c, _ in used) and any(start for _, _, start in used)   # padded; later chunks
    assert not static.held and not engine._partial
    assert engine.slab.num_rows == 0 and engine.slab.num_pages_used == 0


def test_the_pool_leaves_room_for_the_chunk_workspace():
    """With prefill graphs the K/V pool is sized leaving the chunk graphs' workspace free (a
    context plus the largest bucket of K/V), beside the prefill's own reserve."""
    from types import SimpleNamespace
    from engine.build import prefill_reserve_bytes
    from engine.config import EngineConfig
    model = SimpleNamespace(hidden_size=64, intermediate_size=128)
    on = prefill_reserve_bytes(EngineConfig(prefill_graphs=True), model, 4096, 1000, 2)
    off = prefill_reserve_bytes(EngineConfig(prefill_graphs=False), model, 4096, 1000, 2)
    assert on - off == (4096 + 1280) * 1000
    # under TP there are no chunk graphs (every rank would give its one workspace to one prompt)
    tp_on = prefill_reserve_bytes(EngineConfig(prefill_graphs=True, tensor_parallel=2), model, 4096, 1000, 2)
    assert tp_on == prefill_reserve_bytes(EngineConfig(prefill_graphs=False, tensor_parallel=2), model, 4096, 1000, 2)
