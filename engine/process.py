"""The engine loop in its own process; the server process keeps only gRPC I/O.

Why: with the loop as a thread of the server, the engine and the grpc.aio event loop share one
GIL, and the event loop's Python work per streamed message delays the engine's host work between
GPU steps (on an H200 the gRPC path lost 14-17% of the engine's throughput to it,
docs/benchmarks.md note 17). Here each side has its own interpreter.

    server process                                   engine process (spawned)
    EngineProcess ──commands pipe (writer thread)──▶ EngineLoop (engine/loop.py), the same loop
                  ◀──events pipe (reader thread)────  as the in-thread transport

Start-up: the engine process builds the engine and sends one pickled `Started` (model info and
the tokenizer, which only pickle can carry) or `StartFailed`. After that every message on either
pipe is one of engine/loop.py's typed structs, msgpack-encoded.

The server validates and tokenises requests (it holds a copy of the tokenizer), so bad input is
refused before anything crosses the pipe. If the engine process dies, the reader thread sees the
pipe close and ends every open stream as retryable (UNAVAILABLE), as with a dying engine thread.
If the server dies, the engine process sees its commands pipe close and exits.
"""
from __future__ import annotations

import atexit
import multiprocessing
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from engine.api import EngineHandle
from engine.child_process import prepare_child
from engine.build import Loader, ModelInfo, build_engine
from engine.config import EngineConfig
from engine.loop import Command, EngineLoop, Stop, decode_command, decode_event, encode

log = structlog.get_logger("baton.engine")


@dataclass(frozen=True)
class Started:
    info: ModelInfo
    tokenizer: object


@dataclass(frozen=True)
class StartFailed:
    message: str


class PipeSource:
    """Commands from the server's pipe (the engine process's side)."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def wait(self) -> None:
        self._conn.poll(None)

    def poll(self) -> Command | None:
        if not self._conn.poll(0):
            return None
        return decode_command(self._conn.recv_bytes())   # EOFError: the server is gone


# ---- the engine process --------------------------------------------------------------------------
def serve_engine(commands, events, config: EngineConfig, loader: Loader | None,
                 setup: Callable[[], None] | None) -> None:
    """Entry point of the engine process: build the engine, report, then run the loop."""
    prepare_child(setup)
    try:
        engine, info, tokenizer = build_engine(config, loader, setup)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which raises it
        log.error("engine_load_failed", error=repr(exc), traceback=traceback.format_exc())
        events.send(StartFailed(f"{type(exc).__name__}: {exc}"))
        return
    events.send(Started(info, tokenizer))
    try:
        EngineLoop(engine, PipeSource(commands), lambda message: events.send_bytes(encode(message))).run()
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass    # the server went away
    except BaseException as exc:
        log.critical("engine_process_died", error=repr(exc), traceback=traceback.format_exc())
        raise


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
        if not isinstance(first, Started):
            self._process.join(10)
            raise RuntimeError(f"engine failed to start: {first.message}")
        super().__init__(config, first.info, first.tokenizer)
        self._outgoing: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
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
            self._outgoing.put(Stop())
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

    def _send(self, command: Command) -> None:
        self._outgoing.put(command)

    # ---- the threads -----------------------------------------------------------------------
    def _write(self) -> None:
        try:
            while (command := self._outgoing.get()) is not None:
                self._commands.send_bytes(encode(command))
        except OSError:
            pass    # the engine process is gone; the reader ends the streams
        finally:
            self._commands.close()

    def _read(self) -> None:
        try:
            while True:
                self._dispatch(decode_event(self._events.recv_bytes()))
        except (EOFError, OSError):
            pass
        except BaseException as exc:  # noqa: BLE001 - logged; the streams still end below
            log.critical("engine_events_failed", error=repr(exc), traceback=traceback.format_exc())
        finally:
            if not self._stopping:
                self._process.join(1)
                log.critical("engine_process_died", pid=self._process.pid, exit_code=self._process.exitcode)
            self._closed("engine stopped")
