"""The GPU attention backend: the GPU tier's rows through the Triton paged kernels.

TritonPagedAttention implements AttentionBackend (attention/base.py) with the constructor of
TorchPagedAttention. Its `gpu` part stores k/v and attends in place over the paged GPU cache
(attention/triton_paged.py); host-bound prefills attend with fused SDPA on the device, their
k/v staged into pinned memory without blocking and written into the host tier at finish_step;
the host_decode part goes to a TorchPagedAttention it holds (the hybrid backend routes host decodes
to the native CPU pool before this is reached).
make_gpu_attention_backend() picks it on CUDA when triton imports, else the torch reference.

triton is imported only when a Triton backend is built, so that importing this module never
compiles or decorates kernels on a machine (or in a test session) that does not use them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from apex_grpc.attention.base import (AttentionBackend, AttentionMetadata, HostPrefillBatch,
                                      PagedSeqBatch)
from apex_grpc.attention.torch_ref import TorchPagedAttention, write_kv


@dataclasses.dataclass(frozen=True)
class KernelSplit:
    """How one PagedSeqBatch is cut between the two kernels: sequences before the trailing run
    of one-query sequences go through the prefill kernel, the run (decodes, and any one-token
    final chunk) through the decode kernel."""

    num_chunks: int  # sequences for the prefill kernel
    chunk_rows: int  # their rows, first in the batch
    max_chunk_len: int
    max_decode_seq_len: int

    @staticmethod
    def of(batch: PagedSeqBatch) -> KernelSplit:
        query_lens, seq_lens = batch.query_lens, batch.seq_lens
        if batch.block_tables.shape[0] != batch.num_seqs or len(seq_lens) != batch.num_seqs:
            raise ValueError(f"batch has {batch.num_seqs} query_lens, {len(seq_lens)} seq_lens "
                             f"and {batch.block_tables.shape[0]} block tables")
        if batch.num_seqs and (min(query_lens) < 1 or any(map(int.__gt__, query_lens, seq_lens))):
            raise ValueError(f"every query_len must be in 1..seq_len; got query_lens "
                             f"{query_lens} for seq_lens {seq_lens}")
        num_chunks = batch.num_seqs
        while num_chunks > 0 and query_lens[num_chunks - 1] == 1:
            num_chunks -= 1
        return KernelSplit(num_chunks=num_chunks, chunk_rows=sum(query_lens[:num_chunks]),
                           max_chunk_len=max(query_lens[:num_chunks], default=0),
                           max_decode_seq_len=max(seq_lens[num_chunks:], default=0))


class KernelSplitCache:
    """Every layer of a step passes the same batch object: check and cut it once per step."""

    def __init__(self) -> None:
        self._batch: PagedSeqBatch | None = None
        self._split = KernelSplit(0, 0, 0, 0)

    def split(self, batch: PagedSeqBatch) -> KernelSplit:
        if batch is not self._batch:
            self._split = KernelSplit.of(batch)
            self._batch = batch
        return self._split


@dataclasses.dataclass
class _PendingHostWrites:
    batch: HostPrefillBatch  # the step's host prefills (its slot mapping is where rows go)
    staged: torch.Tensor  # pinned [num_layers, 2, rows, num_kv_heads, head_dim]
    layers: list[int]  # the layers staged so far
    copied: torch.cuda.Event  # recorded after the latest copy


class TritonPagedAttention:
    """AttentionBackend: GPU-tier rows through Triton, host-tier parts through torch."""

    def __init__(self, gpu_kv: torch.Tensor, host_kv: torch.Tensor | None,
                 scale: float, host_scales: torch.Tensor | None = None) -> None:
        # Checks the [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] layout.
        self.host_backend = TorchPagedAttention(gpu_kv, host_kv, scale, host_scales)
        from apex_grpc.attention import triton_paged

        if gpu_kv.device.type != "cuda" and not triton_paged.INTERPRETED:
            raise ValueError(f"the Triton backend needs a CUDA KV cache, got {gpu_kv.device} "
                             "(TRITON_INTERPRET=1 runs it on the CPU for tests)")
        self.kernels = triton_paged
        self.gpu_kv = gpu_kv
        self.host_kv = host_kv
        self.scale = scale
        self._splits = KernelSplitCache()
        # Host-bound prefills' k/v on their way to a host tier in other memory: copied without
        # blocking into one pinned buffer per step, written into the tier by finish_step. A
        # blocking copy per layer would stall the launching thread until the device caught up,
        # once per layer.
        self._host_writes: _PendingHostWrites | None = None

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"q has {q.shape[0]} rows, metadata says {meta.num_tokens}")
        if out is None:
            out = torch.empty_like(q)
        if meta.host_decode is not None:
            # The torch backend fills the host decode rows; the other rows are filled below.
            self.host_backend.forward(
                layer_idx, q, k, v, dataclasses.replace(meta, gpu=None, host_prefill=None),
                out=out)
        if meta.host_prefill is not None:
            self._host_prefill(layer_idx, meta.host_prefill, q, k, v, out)
        batch = meta.gpu
        if batch is not None and batch.num_tokens > 0:
            split = self._splits.split(batch)
            rows = slice(batch.row_start, batch.row_end)
            layer = self.gpu_kv[layer_idx]  # [2, num_blocks, num_kv_heads, block_size, head_dim]
            self.kernels.store_kv(layer[0], layer[1], batch.slot_mapping, k[rows], v[rows])
            self._attend(q[rows], layer[0], layer[1], batch, split, out[rows])
        return out

    def _host_prefill(self, layer_idx: int, batch: HostPrefillBatch, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Prefills bound for the host tier: causal attention over each chunk's own k/v (they
        have no earlier context) with fused SDPA on the device, k/v written to host slots."""
        rows = slice(batch.row_start, batch.row_start + batch.num_tokens)
        if self.host_kv.device == k.device:
            write_kv(self.host_kv[layer_idx], batch.host_slot_mapping, k[rows], v[rows],
                     self.host_backend._host_scales(layer_idx))
        else:
            self._stage_host_write(layer_idx, batch, k[rows], v[rows])
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

    def _stage_host_write(self, layer_idx: int, batch: HostPrefillBatch, k: torch.Tensor,
                          v: torch.Tensor) -> None:
        pending = self._host_writes
        if pending is None or pending.batch is not batch:  # the step's first host-prefill layer
            self.finish_step()  # (normally done: the runner finishes every step)
            staged = torch.empty((self.host_kv.shape[0], 2, *k.shape), dtype=k.dtype,
                                 pin_memory=True)
            pending = self._host_writes = _PendingHostWrites(batch, staged, [],
                                                             torch.cuda.Event())
        pending.staged[layer_idx, 0].copy_(k, non_blocking=True)
        pending.staged[layer_idx, 1].copy_(v, non_blocking=True)
        pending.layers.append(layer_idx)
        pending.copied.record()

    def finish_step(self) -> None:
        """Write the step's staged host-prefill k/v into the host tier, once the copies have
        landed (by the end of a step the device has usually finished them already)."""
        pending, self._host_writes = self._host_writes, None
        if pending is None:
            return
        pending.copied.synchronize()
        for layer in pending.layers:
            write_kv(self.host_kv[layer], pending.batch.host_slot_mapping,
                     pending.staged[layer, 0], pending.staged[layer, 1],
                     self.host_backend._host_scales(layer))

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                batch: PagedSeqBatch, split: KernelSplit, out: torch.Tensor) -> None:
        """Attention of batch's rows q [batch.num_tokens, num_heads, head_dim] (their k/v
        already stored) into out, same shape."""
        num_chunks, chunk_rows = split.num_chunks, split.chunk_rows
        if num_chunks > 0:
            self.kernels.paged_prefill_attention(
                q[:chunk_rows], k_cache, v_cache, batch.block_tables[:num_chunks],
                batch.seq_lens_tensor[:num_chunks], batch.query_start_loc[:num_chunks + 1],
                split.max_chunk_len, self.scale, out=out[:chunk_rows])
        if num_chunks < batch.num_seqs:
            self.kernels.paged_decode_attention(
                q[chunk_rows:], k_cache, v_cache, batch.block_tables[num_chunks:],
                batch.seq_lens_tensor[num_chunks:], split.max_decode_seq_len,
                self.scale, out=out[chunk_rows:])


def make_gpu_attention_backend(gpu_kv: torch.Tensor, host_kv: torch.Tensor | None,
                               scale: float,
                               host_scales: torch.Tensor | None = None) -> AttentionBackend:
    """TritonPagedAttention for a CUDA KV cache when triton imports, else TorchPagedAttention."""
    if gpu_kv.device.type == "cuda":
        try:
            import triton  # noqa: F401  (only asks whether it is installed)
        except ImportError:
            return TorchPagedAttention(gpu_kv, host_kv, scale, host_scales)
        return TritonPagedAttention(gpu_kv, host_kv, scale, host_scales)
    return TorchPagedAttention(gpu_kv, host_kv, scale, host_scales)
