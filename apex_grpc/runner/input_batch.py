"""StepPlan -> InputBatch: the flat token batch (ids, positions), its BatchLayout and sampling rows.

The one place that orders a step's rows: GPU-tier prefill chunks, GPU-tier decodes, host-bound
prefills, host-resident decodes (attention/layout.py). Built from Python lists with one tensor
creation per field: no per-row tensor work.

A decode-only step that runs as a CUDA graph (runner/decode_graphs.py) gets its batch as views
of StaticDecodeInputs instead: fixed-capacity buffers the graph was captured on, padded to the
step's bucket of (GPU rows, host rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_grpc.attention.layout import BatchLayout, PagedSeqBatch, host_prefill_batch, paged_batch
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan


@dataclass(frozen=True)
class InputBatch:
    input_ids: torch.Tensor  # [num_tokens] int64 on the compute device
    positions: torch.Tensor  # [num_tokens] int64 on the compute device
    layout: BatchLayout
    sample_rows: torch.Tensor  # [num_sampling_seqs] int64: last row of each sampling sequence
    sample_seqs: tuple[ScheduledSeq, ...]  # the sampling sequences, in row order

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens


def paged_batch_of(seqs: tuple[ScheduledSeq, ...], row_start: int, block_size: int,
                   device: torch.device) -> PagedSeqBatch | None:
    if not seqs:
        return None
    return paged_batch(row_start, [s.block_table for s in seqs],
                       [s.num_computed_tokens for s in seqs], [s.num_new_tokens for s in seqs],
                       block_size, device)


def build_input_batch(plan: StepPlan, block_size: int, device: torch.device) -> InputBatch:
    gpu_prefill = tuple(s for s in plan.gpu_seqs if not s.is_decode)
    gpu_decode = tuple(s for s in plan.gpu_seqs if s.is_decode)
    parts = (gpu_prefill, gpu_decode, plan.host_prefill_seqs, plan.host_decode_seqs)
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + sum(s.num_new_tokens for s in part))
    host_prefill = None
    if plan.host_prefill_seqs:
        host_prefill = host_prefill_batch(
            starts[2], [s.block_table for s in plan.host_prefill_seqs],
            [s.num_new_tokens for s in plan.host_prefill_seqs], block_size)
    layout = BatchLayout(
        num_tokens=starts[-1],
        gpu_prefill=paged_batch_of(gpu_prefill, starts[0], block_size, device),
        gpu_decode=paged_batch_of(gpu_decode, starts[1], block_size, device),
        host_prefill=host_prefill,
        # The native CPU pool reads the host decodes' metadata from host memory.
        host_decode=paged_batch_of(plan.host_decode_seqs, starts[3], block_size, torch.device("cpu")),
    )
    seqs = [s for part in parts for s in part]
    ids = [t for s in seqs for t in s.token_ids]
    positions = [p for s in seqs for p in range(s.num_computed_tokens, s.seq_len)]
    sample_rows, sample_seqs = [], []
    row = 0
    for seq in seqs:
        row += seq.num_new_tokens
        if seq.samples:
            sample_rows.append(row - 1)
            sample_seqs.append(seq)
    return InputBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        layout=layout,
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=device),
        sample_seqs=tuple(sample_seqs),
    )


class StaticDecodeInputs:
    """The fixed-capacity buffers a graphed decode step reads: ids and positions of every row
    (GPU rows, then host rows), and the GPU rows' block tables, lengths and slots.

    A padding GPU row decodes token 0 at position 0 with a context of one token in
    `padding_block`, a GPU-tier block the KV manager never hands out: its k/v land there and
    its attention reads only there. Padding host rows are copied to the CPU by the hand-off
    but attended by no job."""

    def __init__(self, max_gpu_rows: int, max_host_rows: int, max_blocks_per_seq: int,
                 padding_block: int, block_size: int, device: torch.device) -> None:
        rows = max_gpu_rows + max_host_rows
        self.max_gpu_rows, self.max_host_rows = max_gpu_rows, max_host_rows
        self.padding_block, self.block_size = padding_block, block_size
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_gpu_rows, max_blocks_per_seq), padding_block,
                                       dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_gpu_rows, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_gpu_rows,), padding_block * block_size,
                                       dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_gpu_rows + 1, dtype=torch.int32, device=device)

    def layout(self, gpu_rows: int, host_rows: int, gpu_seq_lens: tuple[int, ...],
               host_decode: PagedSeqBatch | None) -> BatchLayout:
        """The layout of a (gpu_rows, host_rows) bucket over these buffers. gpu_seq_lens: the
        GPU rows' context lengths as the attention launch sees them (a captured launch is
        sized for the longest context served); host_decode: the real host rows from row
        gpu_rows on (the rest of host_rows is padding)."""
        gpu_decode = None
        if gpu_rows:
            gpu_decode = PagedSeqBatch(
                row_start=0, num_tokens=gpu_rows, query_lens=(1,) * gpu_rows,
                seq_lens=gpu_seq_lens, block_tables=self.block_tables[:gpu_rows],
                seq_lens_tensor=self.seq_lens[:gpu_rows],
                query_start_loc=self.query_start_loc[:gpu_rows + 1],
                slot_mapping=self.slot_mapping[:gpu_rows])
        real_host_rows = host_decode.num_tokens if host_decode is not None else 0
        return BatchLayout(num_tokens=gpu_rows + host_rows, gpu_decode=gpu_decode,
                           host_decode=host_decode, padding_rows=host_rows - real_host_rows)

    def fill(self, plan: StepPlan, gpu_rows: int, host_rows: int) -> InputBatch:
        """A decode-only plan's batch, padded to the (gpu_rows, host_rows) bucket, as views of
        these buffers (one host-to-device copy per field)."""
        gpu, host = plan.gpu_seqs, plan.host_decode_seqs
        if plan.host_prefill_seqs or not all(s.is_decode for s in gpu + host):
            raise ValueError("only decode-only steps run over the static decode inputs")
        if len(gpu) > gpu_rows or len(host) > host_rows:
            raise ValueError(f"{len(gpu)} GPU and {len(host)} host rows exceed the bucket "
                             f"({gpu_rows}, {host_rows})")
        gpu_pad, host_pad = gpu_rows - len(gpu), host_rows - len(host)
        ids = ([s.token_ids[0] for s in gpu] + [0] * gpu_pad
               + [s.token_ids[0] for s in host] + [0] * host_pad)
        positions = ([s.num_computed_tokens for s in gpu] + [0] * gpu_pad
                     + [s.num_computed_tokens for s in host] + [0] * host_pad)
        rows = gpu_rows + host_rows
        self.input_ids[:rows].copy_(torch.tensor(ids, dtype=torch.int64))
        self.positions[:rows].copy_(torch.tensor(positions, dtype=torch.int64))
        seq_lens = tuple(s.seq_len for s in gpu) + (1,) * gpu_pad
        if gpu_rows:
            # Only the columns some row reads: later columns are never read past a length.
            width = max((len(s.block_table) for s in gpu), default=1)
            tables = [list(s.block_table) + [self.padding_block] * (width - len(s.block_table))
                      for s in gpu] + [[self.padding_block] * width] * gpu_pad
            size = self.block_size
            slots = [s.block_table[s.num_computed_tokens // size] * size
                     + s.num_computed_tokens % size for s in gpu]
            slots += [self.padding_block * size] * gpu_pad
            self.block_tables[:gpu_rows, :width].copy_(torch.tensor(tables, dtype=torch.int32))
            self.seq_lens[:gpu_rows].copy_(torch.tensor(seq_lens, dtype=torch.int32))
            self.slot_mapping[:gpu_rows].copy_(torch.tensor(slots, dtype=torch.int64))
        host_decode = paged_batch_of(host, gpu_rows, self.block_size, torch.device("cpu"))
        sample_rows = [i for i, s in enumerate(gpu) if s.samples]
        sample_rows += [gpu_rows + i for i, s in enumerate(host) if s.samples]
        return InputBatch(
            input_ids=self.input_ids[:rows], positions=self.positions[:rows],
            layout=self.layout(gpu_rows, host_rows, seq_lens, host_decode),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64,
                                     device=self.input_ids.device),
            sample_seqs=tuple(s for s in gpu + host if s.samples))
