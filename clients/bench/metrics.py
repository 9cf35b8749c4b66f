"""Client-side serving metrics from per-request timing records, defined as vLLM defines them.

Owns RequestRecord (what the runner observed for one request) and compute_metrics():
- TTFT = arrival of the first streamed message carrying tokens - send time;
- ITL = gaps between consecutive token-carrying messages (a message with several tokens is one
  gap);
- E2EL = arrival of the last token-carrying message - send time;
- TPOT per request = (E2EL - TTFT) / (output_tokens - 1), only for requests with > 1 token;
- goodput = requests meeting every SLO per second (TPOT counts as 0 for 1-token requests).
Only completed requests enter latencies and token totals; failed and cancelled ones are counted.
Empty samples give 0, like vLLM. Mean/median/std (population)/percentiles (linear) use numpy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


class MetricsError(ValueError):
    """A metrics flag (percentiles, goodput SLOs) is malformed."""


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times are seconds on one monotonic clock."""

    send_time: float
    # Arrival time of every streamed message that carried at least one token.
    chunk_times: tuple[float, ...]
    # When the stream ended (final message, error or cancel).
    end_time: float
    # usage.prompt_tokens when the server reported it, else the length the client sent.
    prompt_len: int
    # usage.completion_tokens when completed; tokens received so far when cancelled.
    output_len: int
    success: bool
    error_code: str = ""  # gRPC status code name when the call failed
    cancelled: bool = False  # cancelled by the client (cancellation injection)
    finish_reason: str = ""
    replica_id: str = ""  # the replica that answered the last attempt ("" if it did not say)
    num_retries: int = 0  # attempts refused with UNAVAILABLE before any token, then resent

    @property
    def ttft(self) -> float:
        first = self.chunk_times[0] if self.chunk_times else self.end_time
        return first - self.send_time

    @property
    def e2el(self) -> float:
        last = self.chunk_times[-1] if self.chunk_times else self.end_time
        return last - self.send_time

    @property
    def itls(self) -> list[float]:
        return np.diff(self.chunk_times).tolist() if len(self.chunk_times) > 1 else []

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class LatencyStats:
    """One latency metric in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: tuple[tuple[float, float], ...]  # (percentile, value)


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    cancelled: int
    total_input_tokens: int
    total_output_tokens: int
    cancelled_output_tokens: int
    duration_s: float
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float
    total_token_throughput: float
    latencies: dict[str, LatencyStats]  # keyed by LATENCY_METRICS
    errors_by_code: dict[str, int] = field(default_factory=dict)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    # Per replica (apex-replica metadata): requests it answered last, and those it completed.
    requests_per_replica: dict[str, int] = field(default_factory=dict)
    completed_per_replica: dict[str, int] = field(default_factory=dict)
    total_retries: int = 0


def latency_stats(values_s: list[float], percentiles: tuple[float, ...]) -> LatencyStats:
    """Statistics in ms of samples given in seconds; an empty sample gives zeros."""
    values_ms = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return LatencyStats(
        mean_ms=float(np.mean(values_ms)),
        median_ms=float(np.median(values_ms)),
        std_ms=float(np.std(values_ms)),
        percentiles_ms=tuple((p, float(np.percentile(values_ms, p))) for p in percentiles),
    )


def compute_metrics(records: list[RequestRecord], duration_s: float,
                    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                    goodput_slos_ms: dict[str, float] | None = None) -> BenchmarkMetrics:
    if not duration_s > 0.0:
        raise MetricsError(f"benchmark duration must be > 0, got {duration_s}")
    done = [rec for rec in records if rec.success]
    total_input = sum(rec.prompt_len for rec in done)
    total_output = sum(rec.output_len for rec in done)
    samples = {
        "ttft": [rec.ttft for rec in done],
        "tpot": [rec.tpot for rec in done if rec.tpot is not None],
        "itl": [gap for rec in done for gap in rec.itls],
        "e2el": [rec.e2el for rec in done],
    }
    goodput = None
    if goodput_slos_ms:
        goodput = sum(_meets_slos(rec, goodput_slos_ms) for rec in done) / duration_s
    return BenchmarkMetrics(
        completed=len(done),
        failed=sum(1 for rec in records if not rec.success and not rec.cancelled),
        cancelled=sum(1 for rec in records if rec.cancelled),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        cancelled_output_tokens=sum(rec.output_len for rec in records if rec.cancelled),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        latencies={name: latency_stats(samples[name], percentiles) for name in LATENCY_METRICS},
        errors_by_code=dict(Counter(rec.error_code for rec in records if rec.error_code)),
        finish_reasons=dict(Counter(rec.finish_reason for rec in done if rec.finish_reason)),
        requests_per_replica=dict(Counter(rec.replica_id for rec in records if rec.replica_id)),
        completed_per_replica=dict(Counter(rec.replica_id for rec in done if rec.replica_id)),
        total_retries=sum(rec.num_retries for rec in records),
    )


def _meets_slos(rec: RequestRecord, slos_ms: dict[str, float]) -> bool:
    # A 1-token request has no TPOT; it counts as 0 so that only TTFT and E2EL judge it.
    observed_s = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2el": rec.e2el}
    return all(observed_s[name] <= limit_ms / 1000.0 for name, limit_ms in slos_ms.items())


def percentile_key(percentile: float) -> str:
    """`p99` for 99, `p99.9` for 99.9 (vLLM's key spelling)."""
    return f"p{int(percentile)}" if percentile == int(percentile) else f"p{percentile}"


def metrics_fields(metrics: BenchmarkMetrics) -> dict[str, object]:
    """The metric keys of vLLM's serving-benchmark result JSON, plus ours."""
    fields: dict[str, object] = {
        "duration": metrics.duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "cancelled": metrics.cancelled,
        "total_input_tokens": metrics.total_input_tokens,
        "total_output_tokens": metrics.total_output_tokens,
        "cancelled_output_tokens": metrics.cancelled_output_tokens,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
    }
    for name in LATENCY_METRICS:
        stats = metrics.latencies[name]
        fields[f"mean_{name}_ms"] = stats.mean_ms
        fields[f"median_{name}_ms"] = stats.median_ms
        fields[f"std_{name}_ms"] = stats.std_ms
        for percentile, value in stats.percentiles_ms:
            fields[f"{percentile_key(percentile)}_{name}_ms"] = value
    fields["errors_by_code"] = dict(metrics.errors_by_code)
    fields["finish_reasons"] = dict(metrics.finish_reasons)
    fields["requests_per_replica"] = dict(metrics.requests_per_replica)
    fields["completed_per_replica"] = dict(metrics.completed_per_replica)
    fields["total_retries"] = metrics.total_retries
    return fields


def per_request_fields(records: list[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request arrays (seconds); requests that did not complete have 0 / []."""
    return {
        "input_lens": [rec.prompt_len for rec in records],
        "output_lens": [rec.output_len if rec.success else 0 for rec in records],
        "ttfts": [rec.ttft if rec.success else 0.0 for rec in records],
        "itls": [rec.itls if rec.success else [] for rec in records],
        "errors": [rec.error_code for rec in records],
        "replica_ids": [rec.replica_id for rec in records],
        "retries": [rec.num_retries for rec in records],
    }


def parse_percentiles(text: str) -> tuple[float, ...]:
    """--metric-percentiles "50,90,99.9"; 90 and 99 are always reported."""
    values = set(DEFAULT_PERCENTILES)
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            raise MetricsError(f"--metric-percentiles: {part!r} is not a number") from None
        if not 0.0 < value < 100.0:
            raise MetricsError(f"--metric-percentiles: {part} is not in (0, 100)")
        values.add(value)
    return tuple(sorted(values))


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """--goodput ttft:MS tpot:MS e2el:MS -> {"ttft": MS, ...}."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise MetricsError(f"--goodput {spec!r}: expected NAME:MS with NAME in "
                               f"{', '.join(GOODPUT_METRICS)}")
        try:
            limit_ms = float(value)
        except ValueError:
            raise MetricsError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if not (limit_ms >= 0.0 and math.isfinite(limit_ms)):
            raise MetricsError(f"--goodput {spec!r}: the SLO must be a finite number >= 0")
        slos[name] = limit_ms
    return slos
