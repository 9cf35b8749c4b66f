"""The device attention when the compute device is the CPU (no CUDA).

The GPU tier is then ordinary memory, so its decode rows go through the native paged kernel
(the fastest CPU attention here) and its prefill chunks, like host-bound prompts, through the
torch reference.
"""

from __future__ import annotations

import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.layout import BatchLayout
from apex_grpc.attention.torch_ref import attend_own_context, attend_paged, write_kv


class NativeCpuPagedAttention:
    """DeviceAttention over a CPU-resident "GPU tier"."""

    def __init__(self, gpu_kv: torch.Tensor, scale: float, pool: CpuAttentionPool) -> None:
        if gpu_kv.device.type != "cpu":
            raise ValueError(f"NativeCpuPagedAttention needs a CPU KV cache, got {gpu_kv.device}")
        self.gpu_kv = gpu_kv
        self.scale = scale
        self.pool = pool

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layout: BatchLayout, out: torch.Tensor) -> None:
        cache = self.gpu_kv[layer_idx]  # [2, num_blocks, num_kv_heads, block_size, head_dim]
        if layout.gpu_prefill is not None:
            attend_paged(cache, layout.gpu_prefill, q, k, v, self.scale, out)
        decode = layout.gpu_decode
        if decode is not None:
            rows = decode.rows
            write_kv(cache, decode.slot_mapping, k[rows], v[rows])
            self.pool.decode(q[rows], cache[0], cache[1], decode.block_tables,
                             decode.seq_lens_tensor, out=out[rows], scale=self.scale,
                             check_values=False)
        if layout.host_prefill is not None:
            attend_own_context(q, k, v, layout.host_prefill, self.scale, out)
