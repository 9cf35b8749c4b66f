"""Pure-torch paged attention: the ground truth for every attention kernel, and a working backend.

paged_attention_reference() is the math on one layer's paged cache (float32 softmax, optional
log-sum-exp) that kernel tests compare against; TorchPagedAttention is the DeviceAttention
(attention/base.py) built on it; write_kv() stores rows into a paged cache of either tier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apex_grpc.attention.layout import BatchLayout, HostPrefillBatch, PagedSeqBatch
from apex_grpc.kv_cache.quantized import write_quantized


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """cache [2, num_blocks, num_kv_heads, block_size, head_dim]; k/v [n, num_kv_heads, head_dim]
    go to token slots block_id * block_size + offset. An int8 cache comes with its scales
    [2, num_blocks, num_kv_heads, block_size] and gets the rows quantized."""
    if scales is not None:
        return write_quantized(cache, scales, slot_mapping, k, v)
    block_size = cache.shape[3]
    slots = slot_mapping.to(cache.device, torch.int64)
    block_ids = slots // block_size
    offsets = slots % block_size
    cache[0, block_ids, :, offsets] = k.to(cache.device, cache.dtype)
    cache[1, block_ids, :, offsets] = v.to(cache.device, cache.dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int) -> torch.Tensor:
    """cache [num_blocks, num_kv_heads, block_size, head_dim] -> [num_kv_heads, seq_len, d]."""
    block_size = cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].to(cache.device, torch.int64)]
    # [num_blocks, kv_heads, block_size, d] -> [kv_heads, num_blocks * block_size, d]
    context = blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], num_blocks * block_size, -1)
    return context[:, :seq_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            num_cached: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [q_len, heads, d] over k/v [kv_heads, seq_len, d] where the first
    num_cached keys precede the queries. Returns (out [q_len, heads, d] float32, lse [q_len,
    heads] float32)."""
    q_len, num_heads, _ = q.shape
    group = num_heads // k.shape[0]
    k32 = k.float().repeat_interleave(group, dim=0)  # [heads, seq_len, d]
    v32 = v.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), k32) * scale  # [heads, q_len, seq_len]
    query_pos = num_cached + torch.arange(q_len, device=q.device).unsqueeze(1)
    key_pos = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [heads, q_len]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("hqk,hkd->qhd", probs, v32)
    return out, lse.transpose(0, 1)


def _attend_decodes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: Sequence[int],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence, all sequences at once: gather each context padded to the
    longest, mask the padding. q [m, heads, d] -> (out [m, heads, d], lse [m, heads]) float32."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    max_len = max(seq_lens)
    num_blocks = -(-max_len // block_size)
    block_ids = block_tables[:, :num_blocks].to(k_cache.device, torch.int64)  # [m, num_blocks]

    def gather(cache: torch.Tensor) -> torch.Tensor:  # -> [m, kv_heads, max_len, d] float32
        blocks = cache[block_ids].to(q.device)  # [m, num_blocks, kv_heads, block_size, d]
        context = blocks.permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
        return context[:, :, :max_len].float()

    group = num_heads // num_kv_heads
    q_grouped = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("mkgd,mktd->mkgt", q_grouped, gather(k_cache)) * scale
    lens = torch.tensor(list(seq_lens), device=q.device)
    padding = torch.arange(max_len, device=q.device).unsqueeze(0) >= lens.unsqueeze(1)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [m, kv_heads, group]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("mkgt,mktd->mkgd", probs, gather(v_cache))
    return out.reshape(num_seqs, num_heads, head_dim), lse.reshape(num_seqs, num_heads)


def paged_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    seq_lens: Sequence[int],  # context per sequence including the queries
    query_lens: Sequence[int],  # query rows per sequence, consecutive in q
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's query rows over its paged context (whose k/v must
    already be in the cache). Single-row (decode) sequences are batched in one gather; longer
    chunks run one sequence at a time. Output in q's dtype; lse [num_tokens, num_heads]."""
    if len(seq_lens) != len(query_lens) or sum(query_lens) != q.shape[0]:
        raise ValueError(f"query_lens {tuple(query_lens)} do not cover q's {q.shape[0]} rows")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    row_starts = [0]
    decode_seqs: list[int] = []
    for seq_idx, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        if query_len > seq_len:
            raise ValueError(f"sequence {seq_idx}: query_len {query_len} > seq_len {seq_len}")
        row = row_starts[-1]
        row_starts.append(row + query_len)
        if query_len == 1:
            decode_seqs.append(seq_idx)
            continue
        k = _gather_context(k_cache, block_tables[seq_idx], seq_len).to(q.device)
        v = _gather_context(v_cache, block_tables[seq_idx], seq_len).to(q.device)
        rows = slice(row, row + query_len)
        out[rows], lse[rows] = _attend(q[rows], k, v, scale, seq_len - query_len)
    if decode_seqs:
        rows = torch.tensor([row_starts[i] for i in decode_seqs], device=q.device)
        selected = torch.tensor(decode_seqs, device=block_tables.device)
        out[rows], lse[rows] = _attend_decodes(q[rows], k_cache, v_cache,
                                               block_tables[selected],
                                               [seq_lens[i] for i in decode_seqs], scale)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def attend_own_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       batch: HostPrefillBatch, scale: float, out: torch.Tensor) -> None:
    """Causal attention of each whole prompt in batch over its own k/v (host-bound prefills:
    there is no earlier context). q/k/v/out hold every row of the step."""
    row = batch.row_start
    for query_len in batch.query_lens:
        rows = slice(row, row + query_len)
        # The prompt is the whole context: k/v [kv_heads, query_len, d].
        seq_out, _ = _attend(q[rows], k[rows].transpose(0, 1), v[rows].transpose(0, 1), scale, 0)
        out[rows] = seq_out.to(out.dtype)
        row += query_len


class TorchPagedAttention:
    """DeviceAttention in plain torch (CPU or CUDA; fp32, bf16, fp16): the reference backend."""

    def __init__(self, gpu_kv: torch.Tensor, scale: float) -> None:
        if gpu_kv.dim() != 6:
            raise ValueError("the KV cache must be [num_layers, 2, num_blocks, num_kv_heads, "
                             "block_size, head_dim]")
        self.gpu_kv = gpu_kv
        self.scale = scale

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layout: BatchLayout, out: torch.Tensor) -> None:
        for batch in (layout.gpu_prefill, layout.gpu_decode):
            if batch is not None:
                attend_paged(self.gpu_kv[layer_idx], batch, q, k, v, self.scale, out)
        if layout.host_prefill is not None:
            attend_own_context(q, k, v, layout.host_prefill, self.scale, out)


def attend_paged(cache: torch.Tensor, batch: PagedSeqBatch, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Store batch's rows of k/v in cache [2, num_blocks, num_kv_heads, block_size, head_dim],
    then write their attention over it into out."""
    rows = batch.rows
    write_kv(cache, batch.slot_mapping, k[rows], v[rows])
    result = paged_attention_reference(q[rows].to(cache.device), cache[0], cache[1],
                                       batch.block_tables, batch.seq_lens, batch.query_lens,
                                       scale)
    out[rows] = result.to(out.device)
