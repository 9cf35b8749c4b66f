"""The "GPU" attention backend when the compute device is the CPU (no CUDA).

The GPU tier is then ordinary memory, so its decode rows go through the native paged kernel
(the fastest CPU attention here) and its prefill chunks through the torch reference; host-tier
parts are delegated to the torch reference (HybridAttention routes host decodes to the pool
before this backend sees them).
"""

from __future__ import annotations

import dataclasses

import torch

from apex_grpc.attention.base import AttentionMetadata
from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.gpu_backend import KernelSplitCache
from apex_grpc.attention.torch_ref import TorchPagedAttention, paged_attention_reference, write_kv


class NativeCpuPagedAttention:
    def __init__(self, gpu_kv: torch.Tensor, host_kv: torch.Tensor | None, scale: float,
                 pool: CpuAttentionPool, host_scales: torch.Tensor | None = None) -> None:
        if gpu_kv.device.type != "cpu":
            raise ValueError(f"NativeCpuPagedAttention needs a CPU KV cache, got {gpu_kv.device}")
        self.torch_backend = TorchPagedAttention(gpu_kv, host_kv, scale, host_scales)
        self.gpu_kv = gpu_kv
        self.scale = scale
        self.pool = pool
        self._splits = KernelSplitCache()

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(q)
        if meta.host_prefill is not None or meta.host_decode is not None:
            host_meta = dataclasses.replace(meta, gpu=None)
            self.torch_backend.forward(layer_idx, q, k, v, host_meta, out=out)
        batch = meta.gpu
        if batch is None or batch.num_tokens == 0:
            return out
        split = self._splits.split(batch)
        cache = self.gpu_kv[layer_idx]  # [2, num_blocks, num_kv_heads, block_size, head_dim]
        rows = slice(batch.row_start, batch.row_end)
        write_kv(cache, batch.slot_mapping, k[rows], v[rows])
        q_rows, out_rows = q[rows], out[rows]
        chunks, chunk_rows = split.num_chunks, split.chunk_rows
        if chunks > 0:
            out_rows[:chunk_rows] = paged_attention_reference(
                q_rows[:chunk_rows], cache[0], cache[1], batch.block_tables[:chunks],
                batch.seq_lens[:chunks], batch.query_lens[:chunks], self.scale)
        if chunks < batch.num_seqs:
            self.pool.decode(q_rows[chunk_rows:], cache[0], cache[1],
                             batch.block_tables[chunks:], batch.seq_lens_tensor[chunks:],
                             out=out_rows[chunk_rows:], scale=self.scale, check_values=False)
        return out

    def finish_step(self) -> None:
        """Nothing is deferred: every write above is done in place."""
