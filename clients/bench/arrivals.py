"""Request arrival processes: when each benchmark request is sent.

Inter-arrival gaps follow a gamma distribution with shape = burstiness and mean 1 / rate, as in
vLLM's serving benchmark: burstiness 1 is a Poisson process (exponential gaps), below 1 is
burstier, above 1 is more regular. An infinite rate sends everything at once.
"""

from __future__ import annotations

import math

import numpy as np


class ArrivalError(ValueError):
    """The request rate or burstiness is out of range."""


def parse_rate(text: str) -> float:
    """A request rate flag value: a positive number or `inf`."""
    try:
        rate = float(text)
    except ValueError:
        raise ArrivalError(f"request rate must be a number or 'inf', got {text!r}") from None
    if not rate > 0.0:
        raise ArrivalError(f"request rate must be > 0, got {text!r}")
    return rate


def inter_arrival_gaps(num_requests: int, request_rate: float, burstiness: float,
                       seed: int) -> np.ndarray:
    """Gaps in seconds before each request after the first ([num_requests - 1])."""
    if not request_rate > 0.0:
        raise ArrivalError(f"--request-rate must be > 0, got {request_rate}")
    if not (burstiness > 0.0 and math.isfinite(burstiness)):
        raise ArrivalError(f"--burstiness must be a positive finite number, got {burstiness}")
    num_gaps = max(0, num_requests - 1)
    if math.isinf(request_rate):
        return np.zeros(num_gaps)
    # Mean gap = shape * scale = 1 / rate.
    scale = 1.0 / (request_rate * burstiness)
    return np.random.default_rng(seed).gamma(shape=burstiness, scale=scale, size=num_gaps)


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float,
                    seed: int) -> list[float]:
    """Send time of each request in seconds after the start; the first goes at 0."""
    gaps = inter_arrival_gaps(num_requests, request_rate, burstiness, seed)
    if num_requests == 0:
        return []
    return [0.0] + np.cumsum(gaps).tolist()
