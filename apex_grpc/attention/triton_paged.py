"""Triton kernels over the paged KV cache, read in place, and their launch wrappers.

Owns the kernels and the code that sizes and launches them:
- store_kv: writes this pass's k/v rows into their cache slots (one program per (row, kv head)).
- paged_decode_attention: one query per sequence. One program per (sequence, kv head, split)
  handles the whole GQA group of q heads, so every K/V tile is loaded once per group. When the
  (sequence, kv head) grid leaves SMs idle (small batches), each context is cut into splits
  (split-KV, flash-decoding) whose partial outputs a second kernel merges exactly by their
  log-sum-exp; a large batch takes the single-pass kernel. Each sequence divides its own
  length among the splits on the device, so the launch depends only on (num_seqs, num_splits),
  not on the step's context lengths (a CUDA graph can replay it as the contexts grow).
- paged_prefill_attention: a chunk of queries per sequence attending causally over the
  sequence's whole paged context (earlier chunks included). Rows of a tile are
  (query, head-in-group) pairs, again so each K/V tile serves the whole group.

Every kernel finds a key's slot through the block table (page = table[key // block_size]); the
cache is never gathered. Softmax runs in fp32 in the log2 domain (exp2 with scale * log2(e)).

Cache views: k_cache / v_cache are one layer's [num_blocks, num_kv_heads, block_size, head_dim]
(kv[layer, 0] and kv[layer, 1] of the layout in attention/base.py); head_dim must be contiguous.

TRITON_INTERPRET=1 (set before this module is imported) runs the kernels on CPU tensors. The
interpreter multiplies bf16 operands of tl.dot as raw integers, so under it bf16 tiles are
widened to fp32 before each dot (after the same rounding a GPU would apply to p).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Decided when the kernels below are decorated, exactly as triton.jit decides it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

_LOG2_E = 1.4426950408889634
_DECODE_BLOCK_N = 64  # keys per decode tile
_PREFILL_BLOCK_M = 64  # (query, head) rows per prefill tile
_PREFILL_BLOCK_N = 64  # keys per prefill tile
# Keys per split at least: two tiles, so a program overlaps one tile's loads with the other's
# math; shorter splits add partial writes and merge work for no more parallelism.
_MIN_SPLIT_LEN = 2 * _DECODE_BLOCK_N
_MAX_SPLITS = 64
_MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b with an fp32 result; FP32_DOT forces exact fp32 products (fp32 caches, and bf16
    under the interpreter); otherwise the tensor cores take a and b in their own dtype."""
    if FP32_DOT:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, key_idx, key_mask, head_offset,
                  dims, dim_mask, stride_cache_block, stride_cache_token,
                  BLOCK_SIZE: tl.constexpr):
    """K and V rows of the given keys, [BLOCK_N, HEAD_DIM_PAD] each, zero where masked."""
    pages = tl.load(table_row_ptr + key_idx // BLOCK_SIZE, mask=key_mask, other=0)
    # int64: a large cache overflows int32 offsets.
    row_offsets = (pages.to(tl.int64) * stride_cache_block + head_offset
                   + (key_idx % BLOCK_SIZE) * stride_cache_token)
    offsets = row_offsets[:, None] + dims[None, :]
    mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale, FP32_DOT: tl.constexpr):
    """Fold one key tile into the running (max, sum, accumulator) of each row. Every caller's
    first tile holds at least one allowed key per row, so m_i is finite from then on and no
    row ever computes exp2(-inf - -inf)."""
    scores = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # [M, BLOCK_N], log2 domain
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
    return m_new, l_i, acc


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                     stride_cache_block, stride_cache_head, stride_cache_token,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = dims < HEAD_DIM
    # A negative slot marks a padding row: nothing is stored for it.
    if slot >= 0:
        k = tl.load(k_ptr + token * stride_k_token + head * stride_k_head + dims, mask=mask)
        v = tl.load(v_ptr + token * stride_v_token + head * stride_v_head + dims, mask=mask)
        dst = ((slot // BLOCK_SIZE) * stride_cache_block + head * stride_cache_head
               + (slot % BLOCK_SIZE) * stride_cache_token + dims)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                         out_ptr, partial_out_ptr, partial_lse_ptr, qk_scale,
                         stride_q_token, stride_q_head, stride_out_token, stride_out_head,
                         stride_cache_block, stride_cache_head, stride_cache_token,
                         stride_table_seq,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         WRITE_PARTIAL: tl.constexpr, FP32_DOT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + seq)

    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    row_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [GROUP_PAD, D_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    # This sequence's own split length, in whole tiles; trailing splits of a short sequence
    # start past its end and see no keys.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    key_start = split * split_len
    key_end = tl.minimum(key_start + split_len, seq_len)
    table_row_ptr = block_tables_ptr + seq * stride_table_seq
    for start in range(key_start, key_end, BLOCK_N):
        key_idx = start + tl.arange(0, BLOCK_N)
        key_mask = key_idx < key_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, key_idx, key_mask,
                             kv_head * stride_cache_head, dims, dim_mask, stride_cache_block,
                             stride_cache_token, BLOCK_SIZE)
        m_i, l_i, acc = _online_softmax_step(q, k, v, key_mask[None, :], m_i, l_i, acc,
                                             qk_scale, FP32_DOT)

    # A split past the end of a short sequence saw no keys: l_i == 0, its lse is -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if WRITE_PARTIAL:
        part = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], out,
                 mask=row_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(partial_lse_ptr + part, lse, mask=row_mask)
    else:
        tl.store(out_ptr + seq * stride_out_token + heads[:, None] * stride_out_head
                 + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, num_splits,
                         stride_out_token, stride_out_head,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    part = (seq * num_heads + head) * num_splits + splits  # [SPLITS_PAD]
    lse = tl.load(partial_lse_ptr + part, mask=split_mask, other=float("-inf"))
    # Split 0 always holds key 0, so the max is finite and empty splits weigh exp2(-inf) = 0.
    weights = tl.exp2(lse - tl.max(lse, 0))
    partial = tl.load(partial_out_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :],
                      mask=split_mask[:, None], other=0.0)  # [SPLITS_PAD, HEAD_DIM_PAD]
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + seq * stride_out_token + head * stride_out_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                          query_start_ptr, out_ptr, qk_scale,
                          stride_q_token, stride_q_head, stride_out_token, stride_out_head,
                          stride_cache_block, stride_cache_head, stride_cache_token,
                          stride_table_seq,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    BLOCK_Q = BLOCK_M // GROUP_PAD  # queries per tile (a compile-time constant)
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # tokens cached before this chunk

    rows = tl.arange(0, BLOCK_M)
    query_idx = tile * BLOCK_Q + rows // GROUP_PAD  # [BLOCK_M] within the chunk
    head_in_group = rows % GROUP_PAD
    row_mask = (query_idx < query_len) & (head_in_group < GROUP)
    heads = kv_head * GROUP + head_in_group
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_rows = (query_start + query_idx) * stride_q_token + heads * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    query_pos = context_len + query_idx  # absolute position of each row's query

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # Keys up to this tile's last query; a tile past the chunk's end runs no iteration.
    key_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_Q)
    key_end = tl.where(tile * BLOCK_Q < query_len, key_end, 0)
    table_row_ptr = block_tables_ptr + seq * stride_table_seq
    for start in range(0, key_end, BLOCK_N):
        key_idx = start + tl.arange(0, BLOCK_N)
        key_mask = key_idx < key_end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table_row_ptr, key_idx, key_mask,
                             kv_head * stride_cache_head, dims, dim_mask, stride_cache_block,
                             stride_cache_token, BLOCK_SIZE)
        allowed = key_mask[None, :] & (key_idx[None, :] <= query_pos[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale,
                                             FP32_DOT)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_rows = (query_start + query_idx) * stride_out_token + heads * stride_out_head
    tl.store(out_ptr + out_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


def _pow2_at_least(value: int, minimum: int) -> int:
    return max(minimum, triton.next_power_of_2(value))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, num_kv_heads, block_size, "
                         f"head_dim]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides and a contiguous head_dim")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")


def _check_rows(name: str, rows: torch.Tensor, num_heads: int, head_dim: int,
                cache: torch.Tensor) -> None:
    """rows [num_tokens, num_heads, head_dim] on the cache's device, head_dim contiguous."""
    if rows.dim() != 3 or rows.shape[1] != num_heads or rows.shape[2] != head_dim:
        raise ValueError(f"{name} must be [num_tokens, {num_heads}, {head_dim}]; "
                         f"got {tuple(rows.shape)}")
    if rows.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous head_dim")
    if rows.device != cache.device:
        raise ValueError(f"{name} is on {rows.device} but the KV cache is on {cache.device}")


def _group_size(q: torch.Tensor, k_cache: torch.Tensor) -> int:
    """Query heads per kv head; q must share the cache's dtype (tl.dot takes one dtype)."""
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the KV cache is {k_cache.dtype}")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    return num_heads // num_kv_heads


def _fp32_dot(dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported KV cache dtype {dtype}; use float32, bfloat16 or float16")
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v [num_tokens, num_kv_heads, head_dim] to slots block_id * block_size + offset
    (slot_mapping [num_tokens] int64; a negative slot skips its row)."""
    _check_cache(k_cache, v_cache)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    _check_rows("k", k, num_kv_heads, head_dim, k_cache)
    _check_rows("v", v, num_kv_heads, head_dim, k_cache)
    if slot_mapping.shape != (k.shape[0],) or v.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must give one slot per row "
                         f"of k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0], num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2_at_least(head_dim, 1), BLOCK_SIZE=block_size)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence for a decode launch. The single-pass kernel runs one program per
    (sequence, kv head); once that grid holds two programs per SM (e.g. batch >= 33 at 8 kv
    heads on 132 SMs) it keeps the GPU busy and splitting would only add the merge: 1. A smaller
    grid (batch 1-16) leaves SMs idle, so the context is split until the grid fills every SM
    about twice, with splits no shorter than _MIN_SPLIT_LEN keys and at most _MAX_SPLITS."""
    most = max(1, min(_MAX_SPLITS, math.ceil(max_seq_len / _MIN_SPLIT_LEN)))
    wanted = math.ceil(2 * num_sms / max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, most))


def plan_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                       device: torch.device, num_splits: int | None = None) -> int:
    """The split count of a decode launch: num_splits (chosen by choose_num_splits when None),
    lowered so that the longest sequence, cut into whole key tiles, leaves no split empty.
    With a fixed max_seq_len (the context capacity) and num_splits the launch is the same at
    every step."""
    if max_seq_len < 1 or (num_splits is not None and num_splits < 1):
        raise ValueError(f"max_seq_len ({max_seq_len}) and num_splits ({num_splits}) must be >= 1")
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, sm_count(device))
    split_len = math.ceil(math.ceil(max_seq_len / num_splits) / _DECODE_BLOCK_N) * _DECODE_BLOCK_N
    return math.ceil(max_seq_len / split_len)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           max_seq_len: int, scale: float, out: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """One query per sequence: q [num_seqs, num_heads, head_dim] (row i is sequence i's last
    token, whose k/v are already stored) over seq_lens[i] cached tokens. block_tables
    [num_seqs, max_blocks] int32, seq_lens [num_seqs] int32, max_seq_len >= every seq_len.
    Returns out [num_seqs, num_heads, head_dim] in q's dtype (written into `out` if given)."""
    _check_cache(k_cache, v_cache)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    group = _group_size(q, k_cache)
    _check_rows("q", q, q.shape[1], head_dim, k_cache)
    out = torch.empty_like(q) if out is None else out
    _check_rows("out", out, q.shape[1], head_dim, k_cache)
    num_seqs = q.shape[0]
    if block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have one row per query ({num_seqs})")
    if num_seqs == 0:
        return out
    num_splits = plan_decode_splits(num_seqs, num_kv_heads, max_seq_len, q.device, num_splits)
    head_dim_pad = _pow2_at_least(head_dim, _MIN_DOT_SIZE)
    write_partial = num_splits > 1
    partial_shape = (num_seqs, q.shape[1], num_splits) if write_partial else (1,)
    partial_lse = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_out = torch.empty(partial_shape + (head_dim_pad,), dtype=torch.float32,
                              device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, partial_out, partial_lse,
        scale * _LOG2_E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=_pow2_at_least(group, _MIN_DOT_SIZE), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_N=_DECODE_BLOCK_N,
        WRITE_PARTIAL=write_partial, FP32_DOT=_fp32_dot(k_cache.dtype), num_warps=4)
    if write_partial:
        _merge_splits_kernel[(num_seqs, q.shape[1])](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's chunk of queries over its paged context.
    q [num_tokens, num_heads, head_dim]: sequence i owns rows query_start_loc[i] ..
    query_start_loc[i + 1] (int32 [num_seqs + 1]), the last query_len tokens of its seq_lens[i]
    (whose k/v are already stored). max_query_len >= every chunk's length.
    Returns out like q (written into `out` if given)."""
    _check_cache(k_cache, v_cache)
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    group = _group_size(q, k_cache)
    _check_rows("q", q, q.shape[1], head_dim, k_cache)
    out = torch.empty_like(q) if out is None else out
    _check_rows("out", out, q.shape[1], head_dim, k_cache)
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and query_start_loc "
                         f"{tuple(query_start_loc.shape)} do not match {num_seqs} block tables")
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1 for {q.shape[0]} query rows")
    group_pad = _pow2_at_least(group, 1)
    block_m = max(_PREFILL_BLOCK_M, group_pad)
    num_tiles = math.ceil(max_query_len / (block_m // group_pad))
    _paged_prefill_kernel[(num_tiles, num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale * _LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pow2_at_least(head_dim, _MIN_DOT_SIZE), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=_PREFILL_BLOCK_N, FP32_DOT=_fp32_dot(k_cache.dtype),
        num_warps=4)
    return out
