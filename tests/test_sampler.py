"""The batched Sampler on random logits (no model): greedy rows are the argmax, penalties and
filters equal Hugging Face's processors row by row (both filter paths, ties included), a seeded
row draws the same tokens alone and in any batch, and the exponential race follows the
distribution."""
from __future__ import annotations

import pytest
import torch
from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from engine import sampler as sampler_module
from engine.request import SamplingParams
from engine.sampler import Sampler, make_generator, processed_logits

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _params(temperature=0.0, top_k=0, top_p=0.0, penalty=0.0, seed=None) -> SamplingParams:
    return SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=penalty, seed=seed)


def _seen(params, vocab, gen) -> list[list[int]]:
    return [torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
            if p.has_penalty else [] for p in params]


def _hf(row: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    """One row [V] through HF's processors in `generate` order."""
    ids = torch.tensor([seen or [0]])
    scores = row[None].float().clone()
    if p.has_penalty:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if not p.greedy:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
        if p.top_k > 0:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if 0.0 < p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores[0]


MIXED = [_params(), _params(penalty=1.3), _params(1.0, top_k=20), _params(0.7, top_p=0.9),
         _params(1.3, top_k=50, top_p=0.8, penalty=0.8), _params(0.5, top_k=5000),  # top-k wider than V
         _params(2.0, top_p=1.0, penalty=1.1), _params(0.9, top_k=1, top_p=0.5),
         _params(1.0, top_p=1e-9)]    # 1 - top_p rounds to 1.0: only "always keep the top token" keeps one
ALL_TOP_K = [_params(1.0, top_k=20), _params(1.3, top_k=50, top_p=0.8, penalty=0.8),
             _params(0.6, top_k=7, top_p=0.95), _params(0.9, top_k=1, top_p=0.5), _params(1.0, top_k=3),
             _params(1.0, top_k=30, top_p=1e-9)]


def _assert_matches_hf(logits, params, seen, candidates):
    ours = processed_logits(logits, params, seen, candidates=candidates)
    assert ours.shape == logits.shape and ours.dtype == torch.float32
    for i, p in enumerate(params):
        expected = _hf(logits[i].cpu(), p, seen[i])
        got = ours[i].cpu()
        assert torch.equal(got.isfinite(), expected.isfinite()), f"row {i}: kept set differs"
        finite = expected.isfinite()
        if not p.greedy:     # ours is max-shifted: equal up to a per-row constant
            expected = expected - expected.max()
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("candidates", [False, True])
@pytest.mark.parametrize("rows", [MIXED, ALL_TOP_K], ids=["mixed", "all-top-k"])
def test_processed_logits_match_hf(device, candidates, rows):
    gen = torch.Generator().manual_seed(1)
    vocab = 1000
    logits = (3 * torch.randn(len(rows), vocab, generator=gen)).to(device)
    seen = _seen(rows, vocab, gen)
    before = logits.clone()
    _assert_matches_hf(logits, rows, seen, candidates)
    assert torch.equal(logits, before)           # the caller's logits are never edited


def test_candidate_path_is_exact_or_falls_back(monkeypatch):
    """The CPU path filters on the best few columns only where that provably equals the dense
    result; ties past a k-th value (bf16-like logits tie often; HF keeps every tied token) and a
    top-p nucleus wider than the candidates fall back to wider candidates, then to the dense path."""
    calls = {"dense": 0}
    dense = sampler_module._filter_dense

    def counted_dense(*args):
        calls["dense"] += 1
        return dense(*args)
    monkeypatch.setattr(sampler_module, "_filter_dense", counted_dense)
    gen = torch.Generator().manual_seed(2)
    peaky = 8 * torch.randn(6, 4096, generator=gen)
    rows = [_params(1.0, top_p=0.9), _params(0.7, top_k=40, top_p=0.95), _params(0.5, top_p=0.5),
            _params(1.5, top_p=0.99, penalty=1.2), _params(1.0, top_k=3), _params(1.0, top_p=1e-9)]
    seen = _seen(rows, 4096, gen)
    _assert_matches_hf(peaky, rows, seen, candidates=True)
    assert calls["dense"] == 0
    flat = peaky.clone()
    flat[0] = torch.randn(4096, generator=gen) / 10          # nucleus ~3700 columns: dense
    _assert_matches_hf(flat, rows, seen, candidates=True)
    assert calls["dense"] == 1
    no_filter = rows[:5] + [_params(1.0)]                       # a row without top-k/top-p: dense
    _assert_matches_hf(peaky, no_filter, seen, candidates=True)
    assert calls["dense"] == 2
    # A top-p-only row whose left-out columns hold real mass (HF counts it into every cumulative).
    tail = -9 + 0.1 * torch.randn(1, 4096, generator=gen)                     # ~12% of the mass
    tail[0, :20] = -2 + 0.01 * torch.randn(20, generator=gen)
    tail[0, 20] = 0.0
    _assert_matches_hf(tail, [_params(1.0, top_p=0.85)], [[]], candidates=True)
    assert calls["dense"] == 2                               # exact on the candidates
    # A tie across the candidates' edge that top-p cuts through: dense (HF's sort orders the tie).
    plateau = torch.full((1, 4096), -12.0)
    plateau[0, 0] = 0.0
    _assert_matches_hf(plateau, [_params(1.0, top_p=0.98)], [[]], candidates=True)
    assert calls["dense"] == 3
    ties = torch.randint(0, 6, (4, 300), generator=gen).float()   # ~50 tokens per value
    rows = [_params(1.0, top_k=10), _params(0.8, top_k=3), _params(1.0, top_k=60), _params(1.2, top_k=70)]
    for candidates in (False, True):
        _assert_matches_hf(ties, rows, [[]] * 4, candidates)
        kept = processed_logits(ties, rows, [[]] * 4, candidates=candidates).isfinite().sum(-1)
        assert (kept > torch.tensor([10, 3, 60, 70])).all()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_greedy_rows_are_the_argmax(device):
    gen = torch.Generator().manual_seed(3)
    params = [_params(), _params(1.0, top_p=0.9), _params(), _params(0.7, seed=5), _params(penalty=1.5)]
    logits = torch.randn(len(params), 2000, generator=gen).to(device)
    seen = _seen(params, 2000, gen)
    generators = [make_generator(5, device) if p.seed is not None else None for p in params]
    got = Sampler(device).sample(logits.bfloat16(), params, seen, generators)
    penalised = processed_logits(logits.bfloat16(), params, seen)
    for i in (0, 2, 4):
        assert got[i] == int(penalised[i].argmax())
    assert got[0] == int(logits.bfloat16()[0].argmax())
    assert Sampler(device).sample(logits, [_params()] * len(params), [[]] * len(params),
                                  [None] * len(params)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_top_k_1_equals_greedy(device):
    gen = torch.Generator().manual_seed(4)
    greedy = [_params(), _params(penalty=1.4), _params(), _params(penalty=0.7)]
    top1 = [_params(0.8, top_k=1), _params(1.5, top_k=1, top_p=0.3, penalty=1.4),
            _params(1e-6, top_k=1, seed=3), _params(3.0, top_k=1, seed=4, penalty=0.7)]
    logits = (4 * torch.randn(4, 3000, generator=gen)).to(device)
    seen = _seen(greedy, 3000, gen)
    generators = [make_generator(p.seed, device) if p.seed is not None else None for p in top1]
    sampler = Sampler(device, seed=9)
    expected = sampler.sample(logits, greedy, seen, [None] * 4)
    for _ in range(3):
        assert sampler.sample(logits, top1, seen, generators) == expected


def _crowds(p_seeded):
    """Batches holding the seeded row (index 2) among greedy, unseeded, other-seeded rows; the
    second forces the dense filter path (a row without top-k), the first allows candidates."""
    return [[_params(), _params(1.0, top_k=30), p_seeded, _params(0.9, top_k=40, seed=8),
             _params(1.1, top_k=10)],
            [_params(1.0, top_p=0.9), _params(penalty=1.2), p_seeded, _params(0.9, seed=11),
             _params(1.1, top_k=10, penalty=1.3)]]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_seeded_row_is_batch_independent(device):
    vocab, steps = 500, 6
    p_seeded = _params(1.0, top_k=100, top_p=0.95, penalty=1.1, seed=7)
    gen = torch.Generator().manual_seed(5)
    step_logits = [(2 * torch.randn(5, vocab, generator=gen)).to(device) for _ in range(steps)]
    seen = [list(range(0, 500, 7)) if p.has_penalty else [] for p in _crowds(p_seeded)[1]]

    alone = make_generator(7, device)
    sampler = Sampler(device, seed=1)
    expected = [sampler.sample(lg[2:3], [p_seeded], [seen[2]], [alone])[0] for lg in step_logits]
    assert len(set(expected)) > 1                     # the draws do vary
    for crowd in _crowds(p_seeded):
        generators = [make_generator(p.seed, device) if p.seed is not None else None for p in crowd]
        sampler = Sampler(device, seed=2)
        got = [sampler.sample(lg, crowd, seen, generators)[2] for lg in step_logits]
        assert got == expected


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    mask = probs > 0
    assert counts[~mask].sum() == 0                    # a removed token is never drawn
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_exponential_race_follows_the_distribution(device):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # 4 live tokens in a vocab of 64 (the rest ~e^-40): both filter paths on CPU see the same ones.
    logits = torch.full((64,), -40.0)
    logits[[5, 17, 33, 60]] = probs.log()
    ids = torch.tensor([5, 17, 33, 60])
    n = 2000
    X2_999 = 16.27                                     # chi-square, 3 degrees of freedom, p = 0.001

    # Unseeded: 2000 rows drawn together from the shared generator (the candidate path: top-k 10).
    batch = logits.expand(n, -1).to(device)
    top_k = [_params(1.0, top_k=10)] * n
    tokens = torch.tensor(Sampler(device, seed=3).sample(batch, top_k, [[]] * n, [None] * n))
    assert _chi_square((tokens[:, None] == ids).sum(0), probs) < X2_999
    # Unseeded, dense path with temperature 2: p ** 0.5, renormalised.
    tokens = torch.tensor(Sampler(device, seed=4).sample(batch, [_params(2.0)] * n, [[]] * n, [None] * n))
    tempered = probs.sqrt() / probs.sqrt().sum()
    assert _chi_square((tokens[:, None] == ids).sum(0), tempered) < X2_999
    # Seeded: one row, 2000 steps of its own generator, top-p 0.75 removes the 0.1 token.
    sampler, own = Sampler(device), make_generator(12, device)
    row = logits[None].to(device)
    drawn = torch.tensor([sampler.sample(row, [_params(1.0, top_p=0.75, seed=12)], [[]], [own])[0]
                          for _ in range(n)])
    assert _chi_square((drawn[:, None] == ids).sum(0), torch.tensor([0.0, 0.2, 0.3, 0.4]) / 0.9) < X2_999


def test_degenerate_logits_do_not_fail_the_step():
    logits = torch.randn(4, 100)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[2, 9] = 0.0
    params = [_params(1.0, top_p=0.9)] * 3 + [_params(1e-30, top_k=5)]      # a tiny temperature
    got = Sampler(CPU).sample(logits, params, [[]] * 4, [None] * 4)
    assert got[1] == 7 and got[2] == 9 and got[3] == int(logits[3].argmax())
    assert all(0 <= t < 100 for t in got)


def test_penalty_ignores_ids_past_the_vocab():
    logits = torch.randn(2, 50)
    params = [_params(penalty=2.0), _params(penalty=2.0)]
    out = processed_logits(logits, params, [[3, 60, 49], [120]])     # HF drops ids >= V
    expected = _hf(logits[0], params[0], [3, 49])
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], logits[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_queues_without_waiting():
    """Before the one explicit wait, nothing reads a device value back (the host only queues)."""
    device = torch.device("cuda")
    params = MIXED + [_params(0.8, seed=3), _params(1.0, top_k=4, seed=4)]
    logits = torch.randn(len(params), 32000, device=device)
    seen = _seen(params, 32000, torch.Generator().manual_seed(6))
    generators = [make_generator(p.seed, device) if p.seed is not None else None for p in params]
    sampler = Sampler(device)
    sampler.choose(logits, params, seen, generators)           # warm-up (pinned pool, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chosen = sampler.choose(logits, params, seen, generators)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert chosen.shape == (len(params),)


# ---- the v1 additions: logit bias, presence/frequency, min_new_tokens, min-p, log-probabilities ----
def _v1(temperature=0.0, top_k=0, top_p=0.0, penalty=0.0, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=penalty, **extra)


def _openai_counts(row: torch.Tensor, p: SamplingParams, generated: list[int]) -> torch.Tensor:
    """The OpenAI formula, by hand: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty."""
    out = row.clone()
    for token in set(generated):
        count = generated.count(token)
        out[token] -= count * p.frequency_penalty + (1.0 if count else 0.0) * p.presence_penalty
    return out


def _hf_v1(row: torch.Tensor, p: SamplingParams, seen: list[int], generated: list[int], eos: tuple[int, ...]):
    """One row through HF's processors (and the hand-computed OpenAI penalties) in our order."""
    from transformers import MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, SequenceBiasLogitsProcessor
    prompt = [0] * 3
    ids = torch.tensor([prompt + generated])
    scores = row[None].float().clone()
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(ids, scores)
    if p.has_penalty:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen or [0]]), scores)
    if p.has_count_penalty:
        scores = _openai_counts(scores[0], p, generated)[None]
    if p.min_new_tokens:
        stop = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos))
        scores = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_new_tokens, stop)(ids, scores)
    if not p.greedy:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
        if p.top_k > 0:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if 0.0 < p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
        if p.min_p > 0:
            scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


