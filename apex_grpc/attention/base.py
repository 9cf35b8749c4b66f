"""The seam between the model and attention: per-batch metadata and the backend protocol.

The model computes q/k/v and hands them to `AttentionBackend.forward` together with an
`AttentionMetadata` built by the runner for this forward pass; the backend stores the new k/v in
the KV cache and returns the attention output. Nothing is global: every call carries its metadata.

KV cache layout (both tiers, shared with the native CPU kernel):
    one tensor per tier  [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]
    layer l's K cache    kv[l, 0] -> [num_blocks, num_kv_heads, block_size, head_dim] (contiguous)
    token slot           block_id * block_size + offset_in_block

Row order of a batch: GPU-tier sequences first (prefills, then decodes), then prefills bound for
the host tier, then host-resident decode rows (one token each) at the tail, so each part is one
contiguous slice of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class PagedSeqBatch:
    """Sequences whose attention reads one tier's paged KV cache.

    Rows [row_start, row_start + num_tokens) of the q/k/v tensors belong to these sequences, in
    order; sequence i owns query_lens[i] consecutive rows.
    """

    row_start: int
    num_tokens: int
    query_lens: tuple[int, ...]  # new tokens per sequence this pass
    seq_lens: tuple[int, ...]  # context length per sequence including the new tokens
    # Tensors live on the device that computes this batch's attention.
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    seq_lens_tensor: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, relative to row_start
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot receiving each row's k/v

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def row_end(self) -> int:
        return self.row_start + self.num_tokens

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)


@dataclass(frozen=True)
class HostPrefillBatch:
    """Prefills whose KV goes to the host tier: attention runs on the GPU over the chunk's own
    k/v (they have no earlier context), and k/v are streamed to host slots layer by layer."""

    row_start: int
    num_tokens: int
    query_lens: tuple[int, ...]
    host_slot_mapping: torch.Tensor  # [num_tokens] int64 slots in the host tier (CPU tensor)


@dataclass(frozen=True)
class AttentionMetadata:
    num_tokens: int
    gpu: PagedSeqBatch | None  # attention on the GPU over the GPU tier
    host_prefill: HostPrefillBatch | None  # attention on the GPU, KV written to the host tier
    host_decode: PagedSeqBatch | None  # attention on the CPU over the host tier (tail rows)


class AttentionBackend(Protocol):
    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,  # written in place when given
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store this pass's k/v in the KV cache and return attention for every row the
        metadata names (rows it does not name are left as they were in out)."""
        ...

    def finish_step(self) -> None:
        """Complete what forward deferred within the step (host-tier KV writes): called once
        per step after its last layer, also after a failed one."""
        ...
