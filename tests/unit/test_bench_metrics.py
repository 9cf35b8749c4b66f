"""apex-bench metrics against a hand-computed trace (times chosen to be exact in binary)."""

from __future__ import annotations

import math

import pytest

from clients.bench.metrics import (
    MetricsError,
    RequestRecord,
    compute_metrics,
    metrics_fields,
    parse_goodput,
    parse_percentiles,
    per_request_fields,
    percentile_key,
)

# A: 3 tokens in 3 messages. TTFT 125 ms, E2EL 500, ITLs 125 and 250, TPOT (500-125)/2 = 187.5.
# B: 5 tokens in 2 messages. TTFT 375, E2EL 625, ITL 250 (one gap), TPOT (625-375)/4 = 62.5.
# C: 1 token. TTFT 250, E2EL 250, no ITL, no TPOT.
# D failed with RESOURCE_EXHAUSTED; E cancelled after 2 tokens. Neither enters the latencies.
TRACE = [
    RequestRecord(0.0, (0.125, 0.25, 0.5), 0.5, prompt_len=10, output_len=3, success=True,
                  finish_reason="FINISH_REASON_LENGTH"),
    RequestRecord(1.0, (1.375, 1.625), 1.625, prompt_len=20, output_len=5, success=True,
                  finish_reason="FINISH_REASON_LENGTH"),
    RequestRecord(2.0, (2.25,), 2.25, prompt_len=30, output_len=1, success=True,
                  finish_reason="FINISH_REASON_EOS"),
    RequestRecord(2.5, (), 2.5, prompt_len=40, output_len=0, success=False,
                  error_code="RESOURCE_EXHAUSTED"),
    RequestRecord(3.0, (3.125, 3.25), 3.25, prompt_len=50, output_len=2, success=False,
                  cancelled=True),
]
DURATION_S = 4.0


def exact(value: float):
    return pytest.approx(value, rel=1e-12, abs=1e-9)


def test_per_request_definitions() -> None:
    first, second, third = TRACE[:3]
    assert first.ttft == 0.125 and first.e2el == 0.5 and first.itls == [0.125, 0.25]
    assert first.tpot == exact(0.1875)
    # Several tokens in one message count as one inter-token gap.
    assert second.itls == [0.25] and second.tpot == exact(0.0625)
    assert third.tpot is None and third.itls == []


def test_counts_totals_and_throughput() -> None:
    metrics = compute_metrics(TRACE, DURATION_S)
    assert (metrics.completed, metrics.failed, metrics.cancelled) == (3, 1, 1)
    assert metrics.total_input_tokens == 60
    assert metrics.total_output_tokens == 9
    assert metrics.cancelled_output_tokens == 2
    assert metrics.request_throughput == exact(0.75)
    assert metrics.output_throughput == exact(2.25)
    assert metrics.total_token_throughput == exact(17.25)
    assert metrics.request_goodput is None
    assert metrics.errors_by_code == {"RESOURCE_EXHAUSTED": 1}
    assert metrics.finish_reasons == {"FINISH_REASON_LENGTH": 2, "FINISH_REASON_EOS": 1}


def test_latency_statistics() -> None:
    fields = metrics_fields(compute_metrics(TRACE, DURATION_S, percentiles=(50.0, 90.0, 99.0)))
    expected = {
        # TTFTs 125, 375, 250 ms.
        "mean_ttft_ms": 250.0, "median_ttft_ms": 250.0, "std_ttft_ms": math.sqrt(31250 / 3),
        "p50_ttft_ms": 250.0, "p90_ttft_ms": 350.0, "p99_ttft_ms": 372.5,
        # TPOTs 187.5, 62.5 ms (the 1-token request has none).
        "mean_tpot_ms": 125.0, "median_tpot_ms": 125.0, "std_tpot_ms": 62.5,
        "p90_tpot_ms": 175.0, "p99_tpot_ms": 186.25,
        # ITLs 125, 250, 250 ms.
        "mean_itl_ms": 625 / 3, "median_itl_ms": 250.0, "std_itl_ms": math.sqrt(31250 / 9),
        "p90_itl_ms": 250.0, "p99_itl_ms": 250.0,
        # E2ELs 500, 625, 250 ms.
        "mean_e2el_ms": 1375 / 3, "median_e2el_ms": 500.0, "p90_e2el_ms": 600.0,
        "p99_e2el_ms": 622.5, "std_e2el_ms": math.sqrt((125**2 + 500**2 + 625**2) / 27),
    }
    for key, value in expected.items():
        assert fields[key] == exact(value), key


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 300.0}, 2),                      # B's 375 ms TTFT misses
    ({"tpot": 100.0}, 2),                      # A's 187.5 ms TPOT misses; C's counts as 0
    ({"e2el": 500.0}, 2),                      # B's 625 ms misses; A's 500 is within (<=)
    ({"ttft": 300.0, "tpot": 200.0, "e2el": 400.0}, 1),  # only C meets all three
    ({"ttft": 0.0}, 0),
])
def test_goodput(slos: dict[str, float], good: int) -> None:
    metrics = compute_metrics(TRACE, DURATION_S, goodput_slos_ms=slos)
    assert metrics.request_goodput == exact(good / DURATION_S)


def test_no_completed_requests_gives_zeros() -> None:
    metrics = compute_metrics(TRACE[3:], 2.0)
    assert metrics.completed == 0 and metrics.output_throughput == 0.0
    fields = metrics_fields(metrics)
    assert fields["mean_ttft_ms"] == 0.0 and fields["p99_itl_ms"] == 0.0


def test_per_request_arrays_follow_vllm() -> None:
    arrays = per_request_fields(TRACE)
    assert arrays["input_lens"] == [10, 20, 30, 40, 50]
    assert arrays["output_lens"] == [3, 5, 1, 0, 0]
    assert arrays["ttfts"] == [0.125, 0.375, 0.25, 0.0, 0.0]
    assert arrays["itls"] == [[0.125, 0.25], [0.25], [], [], []]
    assert arrays["errors"] == ["", "", "", "RESOURCE_EXHAUSTED", ""]


def test_percentile_flags_and_keys() -> None:
    assert parse_percentiles("50, 99.9") == (50.0, 90.0, 99.0, 99.9)
    assert percentile_key(99.0) == "p99" and percentile_key(99.9) == "p99.9"
    fields = metrics_fields(compute_metrics(TRACE, DURATION_S, percentiles=(99.9,)))
    assert "p99.9_itl_ms" in fields
    for bad in ("abc", "0", "100"):
        with pytest.raises(MetricsError, match="metric-percentiles"):
            parse_percentiles(bad)


def test_goodput_flag_parsing() -> None:
    assert parse_goodput(["ttft:100", "tpot:7.5"]) == {"ttft": 100.0, "tpot": 7.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["e2el:-1"], ["tpot:nan"]):
        with pytest.raises(MetricsError, match="--goodput"):
            parse_goodput(bad)


def test_zero_duration_is_rejected() -> None:
    with pytest.raises(MetricsError, match="duration"):
        compute_metrics(TRACE, 0.0)
