"""TorchPagedAttention against dense causal attention, for every metadata part and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apex_grpc.attention.torch_ref import (TorchPagedAttention, build_host_prefill_batch,
                                           build_metadata, build_paged_batch,
                                           paged_attention_reference)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 32, 16
SCALE = HEAD_DIM ** -0.5


def _dense(q, k, v):
    """q [n, heads, d], k/v [n, kv_heads, d] of one sequence -> causal attention [n, heads, d]."""
    group = NUM_HEADS // NUM_KV_HEADS
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1),
        v.float().repeat_interleave(group, 1).transpose(0, 1), is_causal=True, scale=SCALE)
    return out.transpose(0, 1)


def _cache(num_blocks, dtype, device="cpu"):
    return torch.zeros(1, 2, num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, dtype=dtype,
                       device=device)


def _qkv(seq_len, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(seq_len, NUM_HEADS, HEAD_DIM)] + [(seq_len, NUM_KV_HEADS, HEAD_DIM)] * 2
    return [torch.randn(s, generator=generator).to(device, dtype) for s in shapes]


def _run_mixed_batch(dtype, device):
    """Sequence A: 40 cached tokens + a 9-token prefill chunk; sequence B: 20 cached + 1 decode
    token; sequence C: a fresh 5-token prefill. Blocks are deliberately non-contiguous."""
    lens = {"a": 49, "b": 21, "c": 5}
    blocks = {"a": [7, 2, 5, 0], "b": [3, 6], "c": [1]}
    data = {name: _qkv(n, dtype, seed, device) for seed, (name, n) in enumerate(lens.items())}
    attn = TorchPagedAttention(_cache(8, dtype, device), None, SCALE)
    # Earlier passes wrote the cached prefixes of a and b.
    warm = build_paged_batch(0, [blocks["a"], blocks["b"]], [0, 0], [40, 20], BLOCK_SIZE,
                             device)
    q_warm, k_warm, v_warm = (torch.cat([data["a"][i][:40], data["b"][i][:20]])
                              for i in range(3))
    attn.forward(0, q_warm, k_warm, v_warm, build_metadata(gpu=warm))
    batch = build_paged_batch(0, [blocks["a"], blocks["b"], blocks["c"]], [40, 20, 0],
                              [9, 1, 5], BLOCK_SIZE, device)
    q, k, v = (torch.cat([data["a"][i][40:], data["b"][i][20:], data["c"][i]])
               for i in range(3))
    out = attn.forward(0, q, k, v, build_metadata(gpu=batch))
    expected = torch.cat([_dense(*data["a"])[40:], _dense(*data["b"])[20:], _dense(*data["c"])])
    return out, expected


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                             (torch.float16, 2e-3)])
def test_mixed_prefill_and_decode_match_dense_attention(dtype, tolerance):
    out, expected = _run_mixed_batch(dtype, "cpu")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_mixed_batch_on_cuda():
    out, expected = _run_mixed_batch(torch.bfloat16, "cuda")
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_batched_decodes_of_different_lengths():
    """Decode rows of several sequences are attended in one padded gather; each must see only
    its own context length."""
    lens = [33, 1, 16, 17]
    blocks = [[0, 1, 2], [3], [4], [5, 6]]
    data = [_qkv(n, torch.float32, seed) for seed, n in enumerate(lens)]
    attn = TorchPagedAttention(_cache(7, torch.float32), None, SCALE)
    prefix = [n - 1 for n in lens]
    warm = [seq for seq, n in zip(range(4), prefix) if n > 0]
    attn.forward(0, *(torch.cat([data[i][j][:prefix[i]] for i in warm]) for j in range(3)),
                 build_metadata(gpu=build_paged_batch(0, [blocks[i] for i in warm],
                                                      [0] * len(warm),
                                                      [prefix[i] for i in warm],
                                                      BLOCK_SIZE, "cpu")))
    q, k, v = (torch.cat([d[j][-1:] for d in data]) for j in range(3))
    out = attn.forward(0, q, k, v, build_metadata(
        gpu=build_paged_batch(0, blocks, prefix, [1] * 4, BLOCK_SIZE, "cpu")))
    expected = torch.cat([_dense(*d)[-1:] for d in data])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_host_tier_parts_match_gpu_tier():
    """Rows in order: a GPU prefill (seq 0), a host-bound prefill (seq 1), then host decode of
    seq 2 whose first 30 tokens are already in the host cache."""
    dtype = torch.float32
    gpu_data, prefill_data, decode_data = (_qkv(n, dtype, seed)
                                           for seed, n in enumerate((12, 10, 31)))
    host_kv = _cache(6, dtype)
    attn = TorchPagedAttention(_cache(4, dtype), host_kv, SCALE)
    # Seq 2's cached context arrives on the host tier (as an earlier host prefill would).
    warm = build_host_prefill_batch(0, [[4, 5]], [30], BLOCK_SIZE)
    attn.forward(0, *(t[:30] for t in decode_data),
                 build_metadata(host_prefill=warm))
    meta = build_metadata(
        gpu=build_paged_batch(0, [[3]], [0], [12], BLOCK_SIZE, "cpu"),
        host_prefill=build_host_prefill_batch(12, [[0]], [10], BLOCK_SIZE),
        host_decode=build_paged_batch(22, [[4, 5]], [30], [1], BLOCK_SIZE, "cpu"))
    q, k, v = (torch.cat([gpu_data[i], prefill_data[i], decode_data[i][30:]]) for i in range(3))
    out = attn.forward(0, q, k, v, meta)
    expected = torch.cat([_dense(*gpu_data), _dense(*prefill_data), _dense(*decode_data)[30:]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The host prefill's k/v landed in host block 0, in order.
    torch.testing.assert_close(host_kv[0, 0, 0, :, :10].transpose(0, 1), prefill_data[1])


def test_reference_returns_log_sum_exp():
    q, k, v = _qkv(20, torch.float32, 9)
    cache = _cache(2, torch.float32)
    TorchPagedAttention(cache, None, SCALE).forward(
        0, q, k, v, build_metadata(gpu=build_paged_batch(0, [[0, 1]], [0], [20], BLOCK_SIZE,
                                                         "cpu")))
    out, lse = paged_attention_reference(q[19:], cache[0, 0], cache[0, 1],
                                         torch.tensor([[0, 1]]), [20], [1], SCALE,
                                         return_lse=True)
    scores = torch.einsum("hd,khd->hk", q[19], k.repeat_interleave(2, 1)) * SCALE
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, _dense(q, k, v)[19:])


def test_bad_metadata_is_rejected():
    attn = TorchPagedAttention(_cache(2, torch.float32), None, SCALE)
    q, k, v = _qkv(3, torch.float32, 0)
    with pytest.raises(ValueError, match="rows"):
        attn.forward(0, q, k, v, build_metadata(
            gpu=build_paged_batch(0, [[0]], [0], [2], BLOCK_SIZE, "cpu")))
    with pytest.raises(ValueError, match="no host KV cache"):
        attn.forward(0, q, k, v, build_metadata(
            host_decode=build_paged_batch(0, [[0]], [0], [3], BLOCK_SIZE, "cpu")))
    with pytest.raises(ValueError, match="needs 20 slots"):
        build_paged_batch(0, [[0]], [0], [20], BLOCK_SIZE, "cpu")