V1_ROWS = [
    _v1(logit_bias=((3, 5.0), (7, -100.0), (999, 2.5))),
    _v1(0.8, top_k=50, logit_bias=((1, 100.0),), penalty=1.2),
    _v1(presence_penalty=0.7, frequency_penalty=0.4),
    _v1(1.2, presence_penalty=-1.5, frequency_penalty=2.0, penalty=1.3),
    _v1(min_new_tokens=5, stop_token_ids=(11, 12)),                       # 3 generated: masked
    _v1(0.9, min_new_tokens=2, stop_token_ids=(11,)),                     # 3 generated: not masked
    _v1(1.0, min_new_tokens=8, ignore_eos=True, stop_token_ids=(13,)),    # EOS not masked
    _v1(1.0, min_p=0.1), _v1(0.7, top_k=40, min_p=0.3), _v1(1.5, top_p=0.9, min_p=0.05),
    _v1(1.0, min_p=1.0), _v1(0.8, min_p=0.2, logit_bias=((5, 3.0),), frequency_penalty=1.0),
    _v1(), _v1(1.0, top_k=10),
]


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("candidates", [False, True])
def test_v1_processors_match_hf(device, candidates):
    gen = torch.Generator().manual_seed(21)
    vocab, eos = 1000, (2, 4)
    logits = (3 * torch.randn(len(V1_ROWS), vocab, generator=gen)).to(device)
    logits[:, [2, 4, 11, 12, 13]] += 6                      # stop ids likely: the mask must matter
    seen = _seen(V1_ROWS, vocab, gen)
    generated = [[5, 9, 5], [1], [3, 3, 3, 8, 8, 42], [7, 7, 100], [1, 2, 3], [1, 2, 3], [9, 9, 9],
                 [], [1], [2, 2], [], [5, 5, 5, 5], [], [6]]
    before = logits.clone()
    ours = processed_logits(logits, V1_ROWS, seen, candidates=candidates, outputs=generated, eos_token_ids=eos)
    assert torch.equal(logits, before)
    for i, p in enumerate(V1_ROWS):
        expected = _hf_v1(logits[i].cpu(), p, seen[i], generated[i], eos)
        got = ours[i].cpu()
        # Masked ids are -inf in HF; ours -inf, or about the smallest float once tempered (probability 0).
        kept = expected.isfinite()
        assert torch.equal(got > -1e30, kept), f"row {i}: kept set differs"
        if not p.greedy:
            expected = expected - expected.max()
        torch.testing.assert_close(got[kept], expected[kept], rtol=1e-5, atol=1e-4)
    assert (ours[4, [2, 4, 11, 12]] < -1e30).all() and ours[5, 11] > -1e30 and ours[6, 2] > -1e30


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_v1_greedy_and_sampled_draws_respect_the_processors(device):
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(4, 300, generator=gen).to(device)
    params = [_v1(logit_bias=((17, 100.0),)), _v1(min_new_tokens=3, stop_token_ids=(int(logits[1].argmax()),)),
              _v1(1.0, min_p=1.0), _v1(1.0, top_k=5, logit_bias=((250, 100.0),))]
    sampler = Sampler(device, seed=3)
    for _ in range(5):
        got = sampler.sample(logits, params, [[]] * 4, [None] * 4, outputs=[[], [1], [], []])
        assert got[0] == 17
        assert got[1] == int(logits[1].topk(2).indices[1])     # the best is a stop id, masked
        assert got[2] == int(logits[2].argmax())               # min_p 1 keeps only the top token
        assert got[3] == 250


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_logprobs_are_the_raw_log_softmax_for_rows_that_asked(device):
    gen = torch.Generator().manual_seed(23)
    logits = (4 * torch.randn(5, 2000, generator=gen)).to(device).bfloat16()
    params = [_v1(logprobs=True, top_logprobs=5), _v1(0.9, top_k=20), _v1(logprobs=True),
              _v1(1.0, penalty=1.5, logit_bias=((3, 50.0),), logprobs=True, top_logprobs=20),
              _v1(0.7, min_p=0.1, logprobs=True, top_logprobs=1)]
    seen = [[], [], [], [3, 4, 5], []]
    out = Sampler(device, seed=1).sample_logprobs(logits, params, seen, [None] * 5)
    reference = logits.float().log_softmax(-1).cpu()         # the raw distribution, no processor
    assert out.logprobs[1] is None
    for i in (0, 2, 3, 4):
        lp = out.logprobs[i]
        assert lp.token_id == out.tokens[i]
        assert abs(lp.logprob - float(reference[i, lp.token_id])) < 1e-5
        k = params[i].top_logprobs
        assert len(lp.top) == k
        if k:
            values, ids = reference[i].topk(k)
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), values, rtol=0, atol=1e-5)
            assert all(float(reference[i, t]) == pytest.approx(v, abs=1e-5) for t, v in lp.top)
            assert [t for t, _ in lp.top][:1] == ids[:1].tolist()
    assert out.tokens[3] == 3                                 # the bias moved the draw, not the logprob
    assert out.logprobs[3].logprob < -1
