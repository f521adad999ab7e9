"""Prometheus metrics (prefix `baton_`), served over HTTP at /metrics when --metrics-port is set.

Request-level series are updated by the servicer; engine series are read from
`EngineHandle.stats()` at scrape time by a custom collector, so the engine loop does no
metrics work per step. docs/deployment.md lists every series and what it means.

Servicer call protocol, per Generate call:
  * `tokens(count, since, now, first)` for every streamed message that carries tokens
    (TTFT on the first, inter-token latency on the rest, the generated-tokens counter always);
  * exactly one of `request_done(status)` (rejected / aborted calls) or
    `request_finished(status, started=, first_token_at=, last_token_at=, tokens=, stats=)`
    (calls that reached a final engine event: also TPOT, end-to-end latency, queue time).
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# No `*_created` companion series: they double the exposition and nothing here reads them.
disable_created_metrics()

# Seconds: from a few ms (one decode step of a small model on a GPU) to minutes (long CPU generations).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

# Statuses exported from start (at 0) so that rate()/increase() see the first request of each.
# Final engine events use FinishReason names in lower case; the rest are set by the servicer.
REQUEST_STATUSES = ("length", "eos", "stop_sequence", "cancelled", "error",
                    "invalid_argument", "unimplemented", "resource_exhausted", "already_exists", "unavailable")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)    # process_resident_memory_bytes, process_cpu_seconds_total, …
        PlatformCollector(registry=self.registry)   # python_info
        self.requests = Counter("baton_requests", "Generate calls by final status",
                                ["status"], registry=self.registry)
        for status in REQUEST_STATUSES:
            self.requests.labels(status=status)
        self.generated = Counter("baton_generated_tokens", "Tokens streamed to clients", registry=self.registry)
        self.ttft = Histogram("baton_time_to_first_token_seconds",
                              "Time from the Generate call to its first streamed token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("baton_inter_token_latency_seconds",
                             "Time between streamed token messages, divided by the tokens in the later one "
                             "(observed per message)",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("baton_time_per_output_token_seconds",
                              "Per finished request: (last token time - first token time) / (tokens - 1); "
                              "requests with fewer than 2 tokens are not observed",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram("baton_request_duration_seconds",
                                  "Per finished request: time from the Generate call to its final event",
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self.queued = Histogram("baton_request_queue_seconds",
                                "Per finished request: time spent waiting for its first admission to the batch",
                                buckets=_DURATION_BUCKETS, registry=self.registry)
        self.engine_restarts = Counter("baton_engine_restarts",
                                       "Engines started after the previous one died (restarts that came up ready)",
                                       registry=self.registry)
        self._engine = None

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    # ---- request-level: called by the servicer ------------------------------------------------
    def request_done(self, status: str) -> None:
        """Count a Generate call by its final status (no latency observations)."""
        self.requests.labels(status=status).inc()

    def tokens(self, count: int, since: float, now: float, first: bool) -> None:
        """One streamed message carrying `count` tokens; `since` is the call start (first) or the
        previous token message (otherwise)."""
        self.generated.inc(count)
        if first:
            self.ttft.observe(now - since)
        elif count > 0:
            self.itl.observe((now - since) / count)

    def request_finished(self, status: str, *, started: float, finished: float | None = None,
                         first_token_at: float | None = None, last_token_at: float | None = None,
                         tokens: int = 0, stats=None) -> None:
        """A Generate call that reached its final engine event. Times are time.monotonic() values;
        `stats` is the final RequestOutput.stats (engine.request.RequestStats) when present."""
        end = finished if finished is not None else (last_token_at if last_token_at is not None else started)
        self.duration.observe(max(0.0, end - started))
        tpot = time_per_output_token(first_token_at, last_token_at, tokens)
        if tpot is not None:
            self.tpot.observe(tpot)
        queued = getattr(stats, "queued_seconds", None)
        if queued is not None:
            self.queued.observe(max(0.0, queued))
        self.request_done(status)  # last: a scrape never sees the request counted without its latencies

    # ---- engine-level: read at scrape time --------------------------------------------------
    def watch_engine(self, engine) -> None:
        """Expose the engine's gauges and counters (read from engine.stats() at scrape time)."""
        if self._engine is None:
            self.registry.register(_EngineCollector(self))
        self._engine = engine

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)


