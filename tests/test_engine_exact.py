"""Greedy outputs of the Baton engine equal Hugging Face `generate` on each request alone.

Requests arrive at different steps with different prompt lengths and lengths to run, so rows
are embedded into a running batch (left padding + regenerated mask), leave when done, and the
window is trimmed/moved — none of which may change a single token.
"""
from __future__ import annotations

import pytest

from engine import model_loader
from engine.inputs import GenerateInput
from tests.conftest import CPU, check_stops_on_tokens, drive, hf_reference, make_engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3,",
    "Why is the sky blue? Explain it to a child in two sentences.",
    "def fibonacci(n):",
    "Water boils at",
]


def _arrivals(lengths: list[int], steps: list[int], ignore_eos: bool = False):
    arrivals: dict[int, list[GenerateInput]] = {}
    for i, (prompt, n, step) in enumerate(zip(PROMPTS, lengths, steps)):
        arrivals.setdefault(step, []).append(
            GenerateInput(request_id=f"r{i}", prompt=prompt, max_new_tokens=n, ignore_eos=ignore_eos))
    return arrivals


def _check_against_hf(loaded, engine, outputs, arrivals):
    hf_model, tokenizer, spec = loaded
    for step_inputs in arrivals.values():
        for inp in step_inputs:
            prompt_ids = tokenizer(inp.prompt)["input_ids"]
            eos = () if inp.ignore_eos else spec.eos_token_ids
            expected = hf_reference(hf_model, prompt_ids, inp.max_new_tokens, eos)
            got = outputs[inp.request_id]
            assert got.token_ids == expected, f"{inp.request_id}: engine differs from HF generate"
            assert got.text == tokenizer.decode(expected, skip_special_tokens=True)
            assert got.final.completion_tokens == len(expected)


# Both K/V layouts pass the same exactness tests; pages of 16 tokens so that rows span several.
# "paged-overlap": steady steps launch the next decode before their events (on CUDA by default,
# forced here; LLMEngine.step_phases), from the sampled ids on the device before the host reads
# them (pipeline_decode, on with overlap by default).
LAYOUTS = [dict(kv_layout="slab"), dict(kv_layout="paged", kv_page_size=16),
           dict(kv_layout="paged", kv_page_size=16, overlap_decode=True)]
LAYOUT_IDS = ["slab", "paged", "paged-overlap"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_smollm2_staggered_arrivals_match_hf(smollm2, layout):
    engine, limits = make_engine(smollm2, max_batch_size=4, **layout)
    # six requests through four slots: some wait for a row to free up
    arrivals = _arrivals(lengths=[12, 30, 7, 25, 18, 9], steps=[0, 0, 3, 5, 9, 9])
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(smollm2, engine, outputs, arrivals)
    assert engine.slab.num_rows == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_tiny_random_models_match_hf(family, layout, tiny_model_dir):
    loaded = model_loader.load(tiny_model_dir(family), CPU, __import__("torch").float32)
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=128, **layout)
    arrivals = _arrivals(lengths=[20, 35, 8, 16, 27, 5], steps=[0, 1, 2, 4, 4, 13], ignore_eos=True)
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)
    assert (engine.stats().overlapped_steps > 0) == bool(layout.get("overlap_decode"))
    assert (engine.stats().pipelined_steps > 0) == bool(layout.get("overlap_decode"))


@pytest.mark.parametrize("pipeline,fused,layout", [(True, False, "paged"), (True, True, "paged"), (False, True, "paged"),
                                                   (True, False, "slab"), (True, True, "slab")],
                         ids=["pipelined-hf", "pipelined-fused", "overlap-only-fused", "slab-pipelined-hf",
                              "slab-pipelined-fused"])
def test_rows_stopping_on_a_token_under_pipelined_decode(pipeline, fused, layout, tiny_model_dir):
    """With pipeline_decode a steady step launches the next decode from its sampled ids before
    the host reads them, so a row that stops on a token (EOS or a stop token id) takes one step
    too many, which must be dropped: every row's tokens still equal HF generate's with that token
    as its EOS, the rows that go on are untouched, and the freed row's K/V slot harms no one (a
    late arrival takes the freed pages). Both paged steps: the HF forward's and the fused one's
    (engine/paged_decode.py, which takes the ids on the device into its inputs); and the slab."""
    import torch
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=128, kv_layout=layout, kv_page_size=16,
                                 overlap_decode=True, pipeline_decode=pipeline, fused_decode=fused)
    check_stops_on_tokens(loaded, engine, limits, PROMPTS[:5])
    assert (engine.stats().pipelined_steps > 0) == pipeline


