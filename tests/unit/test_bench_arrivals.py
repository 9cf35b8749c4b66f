"""apex-bench arrival processes: Poisson and gamma (burstiness) inter-arrival gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clients.bench.arrivals import ArrivalError, arrival_offsets, inter_arrival_gaps, parse_rate

NUM_SAMPLES = 50_001  # 50,000 gaps


def test_poisson_gaps_have_the_requested_rate() -> None:
    gaps = inter_arrival_gaps(NUM_SAMPLES, request_rate=8.0, burstiness=1.0, seed=0)
    assert gaps.shape == (NUM_SAMPLES - 1,)
    assert 1.0 / gaps.mean() == pytest.approx(8.0, rel=0.02)
    # Exponential gaps: the standard deviation equals the mean.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_sets_gap_variance(burstiness: float) -> None:
    rate = 5.0
    gaps = inter_arrival_gaps(NUM_SAMPLES, request_rate=rate, burstiness=burstiness, seed=1)
    # Gamma(shape=b, scale=1/(rate*b)): mean 1/rate whatever b, variance 1/(rate^2 * b).
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    assert gaps.var() == pytest.approx(1.0 / (rate**2 * burstiness), rel=0.06)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5


def test_offsets_are_cumulative_and_deterministic() -> None:
    offsets = arrival_offsets(100, 10.0, 1.0, seed=3)
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0.0)
    assert offsets == arrival_offsets(100, 10.0, 1.0, seed=3)
    assert offsets != arrival_offsets(100, 10.0, 1.0, seed=4)
    assert arrival_offsets(0, 10.0, 1.0, seed=0) == []


def test_bad_rates_are_rejected() -> None:
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    for text in ("0", "-1", "fast", "nan"):
        with pytest.raises(ArrivalError, match="request rate"):
            parse_rate(text)
    with pytest.raises(ArrivalError, match="burstiness"):
        inter_arrival_gaps(10, 1.0, 0.0, seed=0)
