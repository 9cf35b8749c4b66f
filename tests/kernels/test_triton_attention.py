"""The Triton paged-attention kernels and TritonPagedAttention against float64 / torch references.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must
be set before triton is first imported, hence before the imports below); with CUDA they run
natively. Skipped off Linux x86_64, the only platform Triton ships for.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

# triton decides at import time whether its own library functions run under the interpreter,
# so an import before this point (transformers imports triton) leaves kernels unrunnable on CPU.
_PRELOADED_FOR_GPU = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip("Triton ships for Linux x86_64 only", allow_module_level=True)

from apex_grpc.attention import triton_paged  # noqa: E402
from apex_grpc.attention.cpu_device import NativeCpuPagedAttention  # noqa: E402
from apex_grpc.attention.cpu_kernel import CpuAttentionPool  # noqa: E402
from apex_grpc.attention.gpu_backend import (TritonPagedAttention,  # noqa: E402
                                             make_device_attention)
from apex_grpc.attention.host import HostAttention  # noqa: E402
from apex_grpc.attention.layout import host_prefill_batch, make_layout  # noqa: E402
from apex_grpc.attention.torch_ref import TorchPagedAttention, write_kv  # noqa: E402
from apex_grpc.request import Tier  # noqa: E402
from apex_grpc.runner.input_batch import paged_batch_of  # noqa: E402
from apex_grpc.scheduler.plan import ScheduledSeq  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

if DEVICE.type == "cpu" and _PRELOADED_FOR_GPU:
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot "
                "run on the CPU in this session: set TRITON_INTERPRET=1 in tests/conftest.py "
                "(or the environment), or run this module on its own", pytrace=False)


def _random_tables(seq_lens: list[int], block_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Shuffled (non-contiguous) blocks for each sequence: (block_tables int32, num_blocks)."""
    counts = [-(-seq_len // block_size) for seq_len in seq_lens]
    num_blocks = sum(counts) + 2  # spare blocks that no sequence may read
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    used = 0
    for seq_idx, count in enumerate(counts):
        tables[seq_idx, :count] = order[used:used + count]
        used += count
    return tables, num_blocks


def _reference(q, k_cache, v_cache, tables, seq_lens, query_lens, scale) -> torch.Tensor:
    """float64 causal attention, keys located slot by slot through the block tables."""
    block_size = k_cache.shape[2]
    group = q.shape[1] // k_cache.shape[1]
    out, row = [], 0
    for table, seq_len, query_len in zip(tables.cpu(), seq_lens, query_lens):
        positions = torch.arange(seq_len)
        pages = table.long()[positions // block_size]
        keys = k_cache.cpu().double()[pages, :, positions % block_size]  # [seq_len, kv_heads, d]
        values = v_cache.cpu().double()[pages, :, positions % block_size]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        queries = q[row:row + query_len].cpu().double()  # [query_len, heads, d]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        query_pos = torch.arange(seq_len - query_len, seq_len).unsqueeze(1)
        scores = scores.masked_fill(positions.unsqueeze(0) > query_pos, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
        row += query_len
    return torch.cat(out)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def _random_case(dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, query_lens):
    generator = torch.Generator().manual_seed(sum(seq_lens) + head_dim)
    tables, num_blocks = _random_tables(seq_lens, block_size, generator)
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(cache_shape, generator=generator).to(DEVICE, dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    return q, k_cache, v_cache, tables.to(DEVICE)


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size,seq_lens,num_splits", [
    (torch.float32, 8, 2, 64, 16, [1, 17, 300], None),
    (torch.float32, 8, 2, 64, 16, [1, 64, 4096], 4),  # split-K; seq 0 leaves 3 splits empty
    (torch.bfloat16, 6, 2, 80, 32, [5, 130], 2),  # GQA 3, head_dim padded to 128
    (torch.float16, 4, 4, 128, 8, [40, 70], None),  # MHA
])
def test_decode_matches_float64_reference(dtype, num_heads, num_kv_heads, head_dim, block_size,
                                          seq_lens, num_splits):
    q, k_cache, v_cache, tables = _random_case(dtype, num_heads, num_kv_heads, head_dim,
                                               block_size, seq_lens, [1] * len(seq_lens))
    seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    out = triton_paged.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens_tensor,
                                              max(seq_lens), scale, num_splits=num_splits)
    ref = _reference(q, k_cache, v_cache, tables, seq_lens, [1] * len(seq_lens), scale)
    assert out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size,seq_lens,query_lens", [
    # fresh prompt, chunk after 63 cached tokens, short chunk, one-token chunk mid-batch
    (torch.float32, 4, 2, 48, 16, [20, 100, 7, 10], [20, 37, 3, 1]),
    (torch.bfloat16, 8, 1, 64, 16, [90, 33], [90, 5]),  # GQA 8: 8 queries per 64-row tile
    (torch.float16, 12, 4, 80, 64, [130], [30]),
])
def test_prefill_with_context_matches_float64_reference(dtype, num_heads, num_kv_heads,
                                                        head_dim, block_size, seq_lens,
                                                        query_lens):
    q, k_cache, v_cache, tables = _random_case(dtype, num_heads, num_kv_heads, head_dim,
                                               block_size, seq_lens, query_lens)
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    scale = head_dim ** -0.5
    out = triton_paged.paged_prefill_attention(
        q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE), max(query_lens), scale)
    ref = _reference(q, k_cache, v_cache, tables, seq_lens, query_lens, scale)
    assert _relative_error(out, ref) < TOLERANCE[dtype]


