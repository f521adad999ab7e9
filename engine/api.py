"""The thread-safe facade the service holds, and the engine loop behind it in a thread.

`EngineHandle` is what the service sees: validation, stream bookkeeping (one sink per open
request, so a dying engine can end them all) and the limits. Two transports carry its commands
to the engine loop:

* `EngineClient` (here): the loop runs as a thread of the calling process. Callers put
  commands on `_inbox`; the engine thread runs them between steps. Events come back through each
  request's sink, called on the engine thread.
* `engine.process.EngineProcess`: the loop runs in its own process (what `baton serve` uses), so
  the server's event loop and the engine never share a GIL.

Either way sinks are called on a thread that is not the caller's (the service hops them onto its
loop through a Mailbox), and Preempt-style commands answer through a `concurrent.futures.Future`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from engine import model_loader
from engine.config import EngineConfig
from engine.engine import LLMEngine, OutputSink
from engine.inputs import GenerateInput, Limits, build_request, encode
from engine.kv_slab import KVSlab
from engine.memory import MemoryMonitor
from engine.model_runner import ModelRunner
from engine.request import FinishReason, Request, RequestOutput, RequestState
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerError

log = structlog.get_logger("baton.engine")


class QueueFull(Exception):
    """Too many unfinished requests; retry later."""


class DuplicateRequest(Exception):
    """A request with this id is still in flight."""


class EngineUnavailable(Exception):
    """The engine thread is not running."""


class PreemptAction(enum.IntEnum):
    PRIORITY_ONLY = 0
    SUSPEND = 1
    RESUME = 2
    CANCEL = 3


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    max_context_length: int
    eos_token_ids: tuple[int, ...]
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_batch_size: int
    device: str
    dtype: str
    vocab_size: int
    has_chat_template: bool
    kv_slab_bytes: int
    decode: str = ""                 # the decode step the runner uses (ModelRunner.describe())


@dataclass(frozen=True)
class EngineStats:
    rows_on_device: int
    rows_parked: int
    requests_waiting: int
    kv_bytes_on_device: int
    kv_bytes_on_host: int
    steps: int
    step_errors: int
    preemptions: int
    bytes_offloaded: int
    bytes_restored: int
    seconds_prefill: float = 0.0     # GPU-synchronised time in prefill forwards (CUDA; 0 elsewhere)
    seconds_decode: float = 0.0      # ... and in decode steps
    seconds_idle: float = 0.0        # the engine loop waiting for work (finished waits, see `settled`)
    waiting_since: float | None = None   # monotonic time the current wait began; None while busy

    def settled(self, now: float) -> EngineStats:
        """These stats with the wait in progress counted as idle up to `now`."""
        if self.waiting_since is None:
            return self
        return dataclasses.replace(self, seconds_idle=self.seconds_idle + max(0.0, now - self.waiting_since),
                                   waiting_since=None)


Loader = Callable[[], tuple]   # () -> (hf_model, tokenizer, ModelSpec); picklable for EngineProcess


def build_engine(config: EngineConfig, loader: Loader | None = None) -> tuple[LLMEngine, ModelInfo, object]:
    """Load the model named by `config` (or whatever `loader` builds, e.g. a benchmark preset)
    and assemble an engine around it."""
    if loader is None:
        device = model_loader.resolve_device(config.device)
        dtype = model_loader.resolve_dtype(config.dtype, device)
        hf_model, tokenizer, spec = model_loader.load(config.model, device, dtype)
    else:
        hf_model, tokenizer, spec = loader()
    engine, info = assemble_engine(hf_model, tokenizer, spec, config)
    return engine, info, tokenizer


def assemble_engine(hf_model, tokenizer, spec: model_loader.ModelSpec,
                    config: EngineConfig) -> tuple[LLMEngine, ModelInfo]:
    """Slab, scheduler, runner and engine around an already loaded model."""
    device, dtype = hf_model.device, hf_model.dtype
    max_seq_len = min(config.max_seq_len or min(spec.max_context, 4096), spec.max_context)
    bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize
    monitor = MemoryMonitor(device, config.high_watermark, config.low_watermark)
    num_slots = monitor.slab_slots(config.max_batch_size, bytes_per_token * max_seq_len, config.kv_memory_fraction)
    slab = KVSlab(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_slots, max_seq_len, dtype, device)
    kv_budget = config.kv_budget_bytes if config.kv_budget_bytes is not None else slab.total_bytes
    scheduler = Scheduler(SchedulerConfig(
        max_batch_size=num_slots, max_prefill_tokens=config.max_prefill_tokens,
        kv_budget_tokens=kv_budget // bytes_per_token, max_row_tokens=max_seq_len,
        kv_bytes_per_token=bytes_per_token, host_budget_bytes=config.host_kv_budget_bytes,
        aging_seconds=config.aging_seconds))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fused = config.fused_decode
    if fused is None:  # auto: on CUDA, for the model families it supports
        from engine.fused_decode import unsupported_reason
        fused = device.type == "cuda" and unsupported_reason(hf_model) is None
    runner = ModelRunner(hf_model, slab, device, pad_token_id=pad, cuda_graphs=config.cuda_graphs,
                         fused_decode=fused)
    engine = LLMEngine(runner, scheduler, tokenizer, spec.eos_token_ids, seed=config.seed,
                       pressure=monitor.pressure,
                       pinned_arena_bytes=min(config.pinned_arena_bytes, config.host_kv_budget_bytes),
                       prefill_max_waste=1.0 if device.type == "cuda" else 0.1)
    info = ModelInfo(
        model_name=spec.name, max_context_length=max_seq_len, eos_token_ids=spec.eos_token_ids,
        max_new_tokens_limit=config.max_new_tokens_limit, default_max_new_tokens=config.default_max_new_tokens,
        max_batch_size=num_slots, device=str(device), dtype=str(dtype).removeprefix("torch."),
        vocab_size=spec.vocab_size, has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        kv_slab_bytes=slab.total_bytes, decode=runner.describe())
    return engine, info


# ---- the engine loop's pieces, shared by both transports ------------------------------------------
@dataclass
class StepCounts:
    steps: int = 0
    step_errors: int = 0
    seconds_idle: float = 0.0        # blocked waiting for a command with nothing to run (finished waits)
    waiting_since: float | None = None   # the wait in progress

    def wait_begins(self) -> None:
        self.waiting_since = time.monotonic()

    def wait_ends(self) -> None:
        self.seconds_idle += time.monotonic() - self.waiting_since
        self.waiting_since = None


def run_step(engine: LLMEngine, counts: StepCounts) -> None:
    """One engine step. A failing step fails its batch (every row ends with an error) but not the
    loop; it is counted before the rows' final events go out."""
    try:
        engine.step()
        counts.steps += 1
    except Exception as exc:  # noqa: BLE001 - one bad step must not kill the service
        counts.step_errors += 1
        log.error("engine_step_failed", error=repr(exc), traceback=traceback.format_exc())
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step's temporaries held
        engine.fail_batch(f"engine step failed: {exc!r}", out_of_memory=out_of_memory)


