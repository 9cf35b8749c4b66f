"""The CPU-kernel bench's side-by-side int8-over-bf16 comparison: which kernel sets it pairs."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool, runs_isa
from apex_grpc.bench.cpu_attention import kernel_set_pairs


def server_pair() -> tuple[str, str]:
    with CpuAttentionPool(1) as pool:
        return pool.isa(torch.bfloat16), pool.isa(torch.int8)


def test_the_server_pick_comes_first_and_only_once():
    assert kernel_set_pairs([]) == [server_pair()]
    assert kernel_set_pairs([None]) == [server_pair()]


def test_a_forced_set_is_paired_with_itself():
    if not runs_isa("avx2"):
        pytest.skip("this CPU lacks avx2")
    pairs = kernel_set_pairs(["avx2", "scalar"])
    assert pairs[0] == server_pair()
    assert ("avx2", "avx2") in pairs and ("scalar", "scalar") in pairs


def test_single_dtype_sets_make_no_cross_pairs():
    """avx512bf16 serves bf16 only (int8 falls back to plain avx512): forcing it adds no pair of
    two different ISAs beyond the server's own."""
    if not runs_isa("avx512bf16"):
        pytest.skip("this CPU lacks avx512bf16")
    assert kernel_set_pairs(["avx512bf16"]) == [server_pair()]
