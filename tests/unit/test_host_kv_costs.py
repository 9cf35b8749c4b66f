"""The performance model knows the host KV dtype: an int8 tier's CPU table is cheaper per
context token, the same host memory holds more tokens, and a profile made for one dtype is
never silently used for another."""

from __future__ import annotations

import json

import pytest

from apex_grpc.perf.host_kv_costs import (INT8_CPU_COST_RATIO, host_tokens_for,
                                              with_host_kv_dtype)
from apex_grpc.perf.perf_model import Profile
from apex_grpc.perf.simulate import main as simulate_main


def test_int8_profile_derives_a_cheaper_cpu_table():
    profile = Profile.load("t4-llama-2-7b")
    assert profile.host_kv_dtype == "auto"
    int8 = with_host_kv_dtype(profile, "int8")
    assert int8.host_kv_dtype == "int8" and with_host_kv_dtype(int8, "int8") is int8
    base, derived = profile.cpu_attention, int8.cpu_attention
    call_ms = min(min(row) for row in base.ms)
    for row, new_row in zip(base.ms, derived.ms):
        for ms, new_ms in zip(row, new_row):
            assert new_ms == pytest.approx(call_ms + (ms - call_ms) * INT8_CPU_COST_RATIO)
    assert derived.at(8, 16384) < base.at(8, 16384)
    assert Profile.from_dict(int8.to_dict()).host_kv_dtype == "int8"
    with pytest.raises(ValueError, match="made for an int8 host tier"):
        with_host_kv_dtype(int8, "auto")


def test_int8_host_tier_holds_about_twice_the_tokens():
    assert host_tokens_for(1000, "auto", 2, 128) == 1000
    assert host_tokens_for(1000, "int8", 2, 128) == 1939  # 2 bytes vs 1 + 4/128


def test_simulator_places_more_rows_on_an_int8_host_tier(capsys):
    """T4 profile, a GPU budget of 2K tokens: over a bf16 host tier apex gains nothing here;
    over an int8 one (cheaper CPU attention, more host room) it beats gpu-only."""
    results = {}
    for dtype in ("auto", "int8"):
        simulate_main(["--profile", "t4-llama-2-7b", "--num-requests", "80", "--gpu-kv-tokens",
                       "2048", "--host-kv-tokens", "8192", "--policies", "gpu-only,apex",
                       "--host-kv-dtype", dtype, "--json"])
        results[dtype] = json.loads(capsys.readouterr().out)["policies"]
    assert results["int8"]["apex"]["output_throughput"] > \
        1.2 * results["int8"]["gpu-only"]["output_throughput"]
    assert results["int8"]["apex"]["output_throughput"] > \
        results["auto"]["apex"]["output_throughput"]
