"""Structured output with xgrammar: grammars compiled once per (kind, value), matchers per request,
and one token bitmask per step for all the constrained rows.

Job: a request's `response_format` (kind, value) -> a compiled grammar (JSON schema, any JSON,
regex or EBNF, or one forced tool call) for this model's tokenizer; per step, the allowed next tokens of every constrained
row as one int32 bitmask [n, ceil(V/32)], applied to the logits on the device for the whole batch
(`TokenMask.apply`); after sampling, each matcher accepts its row's token.

Invariants:
- Compilation never runs inside an engine step: the service compiles while validating (that is
  how a bad schema becomes INVALID_ARGUMENT before the request is queued) and the engine starts its
  own compile on a worker thread when the request is added; both hit the per-(kind, value) cache
  after the first time. A step only waits for a compile that started after the previous step and
  is still running (a new, uncached grammar arriving right before its prefill).
- The grammar's stop tokens are the engine's EOS ids: a constrained row can end only where the
  grammar is complete, and once complete it can only end (the mask then allows EOS only).
- The bitmask is filled by xgrammar's batch matcher (its own threads, no per-row Python) into one
  host buffer kept across steps, copied to the device once per step, and applied by xgrammar's kernel to the rows that have a
  grammar (`indices`); other rows' logits are untouched.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar as xgr

from engine.inputs import InvalidInput
from engine.tools import CLOSE, OPEN

KINDS = ("json_schema", "json_object", "regex", "grammar", "tool_call")   # tool_call: engine/tools.py
MAX_CACHED = 256            # compiled grammars kept (least recently used dropped first)


class Grammars:
    """Compiles response formats for one tokenizer, caching per (kind, value); thread-safe.
    The tokenizer's xgrammar info is built on first use (~0.2 s for a 49k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size        # width of the logits, which may exceed the tokenizer's
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="baton-grammar")
        self._batch: xgr.BatchGrammarMatcher | None = None
        self._host: torch.Tensor | None = None        # the step's bitmask buffer (_host_bitmask)

    def compile(self, kind: str, value: str) -> xgr.CompiledGrammar:
        """The compiled grammar (waits for it); raises InvalidInput naming
        `params.response_format.<kind>` when the value is not a valid schema/regex/grammar."""
        return self.start(kind, value).result()

    def start(self, kind: str, value: str) -> concurrent.futures.Future:
        """The compile of (kind, value) as a future: a cached one, or one started on the worker."""
        key = (kind, value)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._cache[key] = self._pool.submit(self._compile, kind, value)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return future

    def for_request(self, kind: str, value: str) -> RowGrammar:
        """A new request's grammar state; its compile starts now (or is found in the cache)."""
        return RowGrammar(self.start(kind, value))

    def _compile(self, kind: str, value: str) -> xgr.CompiledGrammar:
        compiler = self._compiler_once()
        field_path = f"params.response_format.{kind}"
        try:
            if kind == "json_schema":
                # Compact JSON (no free whitespace): a model cannot pad the output with blanks forever.
                return compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "grammar":
                return compiler.compile_grammar(value)
            if kind == "tool_call":   # engine/tools.py: value is the JSON Schema of the call object
                return compiler.compile_grammar(xgr.Grammar.concat(
                    xgr.Grammar.from_ebnf(f"root ::= {json.dumps(OPEN)}"),
                    xgr.Grammar.from_json_schema(value, any_whitespace=False, strict_mode=True),
                    xgr.Grammar.from_ebnf(f"root ::= {json.dumps(CLOSE)}")))
        except RuntimeError as exc:   # xgrammar reports every parse/convert error as RuntimeError
            raise InvalidInput("tools" if kind == "tool_call" else field_path, _short(str(exc))) from None
        raise InvalidInput("params.response_format", f"unknown kind {kind!r}; expected one of {KINDS}")

    def _compiler_once(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    # ---- per step -----------------------------------------------------------------------------
    def constrain(self, grammars: list[RowGrammar | None], device: torch.device) -> StepGrammar | None:
        """One step's constraint for a batch whose row i has grammar state grammars[i] (None: free):
        the allowed next tokens of every constrained row, filled in one batched call into one
        [n, ceil(V/32)] bitmask on `device`. None when no row is constrained."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.ready() is not None]
        if not rows:
            return None
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")   # half the cores, for big batches
        matchers = [grammars[i].matcher for i in rows]
        bitmask = self._host_bitmask(len(grammars), device)                        # [n, W] int32, host
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        if device.type == "cuda":
            bitmask = bitmask.to(device, non_blocking=True)
        return StepGrammar(TokenMask(bitmask, rows, self.vocab_size), [grammars[i] for i in rows])

    def _host_bitmask(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """[num_rows, W] of one host buffer kept across steps (pinned for a CUDA engine, so the copy
        is asynchronous), reset to all allowed. Reuse is safe: a step waits for its sampling, which
        the mask's copy precedes on the stream (PendingSample.result), before the next step's
        sampling refills the buffer (a pipelined step's forward needs no mask)."""
        if self._host is None or self._host.shape[0] < num_rows:
            shape = xgr.get_bitmask_shape(max(num_rows, 8), self.vocab_size)
            self._host = torch.empty(shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        bitmask = self._host[:num_rows]
        xgr.reset_token_bitmask(bitmask)
        return bitmask


class RowGrammar:
    """One request's grammar: its compile (a future), then from its first step on, its matcher.
    `error` is set when the compile failed or the grammar refused a sampled token; the engine then
    ends the request with ERROR."""

    def __init__(self, compiled: concurrent.futures.Future) -> None:
        self._compiled = compiled
        self.matcher: xgr.GrammarMatcher | None = None
        self.error: str | None = None

    def ready(self) -> xgr.GrammarMatcher | None:
        """The matcher (made on first use; waits only for a compile still running), or None after an error."""
        if self.matcher is None and self.error is None:
            try:
                self.matcher = xgr.GrammarMatcher(self._compiled.result())
            except Exception as exc:  # noqa: BLE001 - reported on the request, never fails the batch
                self.error = f"response_format: {exc}"
        return self.matcher


@dataclass(frozen=True)
class StepGrammar:
    """The constrained rows of one step: their mask for the sampler, their matchers to advance."""
    mask: TokenMask
    grammars: list[RowGrammar]                     # of mask.rows, in order

    def accept(self, tokens: list[int]) -> None:
        """Each constrained row's matcher takes the token sampled for its row (tokens: all rows)."""
        picked = [tokens[i] for i in self.mask.rows]
        accepted = xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in self.grammars], picked)
        for grammar, token, ok in zip(self.grammars, picked, accepted):
            if not ok:
                grammar.error = f"response_format: the grammar refused token {token}"


@dataclass(frozen=True)
class TokenMask:
    """One step's grammar constraint: bit j of bitmask[i] is 0 where token j may not follow in row i;
    only the batch rows in `rows` are constrained."""
    bitmask: torch.Tensor            # [n, ceil(V/32)] int32, on the logits' device
    rows: list[int]
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """-inf, in place on logits [n, V], where the grammar of a constrained row forbids the token."""
        xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=self.vocab_size, indices=self.rows)


def _short(text: str) -> str:
    """xgrammar's message without its C++ source location prefix ("[12:00:00] /project/x.cc:83: ")."""
    text = text.strip()
    head, sep, tail = text.partition(": ")
    if sep and head.startswith("[") and ".cc:" in head:
        return tail.strip()
    return text
