"""The engine loop in its own process; the server process keeps only gRPC I/O.

Why: with the loop as a thread of the server, the engine and the grpc.aio event loop share one
GIL. On an H200 that cost 14-17% of the engine's throughput through gRPC (docs/benchmarks.md,
note 14): the event loop's Python work per streamed message delayed the engine's host work
between GPU steps. Here each side has its own interpreter.

    server process                                   engine process (spawned)
    EngineProcess ──"commands" pipe (writer thread)──▶ _Worker: between steps, runs commands
                  ◀──"events" pipe (reader thread)─── once per step: that step's events

Commands: ("add", Request) | ("abort", request_id) | ("stop",)
          ("preempt", call_id, request_id, action, priority, owner)
Events:   ("ready", ModelInfo, tokenizer) | ("failed", message)       start-up, exactly one
          ("outs", [item, ...], EngineStats | None)                    item: (request_id, text,
                  token_ids) for a plain token event (a tuple pickles ~10x faster than the
                  dataclass), else the RequestOutput itself; stats when rows came or went, every
                  0.25 s while busy, and whenever the loop goes idle
          ("reply", call_id, RequestState | None, (code, message) | None)

The server validates and tokenises requests (it holds a copy of the tokenizer), so bad input is
refused before anything crosses the pipe. If the engine process dies, the reader thread sees the
pipe close and ends every open stream as retryable (UNAVAILABLE), as with a dying engine thread.
If the server dies, the engine process sees its commands pipe close and exits.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable

import structlog

from engine.api import (
    EngineHandle,
    EngineStats,
    EngineUnavailable,
    Loader,
    PreemptAction,
    StepCounts,
    apply_preempt,
    build_engine,
    cancel_quietly,
    engine_stats,
    run_step,
)
from engine.config import EngineConfig
from engine.engine import LLMEngine, OutputSink
from engine.request import Request, RequestOutput
from engine.scheduler import SchedulerError

log = structlog.get_logger("baton.engine")

_STATS_EVERY_S = 0.25


# ---- the engine process --------------------------------------------------------------------------
def serve_engine(commands, events, config: EngineConfig, loader: Loader | None,
                 setup: Callable[[], None] | None) -> None:
    """Entry point of the engine process: build the engine, report, then run the loop."""
    # Ctrl-C in a terminal reaches the whole process group; the server decides when the engine
    # stops (after its grace period), so the engine ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()
    # Fewer progress bars: the server's log is one JSON object per line. tqdm's default lock is a
    # multiprocessing semaphore that this process (it exits without finalisers) would leak.
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tqdm.set_lock(threading.RLock())
    import torch
    torch.set_grad_enabled(False)
    try:
        engine, info, tokenizer = build_engine(config, loader)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which raises it
        log.error("engine_load_failed", error=repr(exc), traceback=traceback.format_exc())
        events.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    events.send(("ready", info, tokenizer))
    try:
        _Worker(engine, commands, events).run()
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass    # the server went away
    except BaseException as exc:
        log.critical("engine_process_died", error=repr(exc), traceback=traceback.format_exc())
        raise


class _Worker:
    def __init__(self, engine: LLMEngine, commands, events) -> None:
        self.engine = engine
        self.commands = commands
        self.events = events
        self.outbox: list = []
        self.counts = StepCounts()
        self.stats_at = 0.0
        self.reported_shape: tuple[int, int, int] | None = None
        engine.on_events = self.flush_events

    def collect(self, out: RequestOutput) -> None:
        """The sink of every request: events wait in the outbox until the step ends."""
        if out.state is None and out.finish_reason is None:
            self.outbox.append((out.request_id, out.text, out.token_ids))
        else:
            self.outbox.append(out)

    def run(self) -> None:
        while self.drain(block=not self.engine.has_work()):
            self.flush_events()   # new requests' QUEUED events go out now, not after a long prefill
            if self.engine.has_work():
                run_step(self.engine, self.counts)
            self.flush(with_stats=time.monotonic() - self.stats_at >= _STATS_EVERY_S)

    def drain(self, block: bool) -> bool:
        """Run the commands that came in (waiting for one when `block`). -> False to stop."""
        if block:
            self.counts.wait_begins()
            self.flush(with_stats=True)   # going idle: the server's gauges show the idle state
            self.commands.poll(None)
            self.counts.wait_ends()
        while self.commands.poll(0):
            message = self.commands.recv()   # EOFError: the server is gone
            if message[0] == "stop":
                return False
            try:
                self.handle(message)
            except Exception as exc:  # noqa: BLE001 - a bad command must not kill the loop
                log.error("engine_command_failed", error=repr(exc), traceback=traceback.format_exc())
        return True

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self.engine.add_request(message[1], self.collect)
        elif kind == "abort":
            cancel_quietly(self.engine, message[1])
        elif kind == "preempt":
            call_id, request_id, action, priority, owner = message[1:]
            state, error = None, None
            try:
                state = apply_preempt(self.engine, request_id, PreemptAction(action), priority, owner)
            except SchedulerError as exc:
                error = (exc.code, str(exc))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                log.error("engine_command_failed", error=repr(exc), traceback=traceback.format_exc())
                error = ("INTERNAL", repr(exc))
            self.flush(with_stats=False)   # the stream's own events (e.g. SUSPENDED) go first
            self.events.send(("reply", call_id, state, error))
        else:
            raise ValueError(f"unknown engine command {kind!r}")

    def flush_events(self) -> None:
        if self.outbox:
            self.flush(with_stats=False)

    def flush(self, with_stats: bool) -> None:
        """Send the outbox; with stats when asked, or when rows came or went since the last report
        (so gauges such as running rows are exact at every change, not up to 0.25 s late)."""
        engine = self.engine
        shape = (engine.slab.num_rows, len(engine.host_kv), len(engine.scheduler.waiting))
        stats = None
        if with_stats or shape != self.reported_shape:
            stats = engine_stats(engine, self.counts)
            self.stats_at = time.monotonic()
            self.reported_shape = shape
        if self.outbox or stats is not None:
            self.events.send(("outs", self.outbox, stats))
            self.outbox = []


# ---- the server's side ---------------------------------------------------------------------------
class EngineProcess(EngineHandle):
    """Spawns the engine process and waits until its model is loaded (raises RuntimeError if it
    cannot start). `loader` (picklable, run in the engine process) replaces loading
    `config.model`; `setup` (picklable) runs first there, e.g. the server's log configuration."""

    def __init__(self, config: EngineConfig, loader: Loader | None = None,
                 setup: Callable[[], None] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")   # CUDA cannot be used in a forked child
        commands_in, self._commands = ctx.Pipe(duplex=False)
        self._events, events_out = ctx.Pipe(duplex=False)
        # Not daemonic: a daemonic process may not start children, and torch.compile may.
        self._process = ctx.Process(target=serve_engine, name="baton-engine",
                                    args=(commands_in, events_out, config, loader, setup))
        self._process.start()
        commands_in.close()     # only the child holds these ends now: when it exits, our reads see EOF
        events_out.close()
        self._stopping = False
        atexit.register(self.stop)   # before multiprocessing joins its children at exit
        try:
            first = self._events.recv()
        except EOFError:
            self._process.join(10)
            raise RuntimeError(f"engine process exited during start-up (exit code {self._process.exitcode})") from None
        if first[0] != "ready":
            self._process.join(10)
            raise RuntimeError(f"engine failed to start: {first[1]}")
        _, info, tokenizer = first
        super().__init__(config, info, tokenizer)
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)   # until the first report
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        # Sends go through one thread: a full pipe blocks it, never the event loop, and the
        # Connection is never written by two threads at once.
        self._writer = threading.Thread(target=self._write, name="baton-engine-commands", daemon=True)
        self._reader = threading.Thread(target=self._read, name="baton-engine-events", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.warmup:
            self.warmup()
        self.ready = True

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.stop)
        if hasattr(self, "_outgoing"):
            self._outgoing.put(("stop",))
            self._outgoing.put(None)
        else:   # stopped during start-up
            self._commands.close()
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("engine_process_kill", pid=self._process.pid, after_seconds=timeout)
            self._process.kill()
            self._process.join(10)
        if hasattr(self, "_reader"):
            self._reader.join(10)

    @property
    def alive(self) -> bool:
        return not self._stop.is_set() and self._process.is_alive()

    # ---- requests --------------------------------------------------------------------------
    def _post_add(self, request: Request, sink: OutputSink) -> None:
        self._outgoing.put(("add", request))

    def abort(self, request_id: str) -> None:
        """Best effort cancel (client went away); unknown or finished ids are ignored."""
        self._outgoing.put(("abort", request_id))

    def preempt(self, request_id: str, action: PreemptAction, priority: int | None,
                owner: str | None = None) -> concurrent.futures.Future:
        """-> Future[RequestState]; fails with SchedulerError (NOT_FOUND, ...) or EngineUnavailable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stop.is_set():
                future.set_exception(EngineUnavailable("engine is not running"))
                return future
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self._outgoing.put(("preempt", call_id, request_id, int(action), priority, owner))
        return future

    def stats(self) -> EngineStats:
        """The engine's latest report: gauges as of the last change of rows, counters at most 0.25 s
        old while busy; exact when idle."""
        return self._stats.settled(time.monotonic())

    # ---- the threads -----------------------------------------------------------------------
    def _write(self) -> None:
        try:
            while (message := self._outgoing.get()) is not None:
                self._commands.send(message)
        except OSError:
            pass    # the engine process is gone; the reader ends the streams
        finally:
            self._commands.close()

    def _read(self) -> None:
        try:
            while True:
                message = self._events.recv()
                if message[0] == "outs":
                    if message[2] is not None:   # first: a caller who saw these events sees these stats
                        self._stats = message[2]
                    sinks = self._sinks
                    for item in message[1]:
                        out = RequestOutput(*item) if type(item) is tuple else item
                        sink = sinks.get(out.request_id)
                        if sink is not None:
                            sink(out)
                elif message[0] == "reply":
                    _, call_id, state, error = message
                    with self._lock:
                        future = self._calls.pop(call_id, None)
                    if future is None:
                        continue
                    if error is None:
                        future.set_result(state)
                    else:
                        future.set_exception(SchedulerError(*error) if error[0] != "INTERNAL"
                                             else RuntimeError(error[1]))
        except (EOFError, OSError):
            pass
        except BaseException as exc:  # noqa: BLE001 - logged; the streams still end below
            log.critical("engine_events_failed", error=repr(exc), traceback=traceback.format_exc())
        finally:
            if not self._stopping:
                self._process.join(1)
                log.critical("engine_process_died", pid=self._process.pid, exit_code=self._process.exitcode)
            self._end_streams("engine stopped")
            with self._lock:
                calls, self._calls = list(self._calls.values()), {}
            for future in calls:
                future.set_exception(EngineUnavailable("engine is not running"))
