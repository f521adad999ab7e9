"""The thread-safe facade the service holds, and the in-thread transport to the engine loop.

`EngineHandle` is what the service sees: validation, stream bookkeeping (one sink per open
request, so a dying engine can end them all), the limits, and the dispatch of the loop's typed
events (engine/loop.py) to sinks and pending calls. A transport only moves messages:

* `EngineClient` (here): the loop runs as a thread of this process (tests, fault injection,
  `--engine-in-thread`); commands go through a queue, events are dispatched on the engine thread.
* `engine.process.EngineProcess`: the loop runs in its own process (what `baton serve` uses), so
  the server's event loop and the engine never share a GIL.

Either way sinks are called on a thread that is not the caller's (the service hops them onto its
loop through a Mailbox), and Preempt-style calls answer through a `concurrent.futures.Future`.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable

import structlog
import torch

from engine import errors
from engine.build import Loader, ModelInfo, assemble_engine, build_engine  # noqa: F401 - re-exported
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import DuplicateRequest, EngineUnavailable, QueueFull
from engine.grammar import Grammars
from engine.inputs import GenerateInput, Limits, build_request, encode
from engine.loop import Abort, Add, Command, EngineLoop, Event, Outputs, Preempt, QueueSource, StatsQuery, Stop
from engine.outputs import EngineStats
from engine.request import FinishReason, PreemptAction, RequestOutput, RequestState

log = structlog.get_logger("baton.engine")
WARMUP_LONG_WORDS = 600   # the CUDA warm-up's second prompt (~1 token a word; a quarter of the context at most)

OutputSink = Callable[[RequestOutput], None]


class EngineHandle:
    """Validation, stream bookkeeping and event dispatch over a transport to the engine loop.
    Every public method is safe to call from any thread. Transports implement start, stop,
    alive and `_send`, and call `_dispatch` with each event and `_closed` when the loop is gone."""

    def __init__(self, config: EngineConfig, info: ModelInfo, tokenizer, grammars: Grammars | None = None) -> None:
        self.config = config
        self.info = info
        self._tokenizer = tokenizer
        # Compiles response formats while validating (a bad schema is INVALID_ARGUMENT, and the
        # engine's own compile of it is a cache hit when the engine shares this object).
        self.grammars = grammars or Grammars(tokenizer, info.vocab_size, info.eos_token_ids)
        self.limits = Limits(info.max_context_length, config.default_max_new_tokens, config.max_new_tokens_limit,
                             info.vocab_size, info.max_batch_size)
        self._lock = threading.Lock()
        self._sinks: dict[str, OutputSink] = {}   # open streams, so a dying engine can end them all
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._stats = EngineStats()                 # the loop's latest report
        self._stop = threading.Event()              # set by stop(), or when the engine loop is gone
        self.ready = False

    # ---- for the service --------------------------------------------------------------------
    def warmup(self) -> None:
        """A short generation through the whole path, so the first user does not pay for it; on
        CUDA then one with a prompt of a few hundred tokens: under tensor parallelism the first
        prefill of that size paid ~0.5 s once, after a short one (note 33: every first fresh TP
        process's TTFT p50 0.67-0.73 s against 0.13 with this warm-up; not NCCL's connection
        set-up, NCCL_RUNTIME_CONNECT=0 changed nothing)."""
        prompts = [("warmup", "Hello")]
        if self.info.device.startswith("cuda"):
            words = min(WARMUP_LONG_WORDS, self.info.max_context_length // 4)
            prompts.append(("warmup-long", " hello" * words))
        for request_id, prompt in prompts:
            done = threading.Event()
            self.submit(GenerateInput(request_id=request_id, prompt=prompt, max_new_tokens=2),
                        lambda out, done=done: done.set() if out.finished else None)
            if not done.wait(600):   # the first CUDA step may compile kernels
                raise RuntimeError("engine warm-up did not finish")

    def tokenize(self, prompt: str, messages: tuple[tuple[str, str], ...]) -> tuple[list[int], list[str]]:
        ids = encode(self._tokenizer, prompt, messages)
        return ids, self._tokenizer.convert_ids_to_tokens(ids)

    def submit(self, inp: GenerateInput, sink: OutputSink) -> str:
        """Validate (raises InvalidInput), then queue (raises QueueFull, DuplicateRequest,
        EngineUnavailable). Returns the request id."""
        if not self.alive:
            raise EngineUnavailable("engine is not running")
        request = build_request(inp, self._tokenizer, self.limits, self.grammars)
        rid = request.request_id

        def counted_sink(out: RequestOutput) -> None:
            if out.finished:
                with self._lock:
                    if self._sinks.pop(rid, None) is None:
                        return  # this stream was already ended once
            sink(out)

        with self._lock:
            if self._stop.is_set():
                raise EngineUnavailable("engine is not running")
            if rid in self._sinks:
                raise DuplicateRequest(f"request_id {rid!r} is already in flight")
            if len(self._sinks) >= self.config.max_queue + self.info.max_batch_size:
                raise QueueFull(f"{len(self._sinks)} requests in flight; retry later")
            self._sinks[rid] = counted_sink
        self._send(Add(request))
        return rid

    def abort(self, request_id: str) -> None:
        """Best effort cancel (client went away); unknown or finished ids are ignored."""
        self._send(Abort(request_id))

    def preempt(self, request_id: str, action: PreemptAction, priority: int | None,
                owner: str | None = None) -> concurrent.futures.Future:
        """-> Future[RequestState]; fails with an engine.errors.EngineError (UnknownRequest, ...)."""
        return self._call(lambda call_id: Preempt(call_id, request_id, action, priority, owner))

    def fresh_stats(self) -> concurrent.futures.Future:
        """-> Future[EngineStats] computed by the loop between steps (exact, unlike `stats`)."""
        return self._call(StatsQuery)

    def stats(self) -> EngineStats:
        """The loop's latest report: gauges as of the last change of rows, counters at most
        0.25 s old while busy; exact when idle."""
        return self._stats.settled(time.monotonic())

    # ---- for transports ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def _send(self, command: Command) -> None:
        raise NotImplementedError

    def _call(self, make: Callable[[int], Command]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stop.is_set():
                future.set_exception(EngineUnavailable("engine is not running"))
                return future
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self._send(make(call_id))
        return future

    def _dispatch(self, message: Event) -> None:
        """One event from the loop: stream events to their sinks, replies to their calls."""
        if type(message) is Outputs:
            if message.stats is not None:
                self._stats = message.stats
            sinks = self._sinks
            for out in message.events:
                sink = sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
            return
        with self._lock:
            future = self._calls.pop(message.call_id, None)
        if future is None:
            return
        if message.error is not None:
            name, text = message.error
            future.set_exception(errors.BY_NAME.get(name, errors.EngineInternalError)(text))
        else:
            future.set_result(message.stats if message.stats is not None else message.state)

    def _closed(self, error: str) -> None:
        """The engine loop is gone: end every open stream as retryable (UNAVAILABLE) and fail
        every pending call; never hang one."""
        with self._lock:
            self._stop.set()
            sinks = list(self._sinks.items())
            calls, self._calls = list(self._calls.values()), {}
        for rid, sink in sinks:  # counted sinks: each removes itself from _sinks, then forwards
            sink(RequestOutput(rid, state=RequestState.FINISHED, finish_reason=FinishReason.ERROR,
                               error=error, retryable=True))
        for future in calls:
            future.set_exception(EngineUnavailable("engine is not running"))


class EngineClient(EngineHandle):
    """The engine loop as a thread of this process."""

    def __init__(self, config: EngineConfig, prebuilt: tuple[LLMEngine, ModelInfo, object] | None = None) -> None:
        """Loads the model named by `config`, or wraps `prebuilt` (engine, info, tokenizer),
        e.g. a benchmark's in-process model."""
        self.engine, info, tokenizer = prebuilt or build_engine(config)
        super().__init__(config, info, tokenizer, self.engine.grammars)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.config.warmup:
            self.warmup()
        self.ready = True

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._send(Stop())
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _send(self, command: Command) -> None:
        self._commands.put(command)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            EngineLoop(self.engine, QueueSource(self._commands), self._dispatch).run()
        except BaseException as exc:  # the engine cannot go on: end every open stream, never hang one
            log.critical("engine_thread_died", error=repr(exc), traceback=traceback.format_exc())
            raise
        finally:
            self._closed("engine stopped")
