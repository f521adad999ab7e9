"""Builds and runs the grpc.aio server: GenerationService, health, reflection, metrics.

The engine loop runs in its own process (engine.process.EngineProcess), so this process's event
loop only does I/O; `engine_in_thread` runs it as a thread here instead (debugging, fault tests).
The port is bound before the model loads: health reports NOT_SERVING until the engine has
loaded and warmed up, then SERVING; if the engine dies it goes back to NOT_SERVING.
SIGTERM/SIGINT: stop accepting, let streams finish within the grace period, then cancel them.
"""
from __future__ import annotations

import asyncio
import functools
import os
import signal
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


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"            # address to bind
    port: int = 50051                  # 0 picks a free port
    metrics_port: int | None = None    # Prometheus /metrics over HTTP; None = off
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

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_streams < 0:
            raise ValueError(f"max_concurrent_streams must be >= 0, got {self.max_concurrent_streams}")


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
        self._stopped = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, status))

    async def start(self) -> None:
        await self._set_health(False)
        await self.server.start()
        log.info("listening", host=self.config.host, port=self.port)
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.host, self.config.metrics_port)
            log.info("metrics_listening", port=self.config.metrics_port)
        if self.engine is None and self.config.engine_in_thread:
            self.engine = await asyncio.to_thread(EngineClient, self.engine_config)
        elif self.engine is None:
            setup = functools.partial(logs.configure, self.config.log_level)
            self.engine = await asyncio.to_thread(EngineProcess, self.engine_config, setup=setup)
        await asyncio.to_thread(self.engine.start)
        self.servicer.engine = self.engine
        self.metrics.watch_engine(self.engine)
        info = self.engine.info
        log.info("engine_ready", model=info.model_name, device=info.device, dtype=info.dtype,
                 max_batch_size=info.max_batch_size, max_context=info.max_context_length,
                 kv_slab_bytes=info.kv_slab_bytes, host_kv_budget_bytes=self.engine_config.host_kv_budget_bytes,
                 decode=info.decode, engine_pid=getattr(self.engine, "pid", None) or os.getpid())
        await self._set_health(True)
        asyncio.get_running_loop().create_task(self._watch_engine())

    async def _watch_engine(self) -> None:
        while not self._stopped.is_set():
            if self.engine is not None and not self.engine.alive:
                log.error("engine_died")
                await self._set_health(False)
                return
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting_down", grace_seconds=self.config.grace_seconds)
        await self._set_health(False)
        await self.server.stop(self.config.grace_seconds)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.tracer_provider is not None:   # export the spans still batched
            await asyncio.to_thread(self.tracer_provider.shutdown)
        log.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value


async def serve(config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run until SIGTERM/SIGINT. -> exit status: 0, or 1 when the engine could not start."""
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
        return 1
    await server.wait()
    if stopping:   # let stop() finish (engine joined, `stopped` logged) before the loop closes
        await stopping[0]
    return 0
