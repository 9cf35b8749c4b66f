"""BatchLayout: which rows of a step's flat batch go where, with every attention consumer's metadata.

A step's tokens form one flat batch of rows. The layout names four contiguous slices, always in
this order, so no consumer ever infers a row's role from its shape:

    gpu_prefill   prompt chunks whose KV lives in the GPU tier     (device attention, paged)
    gpu_decode    one-token decodes whose KV lives in the GPU tier (device attention, paged)
    host_prefill  whole prompts whose KV goes to the host tier      (device attention over the
                  chunk's own k/v; the host side writes their k/v into the host tier)
    host_decode   one-token decodes whose KV lives in the host tier (CPU attention, native pool)

Every part's tensors are small index tensors (block tables, lengths, slots); the Python tuples
beside them serve CPU-side decisions. A graphed decode step builds them as views of
preallocated, fixed-capacity buffers (runner/input_batch.py, StaticDecodeInputs), padded to its
bucket: padding GPU rows are part of gpu_decode (they attend a padding block no request owns),
padding host rows trail the layout (`padding_rows`: the hand-off copies them, no CPU job reads
them).

KV cache layout (both tiers, shared with the native CPU kernel):
    one tensor per tier  [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]
    layer l's K cache    kv[l, 0] -> [num_blocks, num_kv_heads, block_size, head_dim] (contiguous)
    token slot           block_id * block_size + offset_in_block
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.num_tokens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens, default=0)


@dataclass(frozen=True)
class HostPrefillBatch:
    """Whole prompts whose KV goes to the host tier: attention runs on the compute device over
    each prompt's own k/v (there is no earlier context), and their k/v go to host slots."""

    row_start: int
    num_tokens: int
    query_lens: tuple[int, ...]
    host_slot_mapping: torch.Tensor  # [num_tokens] int64 slots in the host tier (CPU tensor)

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.num_tokens)


@dataclass(frozen=True)
class BatchLayout:
    """One step's rows: gpu_prefill, gpu_decode, host_prefill, host_decode, in that order."""

    num_tokens: int
    gpu_prefill: PagedSeqBatch | None = None
    gpu_decode: PagedSeqBatch | None = None
    host_prefill: HostPrefillBatch | None = None
    host_decode: PagedSeqBatch | None = None  # tensors on the CPU (the native pool reads them)
    # Rows after every part that belong to no sequence: a graphed step's host rows padded to
    # its bucket (they follow host_decode, or gpu_decode when the step has no host rows).
    padding_rows: int = 0

    def __post_init__(self) -> None:
        row = 0
        for name in ("gpu_prefill", "gpu_decode", "host_prefill", "host_decode"):
            part = getattr(self, name)
            if part is None:
                continue
            if part.row_start != row:
                raise ValueError(f"{name} starts at row {part.row_start}, expected {row}: parts "
                                 "must follow gpu_prefill, gpu_decode, host_prefill, host_decode")
            row += part.num_tokens
        if row + self.padding_rows != self.num_tokens:
            raise ValueError(f"the parts cover {row} rows and {self.padding_rows} padding rows "
                             f"of {self.num_tokens}")
        if self.gpu_decode is not None and self.gpu_decode.max_query_len != 1:
            raise ValueError("gpu_decode rows must be one token per sequence")
        if self.host_decode is not None and self.host_decode.max_query_len != 1:
            raise ValueError("host_decode rows must be one token per sequence")

    @property
    def num_device_rows(self) -> int:
        """Rows whose attention the device computes: every row before host_decode."""
        return (self.num_tokens - self.padding_rows
                - (self.host_decode.num_tokens if self.host_decode else 0))

    @property
    def num_staged_rows(self) -> int:
        """Rows the host hand-off copies each layer: host_decode and the padding after it."""
        return (self.host_decode.num_tokens if self.host_decode else 0) + self.padding_rows

    def device_part(self) -> BatchLayout:
        """The rows before host_decode as a layout of their own (the pipeline's sub-batch A)."""
        return BatchLayout(self.num_device_rows, self.gpu_prefill, self.gpu_decode,
                           self.host_prefill)


def make_layout(gpu_prefill: PagedSeqBatch | None = None,
                gpu_decode: PagedSeqBatch | None = None,
                host_prefill: HostPrefillBatch | None = None,
                host_decode: PagedSeqBatch | None = None) -> BatchLayout:
    """A layout of the given parts (their row ranges must follow the layout's order)."""
    parts = (gpu_prefill, gpu_decode, host_prefill, host_decode)
    return BatchLayout(sum(p.num_tokens for p in parts if p is not None), *parts)


def paged_batch(row_start: int, block_tables: Sequence[Sequence[int]],
                num_cached: Sequence[int], query_lens: Sequence[int], block_size: int,
                device: torch.device | str) -> PagedSeqBatch:
    """Metadata for sequences given their block tables: sequence i has num_cached[i] tokens in
    the cache already and query_lens[i] new rows (positions num_cached[i] ... in order)."""
    seq_lens = tuple(c + n for c, n in zip(num_cached, query_lens))
    max_blocks = max((len(table) for table in block_tables), default=1)
    tables, slots, starts = [], [], [0]
    for seq_idx, (table, cached, seq_len) in enumerate(zip(block_tables, num_cached, seq_lens)):
        if len(table) * block_size < seq_len:
            raise ValueError(f"sequence {seq_idx} needs {seq_len} slots, has {len(table)} blocks")
        tables.append(list(table) + [0] * (max_blocks - len(table)))
        slots.extend(table[pos // block_size] * block_size + pos % block_size
                     for pos in range(cached, seq_len))
        starts.append(starts[-1] + seq_len - cached)
    return PagedSeqBatch(
        row_start=row_start, num_tokens=starts[-1], query_lens=tuple(query_lens),
        seq_lens=seq_lens,
        block_tables=torch.tensor(tables or [[0]], dtype=torch.int32, device=device)
        [:len(tables)],
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device))


def host_prefill_batch(row_start: int, block_tables: Sequence[Sequence[int]],
                       query_lens: Sequence[int], block_size: int) -> HostPrefillBatch:
    """Whole prompts prefilled on the device whose k/v go to the given host-tier blocks."""
    slots = [table[pos // block_size] * block_size + pos % block_size
             for table, query_len in zip(block_tables, query_lens) for pos in range(query_len)]
    return HostPrefillBatch(row_start=row_start, num_tokens=len(slots),
                            query_lens=tuple(query_lens),
                            host_slot_mapping=torch.tensor(slots, dtype=torch.int64))


def contiguous_block_ids(seq_index: int, max_blocks_per_seq: int) -> list[int]:
    """Blocks [seq_index * max_blocks_per_seq, ...): a trivial allocation for tests/benchmarks."""
    start = seq_index * max_blocks_per_seq
    return list(range(start, start + max_blocks_per_seq))
