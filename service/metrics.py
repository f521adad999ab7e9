"""Prometheus metrics (prefix `baton_`), served over HTTP at /metrics when --metrics-port is set.

Request-level series are updated by the servicer; engine gauges are read from
`EngineClient.stats()` at scrape time by a custom collector, so the engine loop does no
metrics work per step.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("baton_requests", "Generate calls by final status",
                                ["status"], registry=self.registry)
        self.generated = Counter("baton_generated_tokens", "Tokens streamed to clients", registry=self.registry)
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("baton_inter_token_latency_seconds", "Time between streamed token messages, per token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._engine = None

    def request_done(self, status: str) -> None:
        self.requests.labels(status=status).inc()

    def tokens(self, count: int, since: float, now: float, first: bool) -> None:
        self.generated.inc(count)
        if first:
            self.ttft.observe(now - since)
        else:
            self.itl.observe((now - since) / count)

    def watch_engine(self, engine) -> None:
        """Expose the engine's gauges (read at scrape time)."""
        if self._engine is None:
            self.registry.register(_EngineCollector(self))
        self._engine = engine

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self):
        engine = self._metrics._engine
        if engine is None:
            return
        s = engine.stats()
        for name, doc, value in (
            ("baton_running_rows", "Rows in the decode batch", s.rows_on_device),
            ("baton_parked_rows", "Requests whose K/V sit in host memory", s.rows_parked),
            ("baton_queue_depth", "Requests waiting for their first admission", s.requests_waiting),
            ("baton_kv_device_bytes", "K/V bytes held by batch rows on the device", s.kv_bytes_on_device),
            ("baton_kv_host_bytes", "K/V bytes parked in host memory", s.kv_bytes_on_host),
            ("baton_preemptions_total", "Rows parked by the scheduler or by SUSPEND", s.preemptions),
            ("baton_kv_offload_bytes_total", "K/V bytes copied device to host", s.bytes_offloaded),
            ("baton_kv_restore_bytes_total", "K/V bytes copied host to device", s.bytes_restored),
            ("baton_engine_steps_total", "Engine steps run", s.steps),
            ("baton_engine_step_errors_total", "Engine steps that raised", s.step_errors),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
