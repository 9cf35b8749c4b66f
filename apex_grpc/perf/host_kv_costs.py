"""What the host KV dtype changes for the performance model: the CPU's cost per context token
(the cpu_attention table) and how many tokens the host tier's memory holds.

A profile is measured (apex-grpc profile --host-kv-dtype ...) or derived for one host dtype
(Profile.host_kv_dtype). with_host_kv_dtype re-derives a 16-bit profile's CPU table for an int8
tier from the kernel's measured cost ratio, so a shipped or cached profile serves either tier.
"""

from __future__ import annotations

import dataclasses

import torch

from apex_grpc.config import HostKVDtype
from apex_grpc.kv_cache.quantized import host_kv_element_bytes, quantize_rows
from apex_grpc.perf.perf_model import Profile, Table2D
from apex_grpc.platform import host_kv_copy

# CPU attention time per context token over an int8 tier / over a bf16 one where the kernel
# reads at memory speed (the shipped profiles' 14-thread hosts): the bytes ratio, 264 / 512 per
# token row and kv head (int8 + its scale vs bf16), rounded up. The 2-core development machine
# measured 0.51-0.52 side by side with AVX512-VNNI and 0.54-0.56 with AVX2 (bf16 near memory
# speed there) (python -m apex_grpc.bench.cpu_attention, docs/benchmarks.md, 2026-12-07);
# where the kernel is compute-bound, measure the table itself:
# apex-grpc profile --host-kv-dtype int8.
INT8_CPU_COST_RATIO = 0.55


def host_kv_caches(host_kv_dtype: str, k_cache: torch.Tensor, v_cache: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(k, v, extra submit_decode arguments) of a host tier of host_kv_dtype holding these
    16/32-bit caches' values, in the memory a CPU device's host tier has (the profiler
    measures the kernel on them)."""
    if HostKVDtype(host_kv_dtype) == HostKVDtype.AUTO:
        return host_kv_copy(k_cache), host_kv_copy(v_cache), {}
    (k, k_scales), (v, v_scales) = quantize_rows(k_cache), quantize_rows(v_cache)
    return host_kv_copy(k), host_kv_copy(v), {"k_scales": host_kv_copy(k_scales),
                                              "v_scales": host_kv_copy(v_scales)}


def with_host_kv_dtype(profile: Profile, host_kv_dtype: str) -> Profile:
    """The profile for a host tier of host_kv_dtype: itself when it was made for it, else (a
    16-bit profile asked for int8) its CPU table scaled by INT8_CPU_COST_RATIO beyond the
    per-call cost (the table's smallest entry)."""
    wanted = HostKVDtype(host_kv_dtype).value
    if profile.host_kv_dtype == wanted:
        return profile
    if wanted != HostKVDtype.INT8.value:
        raise ValueError(f"profile {profile.name or '(unnamed)'} was made for an "
                         f"{profile.host_kv_dtype} host tier; measure one for {wanted}")
    table = profile.cpu_attention
    call_ms = min(min(row) for row in table.ms)
    rows = tuple(tuple(call_ms + (ms - call_ms) * INT8_CPU_COST_RATIO for ms in row)
                 for row in table.ms)
    return dataclasses.replace(
        profile, cpu_attention=Table2D(table.row_xs, table.col_xs, rows), host_kv_dtype=wanted,
        notes=f"{profile.notes}; CPU attention derived for an int8 host tier "
              f"(x{INT8_CPU_COST_RATIO} per context token)".lstrip("; "))


def host_tokens_for(tokens_at_model_dtype: int, host_kv_dtype: str, model_dtype_bytes: int,
                    head_dim: int) -> int:
    """How many tokens the host memory that holds tokens_at_model_dtype tokens in the model's
    dtype holds in a host_kv_dtype tier (an int8 tier's scales included)."""
    if HostKVDtype(host_kv_dtype) == HostKVDtype.AUTO:
        return tokens_at_model_dtype
    element = host_kv_element_bytes(torch.int8, head_dim)
    return int(tokens_at_model_dtype * model_dtype_bytes / element)
