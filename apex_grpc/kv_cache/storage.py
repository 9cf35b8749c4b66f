"""The KV cache tensors of both tiers and the whole-request copies between them.

Layout (see apex_grpc/attention/base.py): [num_layers, 2, num_blocks, num_kv_heads, block_size,
head_dim] per tier. The host tier is pinned when a GPU copies into it. An int8 host tier
(--host-kv-dtype int8) keeps host_scales [num_layers, 2, num_blocks, num_kv_heads, block_size]
float32 beside it (kv_cache/quantized.py): moves to the host quantize, restores dequantize.
The GPU tier holds one block more than the KV manager hands out: `padding_block`, where the
padding rows of a graphed decode step write and read (runner/input_batch.py).
"""

from __future__ import annotations

import torch

from apex_grpc.config import ModelConfig
from apex_grpc.kv_cache.manager import KVMove
from apex_grpc.kv_cache.quantized import dequantize_rows, host_kv_element_bytes, quantize_rows
from apex_grpc.platform import Event, Stream, host_kv_zeros
from apex_grpc.request import Tier



def block_runs(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) runs where both block lists count up together, so each
    run is one contiguous copy per layer and K/V."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def kv_shape(model: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (model.num_hidden_layers, 2, num_blocks, model.num_key_value_heads, block_size,
            model.head_dim)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return model.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size


def host_bytes_per_block(model: ModelConfig, block_size: int, host_dtype: torch.dtype) -> int:
    """A host-tier block's bytes, an int8 tier's scales included."""
    element = host_kv_element_bytes(host_dtype, model.head_dim)
    return round(model.kv_bytes_per_token(1) * element) * block_size


class KVStorage:
    def __init__(self, model: ModelConfig, block_size: int, num_gpu_blocks: int,
                 num_host_blocks: int, dtype: torch.dtype, device: torch.device,
                 host_dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.padding_block = num_gpu_blocks  # past every block the KV manager owns
        self.gpu = torch.zeros(kv_shape(model, num_gpu_blocks + 1, block_size), dtype=dtype,
                               device=device)
        host_shape = kv_shape(model, num_host_blocks, block_size)
        self.host = host_kv_zeros(host_shape, host_dtype or dtype, device)
        # int8 host tier: [num_layers, 2, num_blocks, num_kv_heads, block_size] float32.
        self.host_scales: torch.Tensor | None = None
        if self.host.dtype == torch.int8:
            self.host_scales = host_kv_zeros(host_shape[:-1], torch.float32, device)
        self.copy_stream = Stream(device)

    def tier_tensor(self, tier: Tier) -> torch.Tensor:
        return self.gpu if tier == Tier.GPU else self.host

    def apply_moves(self, moves: tuple[KVMove, ...]) -> Event | None:
        """Copy each move's blocks (all layers, K and V) on the copy stream: one contiguous
        copy per layer, K/V and run of consecutive blocks, straight between the tier tensors
        (the host tier is pinned, so on CUDA every copy is asynchronous and needs no temporary).

        The copy stream is the one the hybrid attention stages host rows on, so CPU jobs of this
        step see evicted KV in place. Returns an event the compute stream must wait on before
        the forward pass (freed GPU blocks may be rewritten by this step), or None. Restores
        free host blocks that this step's CPU-side writes may reuse, so they finish before this
        returns.
        """
        if not moves:
            return None
        self.copy_stream.wait_current()
        num_layers = self.gpu.shape[0]
        with self.copy_stream.use():
            for move in moves:
                src = self.tier_tensor(move.src_tier)
                dst = self.tier_tensor(move.dst_tier)
                for src_start, dst_start, length in block_runs(move.src_blocks, move.dst_blocks):
                    runs = (slice(src_start, src_start + length),
                            slice(dst_start, dst_start + length))
                    if self.host_scales is None:
                        for layer in range(num_layers):
                            for kv in range(2):
                                dst[layer, kv, runs[1]].copy_(src[layer, kv, runs[0]],
                                                              non_blocking=True)
                    else:
                        self._convert_run(move.dst_tier, *runs)
        done = Event(self.device)
        done.record(self.copy_stream)
        if any(move.dst_tier == Tier.GPU for move in moves):
            done.wait_host()
        return done

    def _convert_run(self, dst_tier: Tier, src: slice, dst: slice) -> None:
        """One run of blocks between the GPU tier and an int8 host tier, all layers at once:
        quantized where the rows are (on the device, into the pinned tier) or copied up and
        dequantized on the device."""
        if dst_tier == Tier.HOST:
            quantized, scales = quantize_rows(self.gpu[:, :, src])
            self.host[:, :, dst].copy_(quantized, non_blocking=True)
            self.host_scales[:, :, dst].copy_(scales, non_blocking=True)
        else:
            quantized = self.host[:, :, src].to(self.device, non_blocking=True)
            scales = self.host_scales[:, :, src].to(self.device, non_blocking=True)
            self.gpu[:, :, dst] = dequantize_rows(quantized, scales, self.gpu.dtype)
