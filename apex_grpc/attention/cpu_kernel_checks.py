"""Validation at the native CPU attention kernel's boundary: vectorized torch checks that raise
TypeError/ValueError (naming the argument) before any pointer reaches C++, and the sizes they
establish (DecodeSizes) for attention/cpu_kernel.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class DecodeSizes:
    num_seqs: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    max_blocks_per_seq: int
    q_row_stride: int  # elements between q's rows
    new_kv_row_stride: int  # elements between new_k's (and new_v's) rows

    def as_list(self) -> list[int]:
        return [self.num_seqs, self.num_heads, self.num_kv_heads, self.head_dim,
                self.block_size, self.num_blocks, self.max_blocks_per_seq, self.q_row_stride,
                self.new_kv_row_stride]


def require_tensor(
    name: str, tensor: object, *, ndim: int, dtype: torch.dtype | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the CPU attention kernel needs CPU tensors")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def require_rows(name: str, tensor: object, dtype: torch.dtype) -> int:
    """A [rows, heads, head_dim] tensor whose rows may be strided (a view into a wider
    buffer, like q/k/v of a fused projection) but each hold their heads contiguously; returns
    the row stride in elements."""
    require_tensor(name, tensor, ndim=3, dtype=dtype, contiguous=False)
    row = tensor.shape[1] * tensor.shape[2]
    if tensor.shape[0] == 0 or row == 0:
        return row
    if not tensor[0].is_contiguous() or (tensor.shape[0] > 1 and tensor.stride(0) < row):
        raise ValueError(f"{name} must hold each row's heads contiguously, rows not overlapping; "
                         f"got strides {tuple(tensor.stride())}")
    return tensor.stride(0) if tensor.shape[0] > 1 else row


def require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def check_flag(name: str, flag: torch.Tensor) -> None:
    require_tensor(name, flag, ndim=1, dtype=torch.int64)
    if flag.numel() != 1:
        raise ValueError(f"{name} must hold exactly one int64, got {flag.numel()}")


def _check_kv_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None, rows_name: str, rows_dtype: torch.dtype,
) -> None:
    """The caches (and an 8-bit cache's scales) for rows (q, or k of an append) of rows_dtype."""
    require_tensor("k_cache", k_cache, ndim=4)
    if k_cache.dtype not in DTYPE_CODES:
        raise TypeError(f"KV cache dtype must be float32, bfloat16, float16 or int8, got "
                        f"{k_cache.dtype}")
    require_tensor("v_cache", v_cache, ndim=4, dtype=k_cache.dtype)
    require_shape("v_cache", v_cache, tuple(k_cache.shape))
    if rows_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{rows_name} must be float32, bfloat16 or float16, got {rows_dtype}")
    if k_cache.dtype != torch.int8:
        if k_cache.dtype != rows_dtype:
            raise TypeError(f"{rows_name} must be {k_cache.dtype} like the KV cache, got "
                            f"{rows_dtype}")
        if k_scales is not None or v_scales is not None:
            raise ValueError("k_scales/v_scales belong to an int8 KV cache only")
        return
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is None:
            raise ValueError(f"an int8 KV cache needs {name}")
        require_tensor(name, scales, ndim=3, dtype=torch.float32)
        require_shape(name, scales, tuple(k_cache.shape[:3]))


def _check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel() == 0:
        return
    low, high = torch.aminmax(slot_mapping)
    if int(low) < 0 or int(high) >= num_slots:
        row = int(((slot_mapping < 0) | (slot_mapping >= num_slots)).nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{row}] = {int(slot_mapping[row])} is outside the KV cache "
                         f"(0..{num_slots - 1})")


def _check_lengths_and_tables(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int
) -> None:
    """Vectorized: a handful of torch ops however large the batch (this runs every layer)."""
    if seq_lens.numel() == 0:
        return
    max_blocks = block_tables.shape[1]
    min_len, max_len = (int(x) for x in torch.aminmax(seq_lens))
    if min_len <= 0:
        seq = int((seq_lens <= 0).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{seq}] = {int(seq_lens[seq])}: every context must hold at "
                         "least the new token")
    capacity = max_blocks * block_size
    if max_len > capacity:
        seq = int((seq_lens > capacity).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{seq}] = {int(seq_lens[seq])} is longer than its block table "
                         f"holds ({max_blocks} blocks of {block_size} = {capacity} tokens)")
    low, high = (int(x) for x in torch.aminmax(block_tables))
    if low >= 0 and high < num_blocks:
        return  # the common case: even the unused padding is a valid id
    blocks_used = (seq_lens + (block_size - 1)) // block_size  # [num_seqs]
    used = torch.arange(max_blocks, dtype=torch.int32) < blocks_used.unsqueeze(1)
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(bad.any()):
        seq, block = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_tables[{seq}, {block}] = {int(block_tables[seq, block])} is "
                         f"outside the KV cache (0..{num_blocks - 1})")


