"""Batched sampling: one token per row of a step's logits, the rows sampled together as tensor ops.

Job: logits [n, V] + each row's SamplingParams -> n token ids. First the grammar mask of the
structured-output rows (one bitmask for the batch, engine/grammar.py), then in Hugging Face
`generate` order: logit bias (SequenceBiasLogitsProcessor), repetition penalty (RepetitionPenaltyLogitsProcessor),
the OpenAI presence/frequency penalties, the min_new_tokens mask (MinNewTokensLengthLogitsProcessor),
then temperature, top-k, top-p, min-p (the Temperature/TopK/TopP/MinPLogitsWarper). Greedy rows take
the argmax of their processed logits. Rows that ask for log-probabilities get those of the raw
logits (before any processor), for all of them in one log-softmax.

Invariants:
- Whole-batch ops, not per-row loops: the bias is one index_add over every biased row, the
  repetition penalty one gather/scatter over every penalised row, presence/frequency one count
  scatter_add, the min-tokens mask one index_fill,
  temperature/top-k/top-p run on the [m, V] sub-batch of sampled rows with per-row parameter
  tensors, greedy rows share one argmax, and the draw is one "exponential race" (argmax of p / E,
  E ~ Exponential(1), picks token i with probability p_i, as gpt-fast's
  multinomial_sample_one_no_sync) instead of a multinomial per row.
- Randomness: the unseeded sampled rows draw their noise in ONE call from the Sampler's generator.
  A row with its own seed draws a full [V] of noise from its own generator every step and uses it
  by vocab id; that is the only per-row op, and it makes a seeded row's tokens depend on its own
  logits and generator only, never on what else shares the batch.
- Filters run dense (over all V) on CUDA. On CPU they first try a few best columns per row (no
  sort over V) and keep that only where it provably equals the dense result; the check reads the
  data, which on CUDA would be a mid-step device wait.
- The caller's logits are never edited. On CUDA nothing reads a device value back before the one
  wait in `PendingSample.result`, for the step's copies to the host alone: the host only queues
  kernels until then, and may queue the next decode step (reading `tokens`) before it waits.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import torch

from engine.grammar import TokenMask
from engine.request import SamplingParams, TokenLogprob

_NEG_INF = float("-inf")
# Candidate columns first tried on CPU for a top-p row without top-k (x4 per retry, up to V/4).
_FIRST_TOP_P_WIDTH = 1024


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _to_device(data: list | array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list (or array) on `device`; on CUDA through pinned memory with a non-blocking
    copy: a blocking host-to-device copy would wait for the forward still queued on the stream."""
    host = torch.frombuffer(data, dtype=dtype) if isinstance(data, array) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _processed(logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
               outputs: list[list[int]] | None, eos_token_ids: tuple[int, ...],
               mask: TokenMask | None = None) -> torch.Tensor:
    """[n, V] float32 logits through the processors that apply to every row (greedy or not): first
    the grammar mask (-inf where a constrained row's grammar forbids the token, as vLLM), then in
    Hugging Face `generate` order: logit bias (SequenceBiasLogitsProcessor), repetition penalty,
    then the OpenAI presence/frequency penalties over the generated tokens, then the min-tokens
    mask (EOS, unless ignored, and stop token ids at -inf below min_new_tokens, as
    MinNewTokensLengthLogitsProcessor). Each is one batched op over the rows that use it.
    Returns a new tensor when anything applies; never edits `logits`."""
    n, vocab = logits.shape
    outputs = outputs if outputs is not None else [[]] * n
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalised = _repetition_rows(params, seen_ids, vocab)
    counted = [i for i, p in enumerate(params) if p.has_count_penalty and outputs[i]]
    masked = _masked_ids(params, outputs, eos_token_ids, vocab)
    if not (biased or penalised or counted or masked or mask is not None):
        return logits.float()
    out = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)   # [n, V]
    flat = out.view(-1)                                                               # [n*V]
    if mask is not None:
        mask.apply(out)
    if biased:
        index, bias = array("q"), array("f")
        for i in biased:
            for token, value in params[i].logit_bias:
                index.append(i * vocab + token)
                bias.append(value)
        flat.index_add_(0, _to_device(index, torch.long, out.device), _to_device(bias, torch.float32, out.device))
    if penalised:
        _apply_repetition(flat, vocab, params, penalised)
    if counted:
        _apply_counts(out, params, outputs, counted)
    if masked:
        flat.index_fill_(0, _to_device(masked, torch.long, out.device), _NEG_INF)
    return out


