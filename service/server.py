"""Builds and runs the grpc.aio server: GenerationService, health, reflection, metrics.

The engine loop runs in its own process (engine.process.EngineProcess), so this process's event
loop only does I/O; `engine_in_thread` runs it as a thread here instead (debugging, fault tests).
The port is bound before the model loads: health reports NOT_SERVING until the engine has
loaded and warmed up, then SERVING.
Engine death: the transport ends every open stream UNAVAILABLE (retryable); the supervisor here
reports NOT_SERVING, starts a new engine after a backoff that doubles with each failure in the
window, and reports SERVING once it is warmed up. More than `engine_max_restarts` failures (deaths
or failed starts) within `engine_restart_window_seconds`: the server shuts down and exits
EXIT_ENGINE_GAVE_UP, so that the orchestrator takes over.
SIGTERM/SIGINT: stop accepting, let streams finish within the grace period, then cancel them.
"""
from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections import deque
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.v1 import baton_pb2, baton_pb2_grpc
from engine.api import EngineClient, EngineHandle
from engine.config import EngineConfig
from engine.process import EngineProcess
from service import auth, logs, tracing
from service.metrics import Metrics
from service.servicer import GenerationServicer

log = structlog.get_logger("baton.server")
SERVICE_NAME = baton_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
EXIT_ENGINE_START_FAILED = 1   # the first engine could not start (e.g. the model cannot load)
EXIT_ENGINE_GAVE_UP = 3        # the engine kept dying: more failures than allowed within the window
_MAX_BACKOFF_SECONDS = 30.0    # restart delays double up to this (or to the base delay, if larger)
_WATCH_SECONDS = 0.25          # how often the supervisor checks that the engine is alive


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"            # address to bind
    port: int = 50051                  # 0 picks a free port
    metrics_port: int | None = None    # Prometheus /metrics over HTTP; None = off
    metrics_host: str | None = None    # address /metrics binds; None = `host`
    grace_seconds: float = 10.0        # on SIGTERM, how long in-flight streams may run on
    max_message_bytes: int = 4 << 20   # largest request or response message
    log_prompts: bool = False          # log prompt text (debugging only)
    max_concurrent_streams: int = 0    # per-connection HTTP/2 stream limit; 0 = gRPC's default
    tls_cert: str | None = None        # PEM certificate chain; with tls_key: serve TLS only
    tls_key: str | None = None         # PEM private key
    tls_client_ca: str | None = None   # PEM CA bundle: require client certificates signed by it (mTLS)
    auth_tokens_file: str | None = None  # `token caller_name [admin]` lines: require a bearer token
    # Run the engine loop as a thread of this process instead of its own process. It then shares
    # the GIL with the event loop: 14-17% slower under load on an H200 (docs/benchmarks.md).
    engine_in_thread: bool = False
    log_level: str = "info"            # also configures the engine process's logs
    engine_max_restarts: int = 5       # engine restarts allowed within the window; 0 = exit when it dies
    engine_restart_window_seconds: float = 600.0   # the window over which failures are counted
    engine_restart_backoff_seconds: float = 1.0    # delay before a restart; doubles per failure in the window

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_streams < 0:
            raise ValueError(f"max_concurrent_streams must be >= 0, got {self.max_concurrent_streams}")
        if self.engine_max_restarts < 0:
            raise ValueError(f"engine_max_restarts must be >= 0, got {self.engine_max_restarts}")
        if not self.engine_restart_window_seconds > 0:
            raise ValueError(f"engine_restart_window_seconds must be > 0, got {self.engine_restart_window_seconds}")
        if not self.engine_restart_backoff_seconds >= 0:
            raise ValueError(f"engine_restart_backoff_seconds must be >= 0, got {self.engine_restart_backoff_seconds}")

    def restart_delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows the `failures`-th failure in the window."""
        base = self.engine_restart_backoff_seconds
        return min(base * 2 ** (failures - 1), max(base, _MAX_BACKOFF_SECONDS))


class BatonServer:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig,
                 engine: EngineHandle | None = None) -> None:
        self.config = config
        self.engine_config = engine_config
        self.metrics = Metrics()
        self.tracer_provider = tracing.setup()   # None unless OTEL_TRACES_EXPORTER is set
        tracer = self.tracer_provider.get_tracer("baton.service") if self.tracer_provider is not None else None
        self.servicer = GenerationServicer(self.metrics, log_prompts=config.log_prompts, tracer=tracer)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if config.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", config.max_concurrent_streams))
        interceptors: list[grpc.aio.ServerInterceptor] = [auth.DecodeGuardInterceptor(f"/{SERVICE_NAME}/")]
        if config.auth_tokens_file:
            tokens = auth.TokenTable.load(config.auth_tokens_file)
            interceptors.insert(0, auth.TokenAuthInterceptor(tokens))   # outermost: nothing is parsed first
            log.info("token_auth_enabled", callers=len(tokens))
            if not config.tls_cert and config.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("tokens_without_tls", host=config.host,
                            hint="bearer tokens cross the network in clear text; set --tls-cert/--tls-key")
        if self.tracer_provider is not None:   # outermost: refused calls are traced too
            interceptors.insert(0, tracing.server_interceptor(self.tracer_provider))
            log.info("tracing_enabled", exporters=tracing.exporter_names())
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        baton_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            self.port = self.server.add_secure_port(address, credentials)
            log.info("tls_enabled", mutual=bool(config.tls_client_ca))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        self.engine: EngineHandle | None = engine   # prebuilt (tests, benchmarks); else started in start()
        self._restartable = True                     # False for a prebuilt engine
        self._supervisor: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.exit_code = 0

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, status))

    async def start(self) -> None:
        await self._set_health(False)
        await self.server.start()
        log.info("listening", host=self.config.host, port=self.port)
        if self.config.metrics_port is not None:
            metrics_host = self.config.metrics_host or self.config.host
            self.metrics.serve(metrics_host, self.config.metrics_port)
            log.info("metrics_listening", host=metrics_host, port=self.config.metrics_port)
        if self.engine is None:
            self.engine = await self._new_engine()
        else:
            self._restartable = False   # prebuilt (tests, benchmarks): nothing to rebuild it from
            await asyncio.to_thread(self.engine.start)
        await self._serve_engine(self.engine)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _new_engine(self) -> EngineHandle:
        """An engine loaded and warmed up (raises if it cannot start)."""
        if self.config.engine_in_thread:
            engine = await asyncio.to_thread(EngineClient, self.engine_config)
        else:
            setup = functools.partial(logs.configure, self.config.log_level)
            engine = await asyncio.to_thread(EngineProcess, self.engine_config, setup=setup)
        try:
            await asyncio.to_thread(engine.start)
        except BaseException:
            await asyncio.to_thread(engine.stop)
            raise
        return engine

    async def _serve_engine(self, engine: EngineHandle) -> None:
        """Route calls and metrics to a ready engine and report SERVING."""
        self.engine = engine
        self.servicer.engine = engine
        self.metrics.watch_engine(engine)
        info = engine.info
        log.info("engine_ready", model=info.model_name, device=info.device, dtype=info.dtype,
                 max_batch_size=info.max_batch_size, max_context=info.max_context_length,
                 kv_slab_bytes=info.kv_slab_bytes, host_kv_budget_bytes=self.engine_config.host_kv_budget_bytes,
                 decode=info.decode, engine_pid=getattr(engine, "pid", None) or os.getpid())
        await self._set_health(True)

    async def _supervise(self) -> None:
        """Wait for the engine to die; then NOT_SERVING and a restart, until the server stops."""
        failures: deque[float] = deque()    # monotonic times of deaths and failed starts in the window
        while await self._engine_died():
            log.error("engine_died", engine_pid=getattr(self.engine, "pid", None))
            await self._set_health(False)
            await asyncio.to_thread(self.engine.stop)   # reaps the process; its streams are already ended
            if not self._restartable or not await self._restart(failures):
                return   # a prebuilt engine is not restarted: the server stays up, NOT_SERVING

    async def _restart(self, failures: deque[float]) -> bool:
        """Start a new engine after a backoff, again while starts fail; give up (stop the server
        with EXIT_ENGINE_GAVE_UP) past the allowed failures. -> True once a new engine serves."""
        while not self._stopped.is_set():
            now = time.monotonic()
            failures.append(now)
            while failures[0] < now - self.config.engine_restart_window_seconds:
                failures.popleft()
            if len(failures) > self.config.engine_max_restarts:
                log.critical("engine_restarts_exhausted", failures_in_window=len(failures),
                             window_seconds=self.config.engine_restart_window_seconds, exit_code=EXIT_ENGINE_GAVE_UP)
                self.exit_code = EXIT_ENGINE_GAVE_UP
                await self.stop()
                return False
            delay = self.config.restart_delay(len(failures))
            log.warning("engine_restarting", in_seconds=delay, failures_in_window=len(failures))
            if await self._stopped_within(delay):
                return False
            try:
                engine = await self._new_engine()
            except Exception as exc:  # noqa: BLE001 - e.g. the model cannot load now: one more failure
                log.error("engine_restart_failed", error=str(exc))
                continue
            if self._stopped.is_set():    # SIGTERM arrived while it loaded
                await asyncio.to_thread(engine.stop)
                return False
            self.metrics.engine_restarted()
            await self._serve_engine(engine)
            return True
        return False

    async def _engine_died(self) -> bool:
        """Wait until the engine is no longer alive (True) or the server stops (False)."""
        while not await self._stopped_within(_WATCH_SECONDS):
            if not self.engine.alive:
                return True
        return False

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting_down", grace_seconds=self.config.grace_seconds)
        await self._set_health(False)
        await self.server.stop(self.config.grace_seconds)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self._supervisor is not None and self._supervisor is not asyncio.current_task():
            await self._supervisor   # a restart under way finishes loading, then stops its engine
        if self.tracer_provider is not None:   # export the spans still batched
            await asyncio.to_thread(self.tracer_provider.shutdown)
        log.info("stopped", exit_code=self.exit_code)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value


async def serve(config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run until SIGTERM/SIGINT, or until the engine keeps dying.
    -> exit status: 0, EXIT_ENGINE_START_FAILED or EXIT_ENGINE_GAVE_UP."""
    server = BatonServer(config, engine_config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal() -> None:
        if not stopping:   # a second signal does not restart the grace period
            stopping.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - e.g. the model cannot load: say why, exit 1
        log.critical("engine_start_failed", error=str(exc))
        await server.stop()
        return EXIT_ENGINE_START_FAILED
    await server.wait()
    if stopping:   # let stop() finish (engine joined, `stopped` logged) before the loop closes
        await stopping[0]
    return server.exit_code