def check_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    new_k: torch.Tensor | None,
    new_v: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    *,
    check_values: bool = True,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> DecodeSizes:
    """Raise TypeError/ValueError naming the first problem; return the problem's sizes."""
    if (new_k is None) != (slot_mapping is None):
        raise ValueError("new_k, new_v and slot_mapping must be given together")
    sizes = check_decode_buffers(q, k_cache, v_cache, out, lse, new_k, new_v, k_scales,
                                 v_scales)
    return check_decode_metadata(sizes, block_tables, seq_lens, slot_mapping,
                                 check_values=check_values)


def check_decode_buffers(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    new_k: torch.Tensor | None,
    new_v: torch.Tensor | None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> DecodeSizes:
    """The part of check_decode that does not depend on the step's metadata; the sizes it
    returns have max_blocks_per_seq 0 until check_decode_metadata fills it in."""
    require_tensor("q", q, ndim=3, contiguous=False)
    _check_kv_cache(k_cache, v_cache, k_scales, v_scales, "q", q.dtype)
    dtype = q.dtype
    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    q_row_stride = require_rows("q", q, dtype)
    num_seqs, num_heads, q_head_dim = q.shape
    if q_head_dim != head_dim:
        raise ValueError(f"q has head_dim {q_head_dim} but the KV cache has {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    require_tensor("out", out, ndim=3, dtype=dtype)
    require_shape("out", out, tuple(q.shape))
    require_tensor("lse", lse, ndim=2, dtype=torch.float32)
    require_shape("lse", lse, (num_seqs, num_heads))
    if (new_k is None) != (new_v is None):
        raise ValueError("new_k, new_v and slot_mapping must be given together")
    new_kv_row_stride = num_kv_heads * head_dim
    if new_k is not None:
        strides = []
        for name, rows in (("new_k", new_k), ("new_v", new_v)):
            strides.append(require_rows(name, rows, dtype))
            require_shape(name, rows, (num_seqs, num_kv_heads, head_dim))
        if strides[0] != strides[1]:
            raise ValueError(f"new_k and new_v must have the same row stride, got {strides}")
        new_kv_row_stride = strides[0]
    return DecodeSizes(num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, 0,
                       q_row_stride, new_kv_row_stride)


def check_decode_metadata(
    sizes: DecodeSizes,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    *,
    check_values: bool = True,
) -> DecodeSizes:
    """The step's block tables, lengths and (with an append) slots against checked buffers."""
    num_seqs = sizes.num_seqs
    require_tensor("block_tables", block_tables, ndim=2, dtype=torch.int32)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    require_tensor("seq_lens", seq_lens, ndim=1, dtype=torch.int32)
    require_shape("seq_lens", seq_lens, (num_seqs,))
    if slot_mapping is not None:
        require_tensor("slot_mapping", slot_mapping, ndim=1, dtype=torch.int64)
        require_shape("slot_mapping", slot_mapping, (num_seqs,))
    if check_values:
        _check_lengths_and_tables(block_tables, seq_lens, sizes.block_size, sizes.num_blocks)
        if slot_mapping is not None:
            _check_slots(slot_mapping, sizes.num_blocks * sizes.block_size)
    return dataclasses.replace(sizes, max_blocks_per_seq=block_tables.shape[1])


def check_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    require_tensor("k", k, ndim=3)
    _check_kv_cache(k_cache, v_cache, k_scales, v_scales, "k", k.dtype)
    dtype = k.dtype
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    require_tensor("slot_mapping", slot_mapping, ndim=1, dtype=torch.int64)
    num_tokens = slot_mapping.shape[0]
    for name, rows in (("k", k), ("v", v)):
        require_tensor(name, rows, ndim=3, dtype=dtype)
        require_shape(name, rows, (num_tokens, num_kv_heads, head_dim))
    _check_slots(slot_mapping, k_cache.shape[0] * block_size)