def _repetition_rows(params: list[SamplingParams], seen_ids: list[list[int]], vocab: int) -> dict[int, list[int]]:
    """Row -> the ids its repetition penalty applies to (as HF: ids past the logits' width dropped)."""
    seen: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        ids = seen_ids[i] if p.has_penalty else None
        if not ids:
            continue
        if min(ids) < 0 or max(ids) >= vocab:
            ids = [t for t in ids if 0 <= t < vocab]
        if ids:
            seen[i] = ids
    return seen


def _apply_repetition(flat: torch.Tensor, vocab: int, params: list[SamplingParams], seen: dict[int, list[int]]) -> None:
    """The repetition penalty on every penalised row at once, in place on flat [n*V] (HF
    RepetitionPenaltyLogitsProcessor: seen scores < 0 are multiplied by the penalty, the others divided)."""
    width = max(map(len, seen.values()))
    table = array("q")                               # per penalised row: its row index, then its ids
    for row, ids in seen.items():
        # Pad with a repeated id of the same row. Repeats (padding or in the ids) gather the same
        # score and scatter the same value, so they change nothing (HF does not deduplicate either).
        table.append(row)
        table.extend(ids)
        table.extend([ids[0]] * (width - len(ids)))
    table_t = _to_device(table, torch.long, flat.device).view(len(seen), 1 + width)   # [n_pen, 1+W]
    index = (table_t[:, 1:] + table_t[:, :1] * vocab).view(-1)   # [n_pen*W] positions in flat
    penalty = _to_device([params[i].repetition_penalty for i in seen], torch.float32, flat.device)
    penalty = penalty[:, None]                                    # [n_pen, 1]
    score = flat.gather(0, index).view(len(seen), width)         # [n_pen, W]
    score = torch.where(score < 0, score * penalty, score / penalty)
    flat.scatter_(0, index, score.view(-1))


def _apply_counts(out: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]], rows: list[int]) -> None:
    """OpenAI presence/frequency penalties, in place on out [n, V]: logit[j] -= count[j] *
    frequency_penalty + (count[j] > 0) * presence_penalty, count over the row's generated ids."""
    vocab = out.shape[1]
    width = max(len(outputs[i]) for i in rows)
    table = array("q")
    for i in rows:                                   # padded with V: a column dropped below
        table.extend(outputs[i])
        table.extend([vocab] * (width - len(outputs[i])))
    ids = _to_device(table, torch.long, out.device).view(len(rows), width)              # [n_c, W]
    counts = out.new_zeros(len(rows), vocab + 1).scatter_add_(1, ids, out.new_ones(len(rows), width))
    counts = counts[:, :vocab]                                                        # [n_c, V]
    coef = _to_device([[params[i].frequency_penalty for i in rows], [params[i].presence_penalty for i in rows]],
                      torch.float32, out.device)                                       # [2, n_c]
    delta = counts * coef[0, :, None] + (counts > 0) * coef[1, :, None]
    out.index_add_(0, _to_device(rows, torch.long, out.device), delta, alpha=-1)


def _masked_ids(params: list[SamplingParams], outputs: list[list[int]], eos_token_ids: tuple[int, ...],
                vocab: int) -> array:
    """Flat positions (row * V + id) of the ids that may not end a row yet (min_new_tokens)."""
    masked = array("q")
    for i, p in enumerate(params):
        if p.min_new_tokens and len(outputs[i]) < p.min_new_tokens:
            ids = set(p.stop_token_ids) if p.ignore_eos else set(eos_token_ids) | set(p.stop_token_ids)
            masked.extend(i * vocab + t for t in ids if 0 <= t < vocab)
    return masked


