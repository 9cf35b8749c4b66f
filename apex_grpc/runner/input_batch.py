"""StepPlan -> InputBatch: the flat token batch (ids, positions), its BatchLayout and sampling rows.

The one place that orders a step's rows: GPU-tier prefill chunks, GPU-tier decodes, host-bound
prefills, host-resident decodes (attention/layout.py). Built from Python lists with one tensor
creation per field: no per-row tensor work.
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
