"""Building blocks of the Llama-family decoder: linear layers, RMSNorm (also per q/k head),
rotary embedding, MLP.

Parameters are allocated uninitialised (torch.empty) directly on the target device and dtype:
loaders overwrite every one of them, and skipping the default init keeps large models cheap to
build. Fused layouts (q|k|v and gate|up stacked along the output dimension) halve the number of
matmuls per layer; the loaders copy each checkpoint tensor into its slice.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from apex_grpc.config import ConfigError


class Linear(nn.Module):
    """y = x W^T (+ b) with W [out_features, in_features], allocated without initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                               device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add.

    Normalisation runs in float32 whatever the weight dtype, like the reference implementation,
    so bf16/fp16 models do not lose precision in the variance.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op, not five: eager decoding is bound by how many ops Python launches.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual) where new_residual = x + residual (or x)."""
        if residual is not None:
            x = x + residual
        return self._normalize(x), x

    @staticmethod
    def normalize_heads_(qk: torch.Tensor, num_q_heads: int, q_norm: RMSNorm,
                         k_norm: RMSNorm) -> None:
        """Qwen3's per-head norms, in place: qk [n, num_q_heads + num_kv_heads, head_dim]
        holds the q heads then the k heads (any row stride); q_norm's weight [head_dim] scales
        every q head, k_norm's every k head. In place keeps q|k|v one buffer (see
        RotaryEmbedding.rotate_); one float32 normalisation serves both."""
        normed = F.rms_norm(qk.float(), (qk.shape[-1],), eps=q_norm.eps).to(qk.dtype)
        torch.mul(normed[:, :num_q_heads], q_norm.weight, out=qk[:, :num_q_heads])
        torch.mul(normed[:, num_q_heads:], k_norm.weight, out=qk[:, num_q_heads:])


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency remap: long wavelengths are slowed by `factor`, short ones kept, and
    the band between is interpolated smoothly (in wavelength units of the original context)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, rope_theta: float,
                  rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float64 for the given rope settings.

    Besides the HF rope types, rope_scaling may carry "frequency_factors" (head_dim // 2
    divisors, GGUF's rope_freqs tensor): llama.cpp implements Llama-3.1 scaling by dividing each
    frequency by its factor instead of storing the llama3 parameters."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type != "default":
        raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; supported: default, "
                          "linear, llama3")
    if scaling.get("frequency_factors") is not None:
        inv_freq = inv_freq / _frequency_factors(scaling["frequency_factors"], head_dim)
    return inv_freq


def _frequency_factors(values: Any, head_dim: int) -> torch.Tensor:
    factors = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if factors.numel() != head_dim // 2:
        raise ConfigError(f"rope frequency_factors has {factors.numel()} values; head_dim "
                          f"{head_dim} needs {head_dim // 2}")
    if not bool(torch.isfinite(factors).all()) or bool((factors <= 0).any()):
        raise ConfigError("rope frequency_factors must be finite and positive")
    return factors


class RopeAngles(NamedTuple):
    """cos and sin [n, 1, head_dim // 2] (float32) of a batch's positions: gathered once per
    forward pass and shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, rows: slice) -> RopeAngles:
        """The angles of a sub-batch's rows."""
        return RopeAngles(self.cos[rows], self.sin[rows])


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a cos/sin cache precomputed once for every position."""

    def __init__(self, head_dim: int, max_positions: int, rope_theta: float,
                 rope_scaling: dict[str, Any] | None, device: torch.device) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling)
        # Angles in float64 then stored as float32: large positions keep their precision.
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.max_positions = max_positions
        self.register_buffer("cos_cache", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin_cache", angles.sin().float().to(device), persistent=False)

    def angles(self, positions: torch.Tensor) -> RopeAngles:
        """positions [n] -> the cos/sin every layer's rotate_() takes."""
        return RopeAngles(self.cos_cache[positions].unsqueeze(1),
                          self.sin_cache[positions].unsqueeze(1))

    @staticmethod
    def rotate_(x: torch.Tensor, angles: RopeAngles) -> None:
        """Rotate x [n, heads, head_dim] (any heads: q and k rotate in one call; any row
        stride) in place, computed in float32. In place keeps q, k and v in the projection's
        one buffer (the hybrid hand-off copies a row of all three at once) and saves the
        launches of a concatenation and a cast."""
        # A float32 copy: the halves are read after x's first half is overwritten.
        x1, x2 = x.to(torch.float32, copy=True).chunk(2, dim=-1)
        cos, sin = angles
        half = x.shape[-1] // 2
        torch.sub(x1 * cos, x2 * sin, out=x[..., :half])
        torch.add(x2 * cos, x1 * sin, out=x[..., half:])


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)) with gate|up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, False, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
