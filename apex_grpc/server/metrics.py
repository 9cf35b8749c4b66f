"""Prometheus metrics of the gRPC front end, served on --metrics-port.

Owns a private CollectorRegistry (never the process-global one, so several servers can live in
one process, as in tests) with two kinds of metrics:
- engine gauges and counters pulled from engine.stats() at scrape time by EngineStatsCollector
  (no background polling, no copies that drift);
- per-request latency histograms and finish-reason counters observed by the servicer through
  RequestTimer.
The same HTTP port answers GET /ready (200 ready, 503 not) for balancers whose active health
checks speak HTTP/1.1 but not gRPC (HAProxy, see docs/deploy.md).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from apex_grpc.engine.protocol import EngineClient
from apex_grpc.server.convert import free_kv_tokens

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineStatsCollector(Collector):
    """Reads engine.stats() on each scrape; yields nothing while no engine is attached."""

    def __init__(self, engine_getter: Callable[[], EngineClient | None]) -> None:
        self._engine_getter = engine_getter

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_getter()
        if engine is None:
            return
        stats = engine.stats()
        yield _gauge("apex_requests_running", "Requests in the running batch", stats.num_running)
        yield _gauge("apex_requests_waiting", "Requests in the waiting queue", stats.num_waiting)
        yield _gauge("apex_requests_host_resident", "Running requests whose KV is in host memory",
                     stats.num_host_resident)
        used = GaugeMetricFamily("apex_kv_used_blocks", "KV cache blocks in use", labels=["tier"])
        used.add_metric(["gpu"], stats.gpu_kv_used_blocks)
        used.add_metric(["host"], stats.host_kv_used_blocks)
        yield used
        total = GaugeMetricFamily("apex_kv_total_blocks", "KV cache blocks available",
                                  labels=["tier"])
        total.add_metric(["gpu"], stats.gpu_kv_total_blocks)
        total.add_metric(["host"], stats.host_kv_total_blocks)
        yield total
        yield _gauge("apex_kv_free_tokens", "Free KV cache capacity of both tiers, in tokens",
                     free_kv_tokens(stats, engine.engine_config.block_size))
        yield _counter("apex_preemptions", "Requests preempted (recompute)",
                       stats.preemptions_total)
        yield _counter("apex_evictions", "Requests moved from the GPU to the host KV tier",
                       stats.evictions_total)
        yield _counter("apex_restores", "Requests moved from the host back to the GPU KV tier",
                       stats.restores_total)
        yield _counter("apex_prompt_tokens", "Prompt tokens prefilled", stats.prompt_tokens_total)
        yield _counter("apex_generation_tokens", "Tokens generated",
                       stats.generation_tokens_total)
        steps = CounterMetricFamily("apex_engine_steps", "Engine steps by execution strategy",
                                    labels=["strategy"])
        steps.add_metric(["gpu_only"], stats.steps_gpu_only)
        steps.add_metric(["async_overlap"], stats.steps_async_overlap)
        steps.add_metric(["asymmetric_pipeline"], stats.steps_asymmetric_pipeline)
        yield steps
        yield _counter("apex_engine_steps_graphed", "Decode steps run as a replayed CUDA graph",
                       stats.steps_graphed)
        yield _gauge("apex_step_predicted_seconds", "Last step's time predicted by the "
                     "performance model", stats.last_step_predicted_ms / 1000.0)
        yield _gauge("apex_step_measured_seconds", "Last step's measured time",
                     stats.last_step_measured_ms / 1000.0)
        yield _gauge("apex_engine_ready", "1 when the engine accepts requests",
                     1.0 if engine.is_ready else 0.0)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class ServerMetrics:
    """The registry, the request histograms and (optionally) the HTTP endpoint serving them."""

    def __init__(self, engine_getter: Callable[[], EngineClient | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineStatsCollector(engine_getter))
        self.time_to_first_token = Histogram(
            "apex_time_to_first_token_seconds", "Request arrival to first generated token",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.inter_token_latency = Histogram(
            "apex_inter_token_latency_seconds", "Gap between consecutive streamed tokens",
            buckets=TOKEN_BUCKETS_S, registry=self.registry)
        self.time_per_output_token = Histogram(
            "apex_time_per_output_token_seconds",
            "Per request: (end-to-end - TTFT) / (completion tokens - 1)",
            buckets=TOKEN_BUCKETS_S, registry=self.registry)
        self.end_to_end = Histogram(
            "apex_e2e_request_latency_seconds", "Request arrival to last message",
            buckets=E2E_BUCKETS_S, registry=self.registry)
        self.queue_time = Histogram(
            "apex_queue_time_seconds", "Time a request waited before its first step",
            buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.requests_finished = Counter(
            "apex_requests_finished_total", "Finished requests by finish reason",
            labelnames=["finish_reason"], registry=self.registry)
        self.requests_failed = Counter(
            "apex_requests_failed_total", "Generation RPCs that ended with a gRPC error status",
            labelnames=["code"], registry=self.registry)
        self._http_server = None
        self._http_thread = None

    def serve(self, host: str, port: int, is_ready: Callable[[], bool]) -> int:
        """Start /metrics and /ready over HTTP in a daemon thread; returns the bound port."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") != "/ready":
                return metrics_app(environ, start_response)
            ready = is_ready()
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ready\n" if ready else b"not ready\n"]

        server_class = ThreadingWSGIServer
        if ":" in host:
            server_class = type("IPv6WSGIServer", (ThreadingWSGIServer,),
                                {"address_family": socket.AF_INET6})
        self._http_server = make_server(host.strip("[]"), port, app, server_class,
                                        handler_class=_QuietHandler)
        self._http_thread = threading.Thread(target=self._http_server.serve_forever,
                                             name="apex-metrics-http", daemon=True)
        self._http_thread.start()
        return self._http_server.server_port

    def close(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None

    def start_request(self) -> RequestTimer:
        return RequestTimer(self)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and health checks every second would flood the server's log."""


@dataclass
class RequestTimer:
    """Timestamps of one request as the servicer sees it (monotonic seconds)."""

    metrics: ServerMetrics
    start: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None

    def on_tokens(self, num_tokens: int) -> None:
        """Called for each engine output carrying num_tokens new tokens."""
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
            self.metrics.time_to_first_token.observe(now - self.start)
        else:
            # One output may carry several tokens (stop-string hold-back releases them late).
            self.metrics.inter_token_latency.observe((now - self.last_token_time) / num_tokens)
        self.last_token_time = now

    def on_finish(self, finish_reason: str, completion_tokens: int, queue_ms: float) -> None:
        now = time.monotonic()
        self.metrics.end_to_end.observe(now - self.start)
        self.metrics.queue_time.observe(queue_ms / 1000.0)
        self.metrics.requests_finished.labels(finish_reason=finish_reason).inc()
        if self.first_token_time is not None and completion_tokens > 1:
            self.metrics.time_per_output_token.observe(
                (now - self.first_token_time) / (completion_tokens - 1))

    def on_error(self, code_name: str) -> None:
        self.metrics.requests_failed.labels(code=code_name).inc()