def test_rows_leave_and_cache_shrinks(tiny_model_dir):
    """A finished row leaves at once; the attended window shrinks to the longest remaining row;
    the write column never runs off the slab however long the batch lives."""
    import torch
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, limits = make_engine(loaded, max_batch_size=2, max_seq_len=64)
    long_prompt = "word " * 40
    arrivals = {0: [GenerateInput(request_id="long", prompt=long_prompt, max_new_tokens=3, ignore_eos=True),
                    GenerateInput(request_id="short", prompt="hi", max_new_tokens=150, ignore_eos=True)]}
    seen = []

    def watch(step, eng, out):
        seen.append((eng.slab.num_rows, eng.slab.write_col - eng.slab.window_start(), eng.slab.write_col))

    outputs = drive(engine, limits, arrivals, on_step=watch)
    long_len = len(loaded[1](long_prompt)["input_ids"])
    both = [w for r, w, _ in seen if r == 2]
    alone = [w for r, w, _ in seen if r == 1]
    assert both and alone and seen[-1][0] == 0
    assert min(both) >= long_len            # while "long" runs, the window spans its prompt
    assert alone[0] < 8 < long_len          # after it left, the common padding is trimmed at once
    assert all(w <= engine.slab.max_len for _, _, w in seen)  # compaction kept the write column inside
    # 150 new tokens do not fit in a 64-token context: the context limit stops the request
    short = outputs["short"]
    assert short.final.finish_reason.name == "LENGTH"
    assert short.final.prompt_tokens + len(short.token_ids) == engine.slab.max_len


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_cancel_frees_row_without_changing_others(tiny_model_dir, layout):
    import torch
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, limits = make_engine(loaded, max_batch_size=3, max_seq_len=128, **layout)
    arrivals = _arrivals(lengths=[30, 30, 30], steps=[0, 0, 0], ignore_eos=True)
    rows_after_cancel = []

    def cancel_at_5(step, eng, out):
        if step == 6:
            rows_after_cancel.append(eng.slab.num_rows)
        if step == 5:
            return eng.abort("r1")

    outputs = drive(engine, limits, arrivals, on_step=cancel_at_5)
    assert outputs["r1"].final.finish_reason.name == "CANCELLED"
    assert rows_after_cancel == [2]
    del arrivals[0][1]
    _check_against_hf(loaded, engine, outputs, arrivals)


def test_long_newcomer_shifts_the_batch_right(tiny_model_dir):
    """A prompt longer than the write column forces the live window to move right (outside any
    forward): outputs must not change."""
    import torch
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    engine, limits = make_engine(loaded, max_batch_size=2, max_seq_len=128)
    arrivals = {0: [GenerateInput(request_id="short", prompt="hi", max_new_tokens=20, ignore_eos=True)],
                2: [GenerateInput(request_id="long", prompt="word " * 60, max_new_tokens=10, ignore_eos=True)]}
    outputs = drive(engine, limits, arrivals)
    _check_against_hf(loaded, engine, outputs, arrivals)


def test_length_groups_bound_padding():
    from engine.engine import length_groups
    from engine.request import Request, SamplingParams
    reqs = [Request(f"r{n}", [1] * n, SamplingParams(max_new_tokens=1)) for n in (500, 30, 40, 35, 480, 33, 510)]
    groups = length_groups(reqs)
    assert sorted(len(r.prompt_ids) for g in groups for r in g) == sorted(len(r.prompt_ids) for r in reqs)
    for g in groups:
        longest = max(len(r.prompt_ids) for r in g)
        assert longest * len(g) <= 2.0 * sum(len(r.prompt_ids) for r in g)
    assert len(groups) == 2      # the short ones together, the long ones together


