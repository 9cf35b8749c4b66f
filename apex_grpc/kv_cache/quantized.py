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

import enum

import torch

__all__ = [
    "HostKVDtype",
    "dequantize_rows",
    "host_kv_element_bytes",
    "quantize_rows",
    "resolve_host_kv_dtype",
]

QMAX = 127.0


class HostKVDtype(str, enum.Enum):
    AUTO = "auto"  # the model's dtype: the host tier is a plain copy of GPU blocks (default)
    INT8 = "int8"  # 8-bit rows with a float32 scale per token and kv head


def resolve_host_kv_dtype(name: str | HostKVDtype, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the host tier's elements for a --host-kv-dtype value; ValueError
    names the field for anything else."""
    try:
        choice = HostKVDtype(name)
    except ValueError:
        choices = ", ".join(member.value for member in HostKVDtype)
        raise ValueError(f"host_kv_dtype must be one of {choices}, got {name!r}") from None
    return torch.int8 if choice == HostKVDtype.INT8 else model_dtype


def host_kv_element_bytes(host_dtype: torch.dtype, head_dim: int) -> float:
    """Bytes per KV element in the host tier, the int8 tier's scale included."""
    if host_dtype == torch.int8:
        return 1.0 + 4.0 / head_dim
    return float(torch.empty((), dtype=host_dtype).element_size())


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., head_dim] (any float dtype) -> (int8 [..., head_dim], scales [...] float32).
    Computed in float32: scale = amax / 127, q = round_half_even(x / scale); all-zero rows get
    scale 0 and zeros."""
    values = rows.float()
    scales = values.abs().amax(dim=-1) / QMAX
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = torch.round(values / divisor.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return quantized.to(torch.int8), scales


def dequantize_rows(quantized: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., head_dim] and scales [...] -> rows [..., head_dim] of dtype."""
    return (quantized.float() * scales.unsqueeze(-1)).to(dtype)