def apply_preempt(engine: LLMEngine, request_id: str, action: PreemptAction, priority: int | None,
                  owner: str | None) -> RequestState:
    """Run one Preempt call on the engine's thread; raises SchedulerError (NOT_FOUND, ...)."""
    request = engine.scheduler.get(request_id)
    if owner is not None and request.owner != owner:
        raise SchedulerError("PERMISSION_DENIED", f"request_id {request_id!r} belongs to another caller")
    if priority is not None:
        engine.scheduler.set_priority(request_id, priority)
    if action == PreemptAction.SUSPEND:
        request = engine.suspend(request_id)
    elif action == PreemptAction.RESUME:
        request = engine.resume(request_id)
    elif action == PreemptAction.CANCEL:
        request = engine.cancel(request_id)
    return request.state


def cancel_quietly(engine: LLMEngine, request_id: str) -> None:
    """Abort for a client that went away: unknown or finished ids are ignored."""
    try:
        engine.cancel(request_id)
    except SchedulerError:
        pass


def engine_stats(engine: LLMEngine, counts: StepCounts) -> EngineStats:
    host = sum(t.numel() * t.element_size() for t in list(engine.host_kv.values()))
    return EngineStats(
        rows_on_device=engine.slab.num_rows, rows_parked=len(engine.host_kv),
        requests_waiting=sum(r.state == RequestState.QUEUED for r in list(engine.scheduler.waiting)),
        kv_bytes_on_device=engine.slab.used_bytes, kv_bytes_on_host=host,
        steps=counts.steps, step_errors=counts.step_errors, preemptions=engine.num_parked_total,
        bytes_offloaded=engine.bytes_offloaded, bytes_restored=engine.bytes_restored,
        seconds_prefill=engine.seconds_prefill, seconds_decode=engine.seconds_decode,
        seconds_idle=counts.seconds_idle, waiting_since=counts.waiting_since)


