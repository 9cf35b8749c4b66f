"""Pure-torch float64 reference for paged decode attention and random paged inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedCase:
    q: torch.Tensor  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32

    def out_and_lse(self, fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs poisoned with NaN, so an element the kernel never writes fails the test."""
        out = torch.full_like(self.q, fill)
        lse = torch.full(self.q.shape[:2], fill, dtype=torch.float32)
        return out, lse


def make_case(
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedCase:
    """Random KV scattered over a shuffled block pool; unused table entries are padding."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq) + 1
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = order[start : start + count]
        start += count
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(dtype)
    return PagedCase(q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32))


def reference_decode(
    case: PagedCase, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in float64, gathering each sequence's context through its block table."""
    num_seqs, num_heads, head_dim = case.q.shape
    _, num_kv_heads, block_size, _ = case.k_cache.shape
    group_size = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    outs, lses = [], []
    for seq in range(num_seqs):
        seq_len = int(case.seq_lens[seq])
        blocks = case.block_tables[seq, : math.ceil(seq_len / block_size)].long()

        def gather(cache: torch.Tensor) -> torch.Tensor:  # [num_heads, seq_len, head_dim]
            rows = cache[blocks].permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
            return rows[:, :seq_len].double().repeat_interleave(group_size, dim=0)

        scores = torch.einsum("hd,hld->hl", case.q[seq].double(), gather(case.k_cache)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - lse[:, None])
        outs.append(torch.einsum("hl,hld->hd", weights, gather(case.v_cache)))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close_to_reference(
    out: torch.Tensor, lse: torch.Tensor, case: PagedCase, scale: float | None = None
) -> None:
    expected_out, expected_lse = reference_decode(case, scale)
    assert not torch.isnan(out).any(), "some output element was never written"
    assert not torch.isnan(lse).any(), "some lse element was never written"
    relative = (out.double() - expected_out).norm() / expected_out.norm()
    assert relative < TOLERANCE[case.q.dtype], f"relative error {relative:.3e} for {case.q.dtype}"
    lse_error = (lse.double() - expected_lse).abs().max()
    assert lse_error < 1e-4, f"lse error {lse_error:.3e}"
