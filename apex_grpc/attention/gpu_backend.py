"""The GPU attention backend: the device's rows through the Triton paged kernels.

TritonPagedAttention is the DeviceAttention (attention/base.py) for a CUDA KV cache: gpu_prefill
rows through the paged prefill kernel, gpu_decode rows through the paged decode kernel (both
after storing their k/v in place, attention/triton_paged.py), host-bound prefill rows through
fused SDPA over their own k/v. make_device_attention() picks the backend for a KV cache.

triton is imported only when a Triton backend is built, so that importing this module never
compiles or decorates kernels on a machine (or in a test session) that does not use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apex_grpc.attention.base import DeviceAttention
from apex_grpc.attention.cpu_device import NativeCpuPagedAttention
from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.layout import BatchLayout, HostPrefillBatch
from apex_grpc.attention.torch_ref import TorchPagedAttention


class TritonPagedAttention:
    """DeviceAttention over a CUDA KV cache through the Triton kernels."""

    def __init__(self, gpu_kv: torch.Tensor, scale: float) -> None:
        from apex_grpc.attention import triton_paged

        if gpu_kv.dim() != 6:
            raise ValueError("the KV cache must be [num_layers, 2, num_blocks, num_kv_heads, "
                             "block_size, head_dim]")
        if gpu_kv.device.type != "cuda" and not triton_paged.INTERPRETED:
            raise ValueError(f"the Triton backend needs a CUDA KV cache, got {gpu_kv.device} "
                             "(TRITON_INTERPRET=1 runs it on the CPU for tests)")
        self.kernels = triton_paged
        self.gpu_kv = gpu_kv
        self.scale = scale

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layout: BatchLayout, out: torch.Tensor) -> None:
        layer = self.gpu_kv[layer_idx]  # [2, num_blocks, num_kv_heads, block_size, head_dim]
        k_cache, v_cache = layer[0], layer[1]
        for batch in (layout.gpu_prefill, layout.gpu_decode):
            if batch is not None:
                rows = batch.rows
                self.kernels.store_kv(k_cache, v_cache, batch.slot_mapping, k[rows], v[rows])
        prefill = layout.gpu_prefill
        if prefill is not None:
            self.kernels.paged_prefill_attention(
                q[prefill.rows], k_cache, v_cache, prefill.block_tables,
                prefill.seq_lens_tensor, prefill.query_start_loc, prefill.max_query_len,
                self.scale, out=out[prefill.rows])
        decode = layout.gpu_decode
        if decode is not None:
            self.kernels.paged_decode_attention(
                q[decode.rows], k_cache, v_cache, decode.block_tables, decode.seq_lens_tensor,
                decode.max_seq_len, self.scale, out=out[decode.rows])
        if layout.host_prefill is not None:
            self._attend_own_context(layout.host_prefill, q, k, v, out)

    def _attend_own_context(self, batch: HostPrefillBatch, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, out: torch.Tensor) -> None:
        """Host-bound prompts: causal attention over each prompt's own k/v (no earlier
        context) with fused SDPA on the device."""
        group = q.shape[1] // k.shape[1]
        row = batch.row_start
        for query_len in batch.query_lens:
            seq = slice(row, row + query_len)
            # [heads, query_len, head_dim]; kv heads repeated for their query-head groups.
            seq_q = q[seq].transpose(0, 1)
            seq_k = k[seq].transpose(0, 1).repeat_interleave(group, dim=0)
            seq_v = v[seq].transpose(0, 1).repeat_interleave(group, dim=0)
            attn = F.scaled_dot_product_attention(seq_q, seq_k, seq_v, is_causal=True,
                                                  scale=self.scale)
            out[seq] = attn.transpose(0, 1)
            row += query_len


def make_device_attention(gpu_kv: torch.Tensor, scale: float,
                          pool: CpuAttentionPool) -> DeviceAttention:
    """The device's attention: the native kernel when the device is the CPU, Triton on CUDA
    when triton imports, else the torch reference."""
    if gpu_kv.device.type == "cpu":
        return NativeCpuPagedAttention(gpu_kv, scale, pool)
    try:
        import triton  # noqa: F401  (only asks whether it is installed)
    except ImportError:
        return TorchPagedAttention(gpu_kv, scale)
    return TritonPagedAttention(gpu_kv, scale)
