"""TorchPagedAttention and the host side against dense causal attention, for every layout part
and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.host import HostAttention
from apex_grpc.attention.layout import (BatchLayout, host_prefill_batch, make_layout,
                                        paged_batch)
from apex_grpc.attention.torch_ref import TorchPagedAttention, paged_attention_reference

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


def _forward(attn, q, k, v, layout):
    out = torch.full_like(q, float("nan"))
    attn.forward(0, q, k, v, layout, out)
    return out


def _qkv(seq_len, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(seq_len, NUM_HEADS, HEAD_DIM)] + [(seq_len, NUM_KV_HEADS, HEAD_DIM)] * 2
    return [torch.randn(s, generator=generator).to(device, dtype) for s in shapes]


def _run_mixed_batch(dtype, device):
    """Sequence A: 40 cached tokens + a 9-token prefill chunk; sequence C: a fresh 5-token
    prefill; sequence B: 20 cached + 1 decode token. Blocks are deliberately non-contiguous."""
    lens = {"a": 49, "b": 21, "c": 5}
    blocks = {"a": [7, 2, 5, 0], "b": [3, 6], "c": [1]}
    data = {name: _qkv(n, dtype, seed, device) for seed, (name, n) in enumerate(lens.items())}
    attn = TorchPagedAttention(_cache(8, dtype, device), SCALE)
    # Earlier passes wrote the cached prefixes of a and b.
    warm = paged_batch(0, [blocks["a"], blocks["b"]], [0, 0], [40, 20], BLOCK_SIZE, device)
    q_warm, k_warm, v_warm = (torch.cat([data["a"][i][:40], data["b"][i][:20]])
                              for i in range(3))
    _forward(attn, q_warm, k_warm, v_warm, make_layout(gpu_prefill=warm))
    layout = make_layout(
        gpu_prefill=paged_batch(0, [blocks["a"], blocks["c"]], [40, 0], [9, 5], BLOCK_SIZE,
                                device),
        gpu_decode=paged_batch(14, [blocks["b"]], [20], [1], BLOCK_SIZE, device))
    q, k, v = (torch.cat([data["a"][i][40:], data["c"][i], data["b"][i][20:]])
               for i in range(3))
    out = _forward(attn, q, k, v, layout)
    expected = torch.cat([_dense(*data["a"])[40:], _dense(*data["c"]), _dense(*data["b"])[20:]])
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
    attn = TorchPagedAttention(_cache(7, torch.float32), SCALE)
    prefix = [n - 1 for n in lens]
    warm = [seq for seq, n in zip(range(4), prefix) if n > 0]
    _forward(attn, *(torch.cat([data[i][j][:prefix[i]] for i in warm]) for j in range(3)),
             make_layout(gpu_prefill=paged_batch(0, [blocks[i] for i in warm], [0] * len(warm),
                                                 [prefix[i] for i in warm], BLOCK_SIZE, "cpu")))
    q, k, v = (torch.cat([d[j][-1:] for d in data]) for j in range(3))
    # Sequence 1 has no cached context: its one row is a prefill, the others decodes.
    out = _forward(attn, q, k, v, make_layout(
        gpu_prefill=paged_batch(0, blocks[:2], prefix[:2], [1, 1], BLOCK_SIZE, "cpu"),
        gpu_decode=paged_batch(2, blocks[2:], prefix[2:], [1, 1], BLOCK_SIZE, "cpu")))
    expected = torch.cat([_dense(*d)[-1:] for d in data])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_device_and_host_sides_cover_every_part():
    """Rows in order: a GPU prefill (seq 0), a host-bound prefill (seq 1), then the host decode
    of seq 2 whose first 30 tokens are already in the host cache. The device attends the
    first two, the host side writes seq 1's k/v to the host tier and attends seq 2 on the
    native pool."""
    dtype = torch.float32
    gpu_data, prefill_data, decode_data = (_qkv(n, dtype, seed)
                                           for seed, n in enumerate((12, 10, 31)))
    host_kv = _cache(6, dtype)
    device = TorchPagedAttention(_cache(4, dtype), SCALE)
    with CpuAttentionPool(1) as pool:
        host = HostAttention(host_kv, pool, SCALE, 4, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                             torch.device("cpu"))
        # Seq 2's cached context arrives on the host tier (as an earlier host prefill would).
        host.begin_step(make_layout(host_prefill=host_prefill_batch(0, [[4, 5]], [30],
                                                                    BLOCK_SIZE)))
        host.write_prefill(0, decode_data[1][:30], decode_data[2][:30])
        host.end_step()
        layout = make_layout(
            gpu_prefill=paged_batch(0, [[3]], [0], [12], BLOCK_SIZE, "cpu"),
            host_prefill=host_prefill_batch(12, [[0]], [10], BLOCK_SIZE),
            host_decode=paged_batch(22, [[4, 5]], [30], [1], BLOCK_SIZE, "cpu"))
        # The host side takes q|k|v rows as the fused projection leaves them.
        qkv = torch.cat([torch.cat([gpu_data[i], prefill_data[i], decode_data[i][30:]])
                         for i in range(3)], dim=1)
        q, k, v = qkv.split((NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS), dim=1)
        out = torch.full_like(q, float("nan"))
        host.begin_step(layout)
        host.stage(0, q, k, v, 22)
        device.forward(0, q, k, v, layout, out)
        host.write_prefill(0, k, v)
        host.fetch(0, out, 22)
        host.end_step()
    expected = torch.cat([_dense(*gpu_data), _dense(*prefill_data), _dense(*decode_data)[30:]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The host prefill's k/v landed in host block 0, in order.
    torch.testing.assert_close(host_kv[0, 0, 0, :, :10].transpose(0, 1), prefill_data[1])


def test_reference_returns_log_sum_exp():
    q, k, v = _qkv(20, torch.float32, 9)
    cache = _cache(2, torch.float32)
    _forward(TorchPagedAttention(cache, SCALE), q, k, v,
             make_layout(gpu_prefill=paged_batch(0, [[0, 1]], [0], [20], BLOCK_SIZE, "cpu")))
    out, lse = paged_attention_reference(q[19:], cache[0, 0], cache[0, 1],
                                         torch.tensor([[0, 1]]), [20], [1], SCALE,
                                         return_lse=True)
    scores = torch.einsum("hd,khd->hk", q[19], k.repeat_interleave(2, 1)) * SCALE
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, _dense(q, k, v)[19:])


def test_bad_layouts_are_rejected():
    decode = paged_batch(0, [[0]], [2], [1], BLOCK_SIZE, "cpu")
    with pytest.raises(ValueError, match="gpu_decode starts at row 0, expected 3"):
        make_layout(gpu_prefill=paged_batch(0, [[0]], [0], [3], BLOCK_SIZE, "cpu"),
                    gpu_decode=decode)
    with pytest.raises(ValueError, match="one token per sequence"):
        make_layout(gpu_decode=paged_batch(0, [[0]], [0], [2], BLOCK_SIZE, "cpu"))
    with pytest.raises(ValueError, match="cover 1 rows and 0 padding rows of 2"):
        BatchLayout(2, gpu_decode=decode)
    BatchLayout(2, gpu_decode=decode, padding_rows=1)  # a graphed step's trailing padding
    with pytest.raises(ValueError, match="needs 20 slots"):
        paged_batch(0, [[0]], [0], [20], BLOCK_SIZE, "cpu")