def test_prefill_kv_is_freed_without_the_cyclic_gc():
    """A SlabCache must not form a reference cycle: a prefill's temporary K/V (GBs for a 7B model)
    must be freed as soon as the result is dropped, not whenever Python's cyclic GC runs."""
    import gc
    import weakref

    import torch
    from engine.kv_slab import SlabCache
    gc.disable()
    try:
        data = torch.zeros(2, 2, 1, 1, 4, 2)
        probe = weakref.ref(data)
        cache = SlabCache(data, num_rows=1, lo=0, hi=4, write_index=torch.arange(4))
        k, v = cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2), 0)
        del cache, data, k, v
        assert probe() is None
    finally:
        gc.enable()



def test_each_prefill_group_streams_its_first_tokens_before_the_next_group_runs(tiny_model_dir):
    """Newcomers of one step in two length groups: the short group's RUNNING events (each with its
    first token) reach their sinks before the long group's prefill starts; outputs still equal HF."""
    from engine.inputs import build_request
    from tests.conftest import Collected
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, __import__("torch").float32)
    engine, limits = make_engine(loaded, max_batch_size=4, max_seq_len=256)   # CPU: groups pad <= 10%
    log: list[tuple] = []
    prefill = engine.runner.prefill

    def logged_prefill(prompts):
        log.append(("prefill", len(prompts)))
        return prefill(prompts)

    engine.runner.prefill = logged_prefill
    long_prompt = "Once upon a time, in a land far away, there lived a " * 8
    inputs = [GenerateInput(request_id="short-a", prompt="Hi there", max_new_tokens=6, ignore_eos=True),
              GenerateInput(request_id="short-b", prompt="Hello you", max_new_tokens=6, ignore_eos=True),
              GenerateInput(request_id="long", prompt=long_prompt, max_new_tokens=6, ignore_eos=True)]
    outputs = {inp.request_id: Collected() for inp in inputs}

    def record(events) -> None:
        for out in events:
            outputs[out.request_id].events.append(out)
            log.append(("event", out.request_id, out.state.name if out.state else None, len(out.token_ids)))

    for inp in inputs:
        record((engine.add_request(build_request(inp, engine.tokenizer, limits)),))
    while engine.has_work():
        for events in engine.step_phases():   # what the command loop does: each phase goes out at once
            record(events)
            log.append(("phase",))
    prefills = [i for i, entry in enumerate(log) if entry[0] == "prefill"]
    assert [log[i] for i in prefills] == [("prefill", 2), ("prefill", 1)], log   # short pair, then the long one
    between = log[prefills[0] + 1:prefills[1]]
    running = {e[1] for e in between if e[0] == "event" and e[2] == "RUNNING" and e[3] == 1}
    assert running == {"short-a", "short-b"}, log        # their first tokens are out before the long prefill
    assert between[-1] == ("phase",), log
    _check_against_hf(loaded, engine, outputs, {0: inputs})


def test_paged_rows_are_bounded_by_real_tokens_not_by_the_context(tiny_model_dir):
    """The memory of two full-context slab rows holds six short paged rows at once, exactly."""
    import torch
    loaded = model_loader.load(tiny_model_dir("llama"), CPU, torch.float32)
    hf_model, tokenizer, spec = loaded
    two_rows = 2 * 128 * (2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4)   # fp32 bytes
    engine, limits = make_engine(loaded, max_batch_size=6, max_seq_len=128, kv_budget_bytes=two_rows,
                                 kv_layout="paged", kv_page_size=16)
    assert engine.slab.total_bytes == two_rows and engine.stats().kv_pages_free == 16
    slab, _ = make_engine(loaded, max_batch_size=6, max_seq_len=128)   # six rows of the slab: 3x the memory
    assert slab.slab.total_bytes == 3 * two_rows
    inputs = [GenerateInput(request_id=f"s{i}", prompt=PROMPTS[i], max_new_tokens=10, ignore_eos=True)
              for i in range(6)]
    peak = []
    outputs = drive(engine, limits, {0: inputs}, on_step=lambda step, eng, out: peak.append(eng.stats().rows_on_device))
    assert max(peak) == 6                 # every request decodes at once
    for inp in inputs:
        expected = hf_reference(hf_model, tokenizer(inp.prompt)["input_ids"], 10, ())
        assert outputs[inp.request_id].token_ids == expected, inp.request_id
    stats = engine.stats()
    assert stats.kv_pages_used == 0 and stats.kv_pages_free == 16
