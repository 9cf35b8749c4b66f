"""Synthetic profiles with round numbers for the perf-model, chooser and simulator tests."""

from __future__ import annotations

from apex_grpc.perf.perf_model import Link, ModelShape, Profile, Table1D, Table2D

SHAPE = ModelShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=100)


def make_profile(linear_ms: float = 1.0, gpu_ms_per_ktok: float = 0.01,
                 cpu_ms_per_ktok: float = 0.5, sync_ms: float = 0.0,
                 name: str = "synthetic", copy_gb_per_s: float = 1e6,
                 prefill_ms_per_ktok: float = 0.2) -> Profile:
    """Per layer: T_lin flat at linear_ms up to 256 tokens then doubling per doubling;
    attention linear in context tokens (ms per 1000 tokens; prefill attention at 1024 tokens
    prefill_ms_per_ktok); copies without latency at
    copy_gb_per_s both ways (default: practically instant)."""
    ctx = (1000.0, 100000.0)
    return Profile(
        shape=SHAPE, dtype="float32", device_name="test-gpu", cpu_threads=4,
        linear=Table1D((1.0, 256.0, 512.0), (linear_ms, linear_ms, 2 * linear_ms)),
        prefill_attention=Table1D((16.0, 1024.0), (0.01, prefill_ms_per_ktok)),
        gpu_attention=Table1D(ctx, tuple(c / 1000 * gpu_ms_per_ktok for c in ctx)),
        cpu_attention=Table2D((1.0, 256.0), ctx,
                              tuple(tuple(c / 1000 * cpu_ms_per_ktok for c in ctx)
                                    for _ in range(2))),
        d2h=Link(0.0, copy_gb_per_s), h2d=Link(0.0, copy_gb_per_s), layer_launch_ms=0.0,
        layer_sync_ms=sync_ms,
        head=Table1D((1.0, 1024.0), (0.5, 0.5)), name=name)
