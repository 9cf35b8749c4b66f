"""The host tier's element type (--host-kv-dtype) and its 8-bit representation.

An int8 host tier stores each token's k (and v) row of each kv head as round(x / scale) in
[-127, 127] with scale = max|x| / 127 in float32, kept beside the blocks:
    kv  [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] int8
    scales  [num_layers, 2, num_blocks, num_kv_heads, block_size] float32
One scale per token row (not per block) lets an append quantize only its own row, and the native
kernel (kernels/cpu_attention, quantize_row) rounds exactly like quantize_rows here, so rows
written by either side are bit-identical. Every writer of the host tier goes through
quantize_rows; restores to the GPU go through dequantize_rows.
"""

from __future__ import annotations

import torch

from apex_grpc.config import HostKVDtype

__all__ = [
    "dequantize_rows",
    "dequantized_blocks",
    "checked_host_kv_dtype",
    "host_kv_element_bytes",
    "quantize_rows",
    "resolve_host_kv_dtype",
    "write_quantized",
]

QMAX = 127.0


def resolve_host_kv_dtype(choice: HostKVDtype, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the host tier's elements for a --host-kv-dtype choice."""
    return torch.int8 if choice == HostKVDtype.INT8 else model_dtype


def checked_host_kv_dtype(choice: HostKVDtype, model_dtype: torch.dtype,
                          isa: str | None = None) -> torch.dtype:
    """resolve_host_kv_dtype, refusing (ValueError, at start-up) an int8 tier on a CPU whose
    native kernel would attend it with scalar code only (isa: the kernel set for int8 KV,
    asked of the native extension when None)."""
    host_dtype = resolve_host_kv_dtype(choice, model_dtype)
    if host_dtype == torch.int8:
        if isa is None:
            from apex_grpc.attention.cpu_kernel import best_isa

            isa = best_isa(torch.int8)
        if isa == "scalar":
            raise ValueError("--host-kv-dtype int8 needs a CPU with AVX2 or AVX-512: here the "
                             "native kernel would attend it with scalar code, slower than the "
                             "16-bit tier; use --host-kv-dtype auto")
    return host_dtype


def host_kv_element_bytes(host_dtype: torch.dtype, head_dim: int) -> float:
    """Bytes per KV element in the host tier, the int8 tier's scale included."""
    if host_dtype == torch.int8:
        return 1.0 + 4.0 / head_dim
    return float(torch.empty((), dtype=host_dtype).element_size())


def quantize_rows(rows: torch.Tensor, levels: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., head_dim] (any float dtype) -> (int8 [..., head_dim], scales [...] float32).
    Computed in float32: scale = amax / levels, q = round_half_even(x / scale); all-zero rows
    get scale 0 and zeros. The cache uses QMAX levels; fewer model a kernel that quantizes q
    more coarsely (the AVX2 int8 q . k: 63)."""
    values = rows.float()
    scales = values.abs().amax(dim=-1) / levels
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = torch.round(values / divisor.unsqueeze(-1)).clamp_(-levels, levels)
    return quantized.to(torch.int8), scales


def dequantize_rows(quantized: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., head_dim] and scales [...] -> rows [..., head_dim] of dtype."""
    return (quantized.float() * scales.unsqueeze(-1)).to(dtype)


def write_quantized(cache: torch.Tensor, scales: torch.Tensor, slot_mapping: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor) -> None:
    """One layer of an int8 tier: cache [2, num_blocks, num_kv_heads, block_size, head_dim],
    scales [2, num_blocks, num_kv_heads, block_size]; k/v [n, num_kv_heads, head_dim] (any
    float dtype, any device) quantized into token slots block_id * block_size + offset."""
    block_size = cache.shape[3]
    slots = slot_mapping.to(cache.device, torch.int64)
    block_ids, offsets = slots // block_size, slots % block_size
    for kv, rows in enumerate((k, v)):
        quantized, row_scales = quantize_rows(rows)
        cache[kv, block_ids, :, offsets] = quantized.to(cache.device)
        scales[kv, block_ids, :, offsets] = row_scales.to(cache.device)


def dequantized_blocks(cache: torch.Tensor, scales: torch.Tensor, block_tables: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks an int8 layer's block_tables name, dequantized: (cache [2, num_used,
    num_kv_heads, block_size, head_dim] of dtype, block_tables renumbered into it). For the
    torch reference path; the native kernel reads the int8 blocks directly."""
    used = torch.unique(block_tables.to(cache.device, torch.int64))
    renumber = torch.zeros(cache.shape[1], dtype=torch.int32, device=cache.device)
    renumber[used] = torch.arange(used.numel(), dtype=torch.int32, device=cache.device)
    blocks = dequantize_rows(cache[:, used], scales[:, used], dtype)
    return blocks, renumber[block_tables.to(cache.device, torch.int64)]