def test_store_kv_writes_exactly_the_mapped_slots_and_skips_negative_ones():
    generator = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 6, 2, 16, 80, generator=generator).to(DEVICE, torch.bfloat16)
    k = torch.randn(5, 2, 80, generator=generator).to(DEVICE, torch.bfloat16)
    v = torch.randn(5, 2, 80, generator=generator).to(DEVICE, torch.bfloat16)
    slots = torch.tensor([3, 40, 17, -1, 95], dtype=torch.int64, device=DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    write_kv(expected, slots[keep], k[keep], v[keep])
    triton_paged.store_kv(cache[0], cache[1], slots, k, v)
    assert torch.equal(cache, expected)


def _seq(request_id: str, num_computed: int, num_new: int, first_block: int,
         block_size: int) -> ScheduledSeq:
    num_blocks = -(-(num_computed + num_new) // block_size)
    table = tuple(range(first_block, first_block + num_blocks))[::-1]  # reversed: non-monotone
    return ScheduledSeq(request_id=request_id, token_ids=(1,) * num_new,
                        num_computed_tokens=num_computed, block_table=table, tier=Tier.GPU,
                        samples=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_torch_backend(dtype):
    """GPU prefills (fresh and with context), GPU decodes and a host-bound prefill in one
    layout: outputs and the GPU cache after the store equal the torch backend's, and the host
    side puts the host prefill's k/v into the host tier (staged through pinned memory on
    CUDA)."""
    num_layers, num_heads, num_kv_heads, head_dim, block_size = 2, 8, 2, 64, 16
    generator = torch.Generator().manual_seed(11)
    gpu_kv = torch.randn(num_layers, 2, 24, num_kv_heads, block_size, head_dim,
                         generator=generator).to(DEVICE, dtype)
    host_kv = torch.randn(num_layers, 2, 12, num_kv_heads, block_size, head_dim,
                          generator=generator).to(dtype)
    prefill = paged_batch_of((_seq("fresh", 0, 19, 0, block_size), _seq("chunk", 40, 9, 2, block_size)),
                     0, block_size, DEVICE)
    decode = paged_batch_of((_seq("decode_a", 70, 1, 6, block_size),
                     _seq("decode_b", 5, 1, 11, block_size),
                     _seq("decode_c", 129, 1, 12, block_size)), 28, block_size, DEVICE)
    layout = make_layout(gpu_prefill=prefill, gpu_decode=decode,
                         host_prefill=host_prefill_batch(31, [[0, 1]], [21], block_size))
    q, k, v = (torch.randn(layout.num_tokens, heads, head_dim, generator=generator)
               .to(DEVICE, dtype) for heads in (num_heads, num_kv_heads, num_kv_heads))
    scale = head_dim ** -0.5

    triton_backend = TritonPagedAttention(gpu_kv.clone(), scale)
    torch_backend = TorchPagedAttention(gpu_kv.clone(), scale)
    out, expected = torch.empty_like(q), torch.empty_like(q)
    triton_backend.forward(1, q, k, v, layout, out)
    torch_backend.forward(1, q, k, v, layout, expected)
    assert _relative_error(out, expected.double().cpu()) < TOLERANCE[dtype]
    assert torch.equal(triton_backend.gpu_kv, torch_backend.gpu_kv)

    with CpuAttentionPool(1) as pool:
        host = HostAttention(host_kv, pool, scale, 4, num_heads, num_kv_heads, head_dim, DEVICE)
        host.begin_step(layout)
        host.write_prefill(1, k, v)
        host.end_step()
    expected_host = host_kv.clone()
    write_kv(expected_host[1], layout.host_prefill.host_slot_mapping, k[31:].cpu(), v[31:].cpu())
    assert torch.equal(host_kv, expected_host)


def test_bad_inputs_are_rejected_with_the_problem_named():
    k_cache = torch.zeros(4, 4, 16, 64, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_paged.paged_decode_attention(torch.zeros(1, 6, 64, device=DEVICE), k_cache,
                                            k_cache, tables, seq_lens, 1, 1.0)
    strided_q = torch.zeros(1, 8, 128, device=DEVICE)[:, :, ::2]
    with pytest.raises(ValueError, match="contiguous head_dim"):
        triton_paged.paged_decode_attention(strided_q, k_cache, k_cache, tables, seq_lens, 1, 1.0)
    with pytest.raises(ValueError, match="the KV cache must be"):
        TritonPagedAttention(torch.zeros(2, 4, 4, 16, 64, device=DEVICE), 1.0)


# Split-KV cases. Under the interpreter sm_count is 1, so splits are forced; each case asserts
# the split path runs. Lengths are off multiples of the block size (16/32) and of the split.
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size,seq_lens,max_seq_len,"
                         "num_splits,expected_splits", [
    (torch.bfloat16, 8, 1, 128, 16, [1000], 1000, 5, 4),  # batch 1, GQA 8: 4 splits of 256
    (torch.float32, 8, 2, 64, 16, [1, 77, 523], 523, 4, 3),  # GQA 4, short rows' empty splits
    (torch.float16, 2, 2, 128, 32, [200, 333], 333, 3, 3),  # GQA 1
    # a fixed capacity (as a CUDA graph would launch it) far above the context: 8 splits of
    # which the sequence fills two
    (torch.bfloat16, 4, 1, 64, 16, [100], 1024, 8, 8),
])
def test_split_kv_decode_matches_float64_reference(dtype, num_heads, num_kv_heads, head_dim,
                                                   block_size, seq_lens, max_seq_len,
                                                   num_splits, expected_splits):
    q, k_cache, v_cache, tables = _random_case(dtype, num_heads, num_kv_heads, head_dim,
                                               block_size, seq_lens, [1] * len(seq_lens))
    assert triton_paged.plan_decode_splits(len(seq_lens), num_kv_heads, max_seq_len, DEVICE,
                                           num_splits) == expected_splits
    seq_lens_tensor = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    ref = _reference(q, k_cache, v_cache, tables, seq_lens, [1] * len(seq_lens), scale)
    split = triton_paged.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens_tensor,
                                                max_seq_len, scale, num_splits=num_splits)
    single = triton_paged.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens_tensor,
                                                 max_seq_len, scale, num_splits=1)
    assert _relative_error(split, ref) < TOLERANCE[dtype]
    assert _relative_error(single, ref) < TOLERANCE[dtype]


def test_split_count_grows_only_when_the_batch_cannot_fill_the_gpu():
    # Batch 1 at 8 kv heads on 132 SMs: 33 splits fill every SM twice (32 by whole tiles).
    assert triton_paged.choose_num_splits(1, 8, 8192, num_sms=132) == 33
    assert triton_paged.plan_decode_splits(1, 8, 8192, DEVICE, num_splits=33) == 32
    assert triton_paged.choose_num_splits(16, 8, 8192, num_sms=132) == 3
    # 264 (sequence, kv head) programs already fill every SM twice: the single-pass kernel.
    assert triton_paged.choose_num_splits(33, 8, 8192, num_sms=132) == 1
    assert triton_paged.choose_num_splits(256, 8, 8192, num_sms=132) == 1
    assert triton_paged.choose_num_splits(1, 8, 300, num_sms=132) == 3  # >= 128 keys per split
    assert triton_paged.choose_num_splits(1, 8, 100, num_sms=132) == 1
    assert triton_paged.choose_num_splits(1, 1, 1 << 20, num_sms=132) == 64  # at most 64
    # 4 splits of 300 keys round up to whole 64-key tiles: 128 keys each, so only 3 are needed.
    assert triton_paged.plan_decode_splits(1, 8, 300, DEVICE, num_splits=4) == 3


def test_factory_picks_triton_only_for_a_cuda_cache():
    gpu_kv = torch.zeros(1, 2, 4, 2, 16, 64, device=DEVICE)
    with CpuAttentionPool(1) as pool:
        backend = make_device_attention(gpu_kv, 1.0, pool)
    expected = TritonPagedAttention if DEVICE.type == "cuda" else NativeCpuPagedAttention
    assert type(backend) is expected