def time_per_output_token(first_token_at: float | None, last_token_at: float | None, tokens: int) -> float | None:
    """TPOT of one request: (last − first) / (tokens − 1), or None with fewer than 2 tokens."""
    if first_token_at is None or last_token_at is None or tokens < 2:
        return None
    return max(0.0, last_token_at - first_token_at) / (tokens - 1)


# name (no _total: CounterMetricFamily adds it), help, EngineStats field
_ENGINE_GAUGES = (
    ("baton_running_rows", "Rows in the decode batch", "rows_on_device"),
    ("baton_parked_rows", "Requests whose K/V sit in host memory (preempted or suspended)", "rows_parked"),
    ("baton_queue_depth", "Requests waiting for their first admission", "requests_waiting"),
    ("baton_kv_device_bytes", "K/V bytes held by batch rows on the device", "kv_bytes_on_device"),
    ("baton_kv_host_bytes", "K/V bytes parked in host memory", "kv_bytes_on_host"),
    ("baton_kv_pages_used", "K/V pages held by batch rows (--kv-layout paged; 0 with the slab)", "kv_pages_used"),
    ("baton_kv_pages_free", "K/V pages free (--kv-layout paged; 0 with the slab)", "kv_pages_free"),
    ("baton_prefix_cache_device_bytes", "K/V bytes the prefix cache holds in its device tier", "prefix_bytes_device"),
    ("baton_prefix_cache_host_bytes", "K/V bytes the prefix cache holds in its host tier", "prefix_bytes_host"),
)
_ENGINE_COUNTERS = (
    ("baton_preemptions", "Rows parked in host memory by the scheduler or by SUSPEND", "preemptions"),
    ("baton_kv_offload_bytes", "K/V bytes copied device to host", "bytes_offloaded"),
    ("baton_kv_restore_bytes", "K/V bytes copied host to device", "bytes_restored"),
    ("baton_engine_steps", "Engine steps run", "steps"),
    ("baton_prefill_tokens", "Prompt tokens computed by prefill forwards (cache hits not counted)", "prefill_tokens"),
    ("baton_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache (hit rate: "
                                         "rate of the hit counters over rate of this)", "prefix_lookup_tokens"),
    ("baton_prefix_cache_hit_tokens_device", "Prompt tokens whose K/V came from the prefix cache's device tier",
     "prefix_hit_tokens_device"),
    ("baton_prefix_cache_hit_tokens_host", "Prompt tokens whose K/V came from the prefix cache's host tier",
     "prefix_hit_tokens_host"),
    ("baton_engine_step_errors", "Engine steps that raised", "step_errors"),
    ("baton_engine_idle_seconds", "Time the engine loop waited with nothing to run (busy share: "
                                  "1 - rate of this)", "seconds_idle"),
)


class _EngineCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self):
        # Lets registration check names without calling stats() before the engine is ready.
        yield from self._families(None)

    def collect(self):
        engine = self._metrics._engine
        if engine is None:
            return
        yield from self._families(engine)

    @staticmethod
    def _families(engine):
        stats = engine.stats() if engine is not None else None
        for name, doc, field in _ENGINE_GAUGES:
            family = GaugeMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], getattr(stats, field))
            yield family
        for name, doc, field in _ENGINE_COUNTERS:
            family = CounterMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], getattr(stats, field))
            yield family
        alive = GaugeMetricFamily("baton_engine_alive", "1 while the engine loop runs, else 0")
        info = InfoMetricFamily("baton_model", "The served model")
        slab = GaugeMetricFamily("baton_kv_slab_bytes", "Size of the preallocated K/V slab on the device")
        batch = GaugeMetricFamily("baton_max_batch_size", "Rows in the decode batch at most")
        if engine is not None:
            alive.add_metric([], 1.0 if getattr(engine, "alive", True) else 0.0)
            model = getattr(engine, "info", None)
            if model is not None:
                info.add_metric([], {"model": str(model.model_name), "device": str(model.device),
                                     "dtype": str(model.dtype), "max_context_length": str(model.max_context_length)})
                slab.add_metric([], model.kv_slab_bytes)
                batch.add_metric([], model.max_batch_size)
        yield from (alive, info, slab, batch)
