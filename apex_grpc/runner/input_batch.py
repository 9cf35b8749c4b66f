"""StepPlan -> the flat token batch (ids, positions) and its AttentionMetadata.

Built from Python lists with one tensor creation per field: no per-row tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_grpc.attention.base import AttentionMetadata, HostPrefillBatch, PagedSeqBatch
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan


@dataclass(frozen=True)
class InputBatch:
    input_ids: torch.Tensor  # [num_tokens] int64 on the compute device
    positions: torch.Tensor  # [num_tokens] int64 on the compute device
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampling_seqs] int64: last row of each sampling sequence
    sample_request_ids: tuple[str, ...]


def _positions(seq: ScheduledSeq) -> range:
    return range(seq.num_computed_tokens, seq.seq_len)


def _slots(seqs: tuple[ScheduledSeq, ...], block_size: int) -> list[int]:
    slots: list[int] = []
    for seq in seqs:
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in _positions(seq))
    return slots


def make_paged_batch(seqs: tuple[ScheduledSeq, ...], row_start: int, block_size: int,
                     device: torch.device) -> PagedSeqBatch | None:
    if not seqs:
        return None
    query_lens = tuple(s.num_new_tokens for s in seqs)
    seq_lens = tuple(s.seq_len for s in seqs)
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = [list(s.block_table) + [0] * (max_blocks - len(s.block_table)) for s in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedSeqBatch(
        row_start=row_start,
        num_tokens=starts[-1],
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(_slots(seqs, block_size), dtype=torch.int64, device=device),
    )


def build_input_batch(plan: StepPlan, block_size: int, device: torch.device) -> InputBatch:
    seqs = plan.all_seqs
    ids = [t for s in seqs for t in s.token_ids]
    positions = [p for s in seqs for p in _positions(s)]
    num_gpu_rows = sum(s.num_new_tokens for s in plan.gpu_seqs)
    num_host_prefill_rows = sum(s.num_new_tokens for s in plan.host_prefill_seqs)
    host_prefill = None
    if plan.host_prefill_seqs:
        host_prefill = HostPrefillBatch(
            row_start=num_gpu_rows,
            num_tokens=num_host_prefill_rows,
            query_lens=tuple(s.num_new_tokens for s in plan.host_prefill_seqs),
            host_slot_mapping=torch.tensor(_slots(plan.host_prefill_seqs, block_size),
                                           dtype=torch.int64),
        )
    cpu = torch.device("cpu")
    meta = AttentionMetadata(
        num_tokens=len(ids),
        gpu=make_paged_batch(plan.gpu_seqs, 0, block_size, device),
        host_prefill=host_prefill,
        host_decode=make_paged_batch(plan.host_decode_seqs, num_gpu_rows + num_host_prefill_rows,
                                     block_size, cpu),
    )
    sample_rows, sample_ids = [], []
    row = 0
    for seq in seqs:
        row += seq.num_new_tokens
        if seq.samples:
            sample_rows.append(row - 1)
            sample_ids.append(seq.request_id)
    return InputBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=device),
        sample_request_ids=tuple(sample_ids),
    )