@dataclass
class _RowParams:
    """The sampled rows' filter parameters: tensors for the math, host lists to pick code paths."""
    temperature: torch.Tensor        # [m, 1]
    top_k: torch.Tensor              # [m] long; V where top-k is off
    threshold: torch.Tensor          # [m, 1] 1 - top_p; -1 where top-p is off (no cumulative is <= -1)
    log_min_p: torch.Tensor          # [m, 1] log(min_p); -inf where min-p is off
    k_host: list[int]                # top_k as above
    p_host: list[bool]               # top-p on
    min_p_host: bool                 # some row has min-p

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> _RowParams:
        k_host = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        p_host = [0.0 < p.top_p < 1.0 for p in params]
        table = _to_device([[p.temperature for p in params], k_host,
                            [1.0 - p.top_p if on else -1.0 for p, on in zip(params, p_host)],
                            [math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in params]],
                           torch.float32, device)                              # [4, m], one copy
        return cls(table[0, :, None], table[1].long(), table[2, :, None], table[3, :, None], k_host, p_host,
                   any(p.min_p > 0 for p in params))

    def k_widest(self, vocab: int) -> int:
        """The largest top-k in use (0: none)."""
        return max((k for k in self.k_host if k < vocab), default=0)

    def top_p_only(self, vocab: int) -> bool:
        """Some row has top-p but not top-k."""
        return any(p and k == vocab for k, p in zip(self.k_host, self.p_host))


@dataclass
class _Kept:
    """The sampled rows after temperature/top-k/top-p: `logits[r, j]` (row max 0, -inf where
    removed) is the logit of vocab id `ids[r, j]`, or of id j when `ids` is None (then C = V)."""
    logits: torch.Tensor             # [m, C] float32
    ids: torch.Tensor | None         # [m, C] long, or None

    def dense(self, vocab: int) -> torch.Tensor:
        """[m, V], -inf outside the kept columns."""
        if self.ids is None:
            return self.logits
        out = self.logits.new_full((self.logits.shape[0], vocab), _NEG_INF)
        return out.scatter_(1, self.ids, self.logits)


