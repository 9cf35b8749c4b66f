"""What apex-bench prints and writes: the vLLM-style summary table and the result JSON.

The result JSON uses vLLM's serving-benchmark key names (completed, total_output_tokens,
request_throughput, mean_ttft_ms, p99_itl_ms, input_lens, ttfts, ...) plus apex-grpc's own
(target, policy, cancelled, errors_by_code, requests_per_replica, completed_per_replica,
total_retries, replica_ids, server_stats_delta, ...), one file per run.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

from clients.bench.metrics import (
    LATENCY_METRICS,
    BenchmarkMetrics,
    RequestRecord,
    metrics_fields,
    per_request_fields,
)

TABLE_WIDTH = 50
LABEL_WIDTH = 40
LATENCY_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
# The server counters worth a line in the summary (all counter deltas go into the JSON).
SUMMARY_STATS = ("preemptions_total", "evictions_total", "restores_total", "steps_gpu_only",
                 "steps_async_overlap", "steps_asymmetric_pipeline", "prompt_tokens_total",
                 "generation_tokens_total")


@dataclass(frozen=True)
class RunInfo:
    """How one run was configured, and against which server."""

    target: str
    policy: str
    model_id: str
    dataset_name: str
    num_prompts: int
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    seed: int


def rate_label(request_rate: float) -> str:
    return "inf" if math.isinf(request_rate) else f"{request_rate:g}"


def build_result(info: RunInfo, metrics: BenchmarkMetrics, records: list[RequestRecord],
                 stats_before: dict[str, float], stats_after: dict[str, float],
                 stats_delta: dict[str, float]) -> dict[str, object]:
    result: dict[str, object] = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "apex-grpc",
        "target": info.target,
        "policy": info.policy,
        "model_id": info.model_id,
        "dataset_name": info.dataset_name,
        "num_prompts": info.num_prompts,
        # vLLM writes an infinite rate as the string "inf" (JSON has no infinity).
        "request_rate": "inf" if math.isinf(info.request_rate) else info.request_rate,
        "burstiness": info.burstiness,
        "max_concurrency": info.max_concurrency,
        "seed": info.seed,
    }
    result.update(metrics_fields(metrics))
    result["server_stats_delta"] = dict(stats_delta)
    result["server_stats_before"] = dict(stats_before)
    result["server_stats_after"] = dict(stats_after)
    result.update(per_request_fields(records))
    return result


def write_result(path: str | Path, result: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def result_path(base: str | Path, info: RunInfo, num_runs: int) -> Path:
    """The base path for a single run; `<stem>-<policy>-<rate>qps<suffix>` within a sweep."""
    base = Path(base)
    if num_runs == 1:
        return base
    policy = info.policy or "unknown"
    suffix = base.suffix or ".json"
    return base.with_name(f"{base.stem}-{policy}-{rate_label(info.request_rate)}qps{suffix}")


def _title(text: str, fill: str = "-") -> str:
    return f" {text} ".center(TABLE_WIDTH, fill)


def _row(label: str, value: object) -> str:
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<{LABEL_WIDTH}} {shown}"


def format_summary(info: RunInfo, metrics: BenchmarkMetrics,
                   stats_delta: dict[str, float]) -> str:
    lines = [
        _title("Serving Benchmark Result", "="),
        _row("Target:", info.target),
        _row("Policy:", info.policy),
        _row("Successful requests:", metrics.completed),
        _row("Failed requests:", metrics.failed),
        _row("Cancelled requests:", metrics.cancelled),
        _row("Request rate configured (RPS):", rate_label(info.request_rate)),
        _row("Maximum request concurrency:", info.max_concurrency),
        _row("Benchmark duration (s):", metrics.duration_s),
        _row("Total input tokens:", metrics.total_input_tokens),
        _row("Total generated tokens:", metrics.total_output_tokens),
        _row("Request throughput (req/s):", metrics.request_throughput),
    ]
    if metrics.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", metrics.request_goodput))
    lines += [
        _row("Output token throughput (tok/s):", metrics.output_throughput),
        _row("Total token throughput (tok/s):", metrics.total_token_throughput),
    ]
    for name in LATENCY_METRICS:
        title, short = LATENCY_TITLES[name]
        stats = metrics.latencies[name]
        lines.append(_title(title))
        lines.append(_row(f"Mean {short} (ms):", stats.mean_ms))
        lines.append(_row(f"Median {short} (ms):", stats.median_ms))
        lines.append(_row(f"Std {short} (ms):", stats.std_ms))
        for percentile, value in stats.percentiles_ms:
            lines.append(_row(f"P{percentile:g} {short} (ms):", value))
    if metrics.requests_per_replica:
        lines.append(_title("Requests per replica (completed / answered)"))
        lines += [_row(f"{replica}:", f"{metrics.completed_per_replica.get(replica, 0)} / {count}")
                  for replica, count in sorted(metrics.requests_per_replica.items())]
    if metrics.total_retries:
        lines.append(_row("Retries (UNAVAILABLE before a token):", metrics.total_retries))
    if metrics.errors_by_code:
        lines.append(_title("Errors by gRPC code"))
        lines += [_row(f"{code}:", count) for code, count in sorted(metrics.errors_by_code.items())]
    lines.append(_title("Server stats (delta over the run)"))
    lines += [_row(f"{name}:", stats_delta[name]) for name in SUMMARY_STATS if name in stats_delta]
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)
