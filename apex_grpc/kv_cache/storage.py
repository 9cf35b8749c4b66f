"""The KV cache tensors of both tiers and the whole-request copies between them.

Layout (see apex_grpc/attention/base.py): [num_layers, 2, num_blocks, num_kv_heads, block_size,
head_dim] per tier. The host tier is pinned when a GPU copies into it.
"""

from __future__ import annotations

import torch

from apex_grpc.config import ModelConfig
from apex_grpc.kv_cache.manager import KVMove
from apex_grpc.platform import Event, Stream, pinned_empty
from apex_grpc.request import Tier

# Blocks per gather in a whole-request move (bounds the temporary: 2 MiB a block for 8B).
_MOVE_CHUNK_BLOCKS = 32


def kv_shape(model: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (model.num_hidden_layers, 2, num_blocks, model.num_key_value_heads, block_size,
            model.head_dim)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return model.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size


class KVStorage:
    def __init__(self, model: ModelConfig, block_size: int, num_gpu_blocks: int,
                 num_host_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.gpu = torch.zeros(kv_shape(model, num_gpu_blocks, block_size), dtype=dtype,
                               device=device)
        self.host = pinned_empty(kv_shape(model, num_host_blocks, block_size), dtype, device)
        self.host.zero_()
        self.copy_stream = Stream(device)

    def tier_tensor(self, tier: Tier) -> torch.Tensor:
        return self.gpu if tier == Tier.GPU else self.host

    def apply_moves(self, moves: tuple[KVMove, ...]) -> Event | None:
        """Copy each move's blocks (all layers, K and V) on the copy stream, in chunks so the
        gathered temporary stays small while GPU memory is short.

        Copies into the host tier finish before this returns (the CPU-side scatter needs the
        data); copies to the GPU are queued. Returns an event the compute stream must wait on
        before the forward pass (freed source blocks may be reused by this step), or None when
        there was nothing to copy.
        """
        if not moves:
            return None
        self.copy_stream.wait_current()
        with self.copy_stream.use():
            for move in moves:
                src = self.tier_tensor(move.src_tier)
                dst = self.tier_tensor(move.dst_tier)
                for start in range(0, len(move.src_blocks), _MOVE_CHUNK_BLOCKS):
                    end = start + _MOVE_CHUNK_BLOCKS
                    src_idx = torch.tensor(move.src_blocks[start:end], dtype=torch.long,
                                           device=src.device)
                    dst_idx = torch.tensor(move.dst_blocks[start:end], dtype=torch.long,
                                           device=dst.device)
                    # [layers, 2, n, kv_heads, block_size, head_dim] gathered, then scattered.
                    blocks = src.index_select(2, src_idx).to(
                        dst.device, non_blocking=dst.device.type == "cuda")
                    dst.index_copy_(2, dst_idx, blocks)
        done = Event(self.device)
        done.record(self.copy_stream)
        return done