class EngineHandle:
    """Validation and stream bookkeeping over a transport to the engine loop. Every public method
    is safe to call from any thread. Transports implement start, stop, alive, abort, preempt,
    stats and `_post_add`."""

    def __init__(self, config: EngineConfig, info: ModelInfo, tokenizer) -> None:
        self.config = config
        self.info = info
        self._tokenizer = tokenizer
        self.limits = Limits(info.max_context_length, config.default_max_new_tokens, config.max_new_tokens_limit)
        self._lock = threading.Lock()
        self._sinks: dict[str, OutputSink] = {}   # open streams, so a dying engine can end them all
        self._stop = threading.Event()              # set by stop(), or when the engine loop is gone
        self.ready = False

    def warmup(self) -> None:
        """One short generation through the whole path, so the first user does not pay for it."""
        done = threading.Event()
        self.submit(GenerateInput(request_id="warmup", prompt="Hello", max_new_tokens=2),
                    lambda out: done.set() if out.finished else None)
        if not done.wait(600):   # the first CUDA step may compile kernels
            raise RuntimeError("engine warm-up did not finish")

    def tokenize(self, prompt: str, messages: tuple[tuple[str, str], ...]) -> tuple[list[int], list[str]]:
        ids = encode(self._tokenizer, prompt, messages)
        return ids, self._tokenizer.convert_ids_to_tokens(ids)

    def submit(self, inp: GenerateInput, sink: OutputSink) -> str:
        """Validate (raises InvalidInput), then queue. Returns the request id."""
        if not self.alive:
            raise EngineUnavailable("engine is not running")
        request = build_request(inp, self._tokenizer, self.limits)
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
        self._post_add(request, counted_sink)
        return rid

    def _end_streams(self, error: str) -> None:
        """The engine loop is gone: end every open stream as retryable (UNAVAILABLE), never hang one."""
        with self._lock:
            self._stop.set()
            sinks = list(self._sinks.items())
        for rid, sink in sinks:  # counted sinks: each removes itself from _sinks, then forwards
            sink(RequestOutput(rid, state=RequestState.FINISHED, finish_reason=FinishReason.ERROR,
                               error=error, retryable=True))

    # ---- transport -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def _post_add(self, request: Request, sink: OutputSink) -> None:
        raise NotImplementedError


class EngineClient(EngineHandle):
    """The engine loop as a thread of this process (tests, fault injection, debugging)."""

    def __init__(self, config: EngineConfig, prebuilt: tuple[LLMEngine, ModelInfo, object] | None = None) -> None:
        """Loads the model named by `config`, or wraps `prebuilt` (engine, info, tokenizer),
        e.g. a benchmark's in-process model."""
        self.engine, info, tokenizer = prebuilt or build_engine(config)
        super().__init__(config, info, tokenizer)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._counts = StepCounts()
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.config.warmup:
            self.warmup()
        self.ready = True

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    # ---- requests --------------------------------------------------------------------------
    def _post_add(self, request: Request, sink: OutputSink) -> None:
        self._inbox.put(lambda: self.engine.add_request(request, sink))

    def abort(self, request_id: str) -> None:
        """Best effort cancel (client went away); unknown or finished ids are ignored."""
        self._inbox.put(lambda: cancel_quietly(self.engine, request_id))

    def preempt(self, request_id: str, action: PreemptAction, priority: int | None,
                owner: str | None = None) -> concurrent.futures.Future:
        """-> Future[RequestState]; fails with SchedulerError (NOT_FOUND, FAILED_PRECONDITION, ...)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(apply_preempt(self.engine, request_id, action, priority, owner))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        self._inbox.put(run)
        return future

    def stats(self) -> EngineStats:
        return engine_stats(self.engine, self._counts).settled(time.monotonic())

    # ---- the thread ------------------------------------------------------------------------
    def _drain(self, block: bool) -> None:
        try:
            if block:
                self._counts.wait_begins()
                try:
                    command = self._inbox.get()
                finally:
                    self._counts.wait_ends()
            else:
                command = self._inbox.get_nowait()
            while True:
                try:
                    command()
                except Exception as exc:  # noqa: BLE001 - a bad command must not kill the loop
                    log.error("engine_command_failed", error=repr(exc), traceback=traceback.format_exc())
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine cannot go on: end every open stream, never hang one
            log.critical("engine_thread_died", error=repr(exc), traceback=traceback.format_exc())
            raise
        finally:
            self._end_streams("engine stopped")

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if self._stop.is_set() or not self.engine.has_work():
                continue
            run_step(self.engine, self._counts)