def _top_p_removed(cumulative: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """HF TopPLogitsWarper on the cumulative probabilities of logits sorted ascending [m, C] ->
    bool [m, C], True = removed: cumulative <= 1 - top_p, never the most likely token (last)."""
    removed = cumulative <= threshold                                          # [m, C]
    removed[:, -1] = False
    return removed


def _filter_dense(x: torch.Tensor, rows: _RowParams) -> _Kept:
    """Top-k then top-p over all V columns of x [m, V]; control flow independent of the data."""
    vocab = x.shape[1]
    k_widest = rows.k_widest(vocab)
    if k_widest:
        values = x.topk(k_widest, dim=-1).values                              # [m, k_widest] descending
        kth = values.gather(1, (rows.top_k.clamp(max=k_widest) - 1)[:, None])  # [m, 1]
        kth = kth.masked_fill(rows.top_k[:, None] >= vocab, _NEG_INF)        # top-k off: keep all
        x = x.masked_fill(x < kth, _NEG_INF)                                 # HF keeps ties with kth
    if any(rows.p_host):
        ascending, order = x.sort(dim=-1)                                     # [m, V] each
        removed = _top_p_removed(ascending.softmax(-1).cumsum(-1), rows.threshold)
        x = x.masked_fill(removed.scatter(1, order, removed), _NEG_INF)
    return _Kept(x, None)


def _filter_width(x: torch.Tensor, rows: _RowParams, width: int) -> _Kept | None:
    """Top-k then top-p on each row's `width` best columns of x [m, V] only (no sort over V), every
    row having top-k or top-p; None unless every column left out is provably removed, so that the
    result equals the dense one. Reads the data (a device wait)."""
    vocab = x.shape[1]
    k_on = rows.top_k[:, None] < vocab                                         # [m, 1]
    values, ids = x.topk(width + 1, dim=-1)                                    # [m, C+1] descending
    left_out = values[:, -1:]                                                  # [m, 1] best column left out
    values, ids = values[:, :-1], ids[:, :-1]                                  # [m, C]
    kth = values.gather(1, (rows.top_k.clamp(max=width) - 1)[:, None]).masked_fill(~k_on, _NEG_INF)
    values = values.masked_fill(values < kth, _NEG_INF)                        # top-k
    mass = values.exp().sum(-1, keepdim=True)                                  # [m, 1] (row max is 0)
    total = mass                              # with top-k on, every column left out is removed
    if rows.top_p_only(vocab):
        total = torch.where(k_on, mass, x.exp().sum(-1, keepdim=True))
    outside = 1 - mass / total                                                 # [m, 1] probability left out
    # Exact when no tie with a top-k row's k-th value reaches out, and a top-p-only row leaves out
    # only columns below all of its candidates, of total probability <= 1 - top_p (HF removes those).
    exact_p = (left_out < values[:, -1:]) & (outside <= rows.threshold)
    if not bool(torch.where(k_on, left_out < kth, exact_p).all()):
        return None
    cumulative = outside + (values.flip(-1).exp() / total).cumsum(-1)          # [m, C] ascending
    removed = _top_p_removed(cumulative, rows.threshold).flip(-1)              # [m, C] descending
    return _Kept(values.masked_fill(removed, _NEG_INF), ids)


def _filtered(x: torch.Tensor, params: list[SamplingParams], candidates: bool) -> _Kept:
    """Temperature, top-k, top-p and min-p on the sampled rows x [m, V], HF order and semantics.
    `candidates`: try `_filter_width` first (it reads the data; free on CPU only)."""
    rows = _RowParams.of(params, x.shape[1], x.device)
    kept = _filtered_top(x, rows, candidates)
    if rows.min_p_host:
        # HF MinPLogitsWarper: remove p < min_p * p_max. The kept logits have row max 0, so
        # p / p_max = exp(logit): remove logit < log(min_p) (the top token always stays).
        kept = _Kept(kept.logits.masked_fill(kept.logits < rows.log_min_p, _NEG_INF), kept.ids)
    return kept


def _filtered_top(x: torch.Tensor, rows: _RowParams, candidates: bool) -> _Kept:
    vocab = x.shape[1]
    # Shift by the max first: a tiny temperature (or an extreme penalty) must not overflow to inf/NaN
    # and fail the whole batch's step; for normal temperatures the draw is unchanged.
    finite = torch.finfo(x.dtype)
    x = x.nan_to_num(nan=finite.min, posinf=finite.max, neginf=finite.min)     # [m, V], new tensor
    x.sub_(x.amax(dim=-1, keepdim=True)).div_(rows.temperature)                # row max is 0
    if candidates and all(k < vocab or p for k, p in zip(rows.k_host, rows.p_host)):
        width = max(rows.k_widest(vocab), _FIRST_TOP_P_WIDTH if rows.top_p_only(vocab) else 1)
        while 4 * width <= vocab:
            kept = _filter_width(x, rows, width)
            if kept is not None:
                return kept
            width *= 4
    return _filter_dense(x, rows)


def _sampled_rows(params: list[SamplingParams]) -> list[int]:
    return [i for i, p in enumerate(params) if not p.greedy]


def processed_logits(logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
                     *, candidates: bool | None = None, outputs: list[list[int]] | None = None,
                     eos_token_ids: tuple[int, ...] = (), mask: TokenMask | None = None) -> torch.Tensor:
    """[n, V] float32: every row biased, penalised and min-tokens masked; sampled rows also tempered
    (max-shifted, so equal to HF up to a per-row constant) and top-k/top-p/min-p filtered, -inf
    where removed. `candidates` picks the filter path (None: as `Sampler` does on this device)."""
    out = _processed(logits, params, seen_ids, outputs, eos_token_ids, mask)
    rows = _sampled_rows(params)
    if not rows:
        return out
    index = _to_device(rows, torch.long, out.device)
    use_candidates = out.device.type == "cpu" if candidates is None else candidates
    kept = _filtered(out.index_select(0, index), [params[i] for i in rows], use_candidates)
    return out.index_copy(0, index, kept.dense(out.shape[1]))


@dataclass
class Sampled:
    """One step's draw: a token per row, and its log-probabilities where the row asked for them."""
    tokens: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class PendingSample:
    """A step's draw queued on the device (`Sampler.launch`): `tokens` [n] long on the device;
    `host_ids` (and `host_values`, the log-probability rows) their copies in host memory, landed
    once `ready` has passed (None: already there, on CPU)."""
    tokens: torch.Tensor
    host_ids: torch.Tensor
    host_values: torch.Tensor | None
    ready: torch.cuda.Event | None
    params: list[SamplingParams]
    logprob_rows: list[int]

    def result(self) -> Sampled:
        if self.ready is not None:
            # Wait in a call that releases the GIL for the whole wait, so other threads of this
            # process (the in-thread transport's event loop) run meanwhile; tolist() holds it for
            # part of its wait (docs/benchmarks.md, note 12).
            self.ready.synchronize()
        tokens = self.host_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(self.params)
        if self.host_values is None:
            return Sampled(tokens, logprobs)
        host = self.host_values.tolist()
        k = (self.host_values.shape[1] - 1) // 2   # columns: the chosen id's, k values, k ids
        for j, i in enumerate(self.logprob_rows):
            row, want = host[j], self.params[i].top_logprobs
            logprobs[i] = TokenLogprob(tokens[i], row[0], tuple(zip(map(int, row[1 + k:1 + k + want]), row[1:1 + want])))
        return Sampled(tokens, logprobs)


class Sampler:
    """Samples every row of a step at once; owns the generator of the unseeded sampled rows.
    `eos_token_ids`: what min_new_tokens masks besides a row's stop token ids."""

    def __init__(self, device: torch.device, seed: int = 0, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.device = torch.device(device)
        self.generator = make_generator(seed, self.device)
        self.candidates = self.device.type == "cpu"      # see the module docstring
        self.eos_token_ids = tuple(eos_token_ids)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
               generators: list[torch.Generator | None], outputs: list[list[int]] | None = None,
               mask: TokenMask | None = None) -> list[int]:
        """logits [n, V] (any float dtype) -> one token id per row. `generators[i]`: the row's own
        generator when it has a seed, else None; `seen_ids[i]`: prompt + output ids of a row with
        a repetition penalty, else []; `outputs[i]`: the row's generated ids so far (presence and
        frequency penalties, min_new_tokens; None: none yet); `mask`: the grammar constraint of
        the structured-output rows, if any."""
        return self.sample_logprobs(logits, params, seen_ids, generators, outputs, mask).tokens

    @torch.inference_mode()
    def sample_logprobs(self, logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
                        generators: list[torch.Generator | None],
                        outputs: list[list[int]] | None = None, mask: TokenMask | None = None) -> Sampled:
        """As `sample`, with the log-probabilities of the rows whose params ask for them: the
        log-softmax of the raw `logits` (before any processor) at the chosen id, and the row's
        top_logprobs best (id, logprob), computed for those rows in one pass on the device."""
        return self.launch(logits, params, seen_ids, generators, outputs, mask).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
               generators: list[torch.Generator | None], outputs: list[list[int]] | None = None,
               mask: TokenMask | None = None) -> PendingSample:
        """As `sample_logprobs`, but only queued: the ids stay on the device (`tokens`, which later
        device work may read at once) and their copy to the host is under way; `result()` waits
        for that copy alone, not for what was queued after it (the next decode step)."""
        chosen = self._choose(logits, params, seen_ids, generators, outputs, mask)  # [n] long
        rows = [i for i, p in enumerate(params) if p.logprobs]
        values = None
        if rows:
            # One copy of the log-probabilities for the step (not one per tensor): ids ride along
            # as float32, exact below 2^24 (every vocabulary is far smaller).
            lp_chosen, top_values, top_ids = self._logprobs(logits, params, chosen, rows)
            values = torch.cat([lp_chosen[:, None], top_values, top_ids.to(lp_chosen.dtype)], dim=1)
        if not chosen.is_cuda:
            return PendingSample(chosen, chosen, values, None, params, rows)
        host_ids = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host_ids.copy_(chosen, non_blocking=True)
        host_values = None
        if values is not None:
            host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host_values.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingSample(chosen, host_ids, host_values, ready, params, rows)

    @torch.inference_mode()
    def choose(self, logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
               generators: list[torch.Generator | None], outputs: list[list[int]] | None = None,
               mask: TokenMask | None = None) -> torch.Tensor:
        """As `sample`, but the ids stay on the device ([n] long), not waited for."""
        return self._choose(logits, params, seen_ids, generators, outputs, mask)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams], chosen: torch.Tensor,
                  rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `rows`: log-softmax of the raw logits at the chosen ids [l], and the best `k` values
        and ids [l, k], k the widest top_logprobs among them (each row keeps its own k later)."""
        if len(rows) == len(params):
            raw, picked = logits, chosen
        else:
            index = _to_device(rows, torch.long, logits.device)                        # [l]
            raw, picked = logits.index_select(0, index), chosen.index_select(0, index)
        logp = raw.float().log_softmax(dim=-1)                                         # [l, V]
        lp_chosen = logp.gather(1, picked[:, None]).squeeze(1)                          # [l]
        k = max(params[i].top_logprobs for i in rows)
        if not k:
            empty = logp.new_empty(len(rows), 0)
            return lp_chosen, empty, empty.long()
        top = logp.topk(k, dim=-1)                                                     # [l, k] each
        return lp_chosen, top.values, top.indices

    def _choose(self, logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]],
                generators: list[torch.Generator | None], outputs: list[list[int]] | None,
                mask: TokenMask | None = None) -> torch.Tensor:
        logits = _processed(logits, params, seen_ids, outputs, self.eos_token_ids, mask)   # [n, V] float32
        rows = _sampled_rows(params)
        if not rows:
            return logits.argmax(dim=-1)
        everyone = len(rows) == len(params)
        index = None if everyone else _to_device(rows, torch.long, logits.device)   # [m]
        sub = logits if everyone else logits.index_select(0, index)                # [m, V]
        kept = _filtered(sub, [params[i] for i in rows], self.candidates)          # [m, C]
        drawn = self._race(kept, [generators[i] for i in rows], logits.shape[1])   # [m]
        if everyone:
            return drawn
        return logits.argmax(dim=-1).index_copy_(0, index, drawn)

    def _race(self, kept: _Kept, generators: list[torch.Generator | None], vocab: int) -> torch.Tensor:
        """The exponential race: argmax over the kept columns of p / E, E ~ Exponential(1), picks
        each token with its probability p. p needs no normalising (a row-wide scale cannot move the
        argmax): exp(logits), 1 at the row max, 0 where removed. -> vocab ids [m]."""
        arrival = self._exponential(kept, generators, vocab)                # [m, C]
        pick = kept.logits.exp().div_(arrival).argmax(dim=-1)              # [m] column
        return pick if kept.ids is None else kept.ids.gather(1, pick[:, None]).squeeze(1)

    def _exponential(self, kept: _Kept, generators: list[torch.Generator | None], vocab: int) -> torch.Tensor:
        """Exponential(1) noise [m, C] for the kept columns: the unseeded rows' in one call from the
        shared generator; each seeded row's drawn as a full [V] from its own generator, by vocab id."""
        m, width = kept.logits.shape
        device = kept.logits.device
        seeded = [i for i, g in enumerate(generators) if g is not None]
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if not seeded:
            uniform = torch.rand(m, width, generator=self.generator, device=device)          # [m, C]
        else:
            own = torch.stack([torch.rand(vocab, generator=generators[i], device=device)
                               for i in seeded])                                             # [m_s, V]
            seeded_t = _to_device(seeded, torch.long, device)                                # [m_s]
            if kept.ids is not None:
                own = own.gather(1, kept.ids.index_select(0, seeded_t))                      # [m_s, C]
            uniform = own
            if unseeded:
                shared = torch.rand(len(unseeded), width, generator=self.generator, device=device)
                uniform = torch.empty(m, width, device=device).index_copy_(0, seeded_t, own)
                uniform.index_copy_(0, _to_device(unseeded, torch.long, device), shared)
        # E = -log(1 - U). U = 0 gives E = 0: clamp it to the smallest normal so that a removed
        # column scores 0 / tiny = 0, never 0 / 0 = NaN (which argmax would pick).
        return uniform.neg_().log1p_().neg_().clamp_min_(torch.finfo(torch.float32).tiny)
