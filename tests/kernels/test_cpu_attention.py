"""Native CPU paged decode attention against a float64 torch reference, plus its pool,
flag-gated jobs, fused append and boundary validation."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apex_grpc.attention.cpu_kernel import (
    CpuAttentionPool,
    append_kv,
    paged_decode_attention,
    runs_isa,
    set_flag,
    wait_flag,
)
from cpu_attention_reference import (
    PagedCase,
    assert_close_to_reference,
    make_case,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 4 threads on any machine: long contexts are split into parts and merged by log-sum-exp.
NUM_THREADS = 4


@pytest.fixture(scope="module")
def pool():
    with CpuAttentionPool(NUM_THREADS) as shared_pool:
        yield shared_pool


def run(pool: CpuAttentionPool, case: PagedCase, **options) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = case.out_and_lse()
    handle = pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                                case.seq_lens, out, lse, **options)
    return pool.wait(handle)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_matches_reference(pool, dtype, group_size, head_dim):
    num_kv_heads = 2
    case = make_case([1, 15, 17, 300, 5000], num_heads=num_kv_heads * group_size,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                     seed=group_size * 1000 + head_dim)
    out, lse = run(pool, case)
    assert_close_to_reference(out, lse, case)


ISAS = ("avx512bf16", "avx512", "avx2", "scalar")


def skip_unless_cpu_runs(isa: str) -> None:
    """The portable kernels must always load; a vector ISA may be missing from this CPU."""
    if not runs_isa(isa):
        assert isa != "scalar", "the scalar kernels must load on every CPU"
        pytest.skip(f"this CPU lacks {isa}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_isa_matches_reference(isa, dtype):
    skip_unless_cpu_runs(isa)
    case = make_case([3, 40, 700], num_heads=12, num_kv_heads=3, head_dim=80, dtype=dtype,
                     block_size=8)
    with CpuAttentionPool(2, isa=isa) as isa_pool:
        out, lse = run(isa_pool, case)
    assert_close_to_reference(out, lse, case)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [36, 48])
def test_every_isa_tail_paths(isa, block_size, head_dim):
    """Group 7 packs query rows as 4 + 2 + 1; head_dim 36 leaves a partial chunk at every chunk
    width (8, 16, 32), 48 takes the whole-step paths (AVX2's 16-element steps); lengths leave
    partial 16-token tiles and odd tokens for the V pairs."""
    skip_unless_cpu_runs(isa)
    for dtype in DTYPES:
        case = make_case([1, 16, 17, 31, 250], num_heads=21, num_kv_heads=3, head_dim=head_dim,
                         dtype=dtype, block_size=block_size, seed=block_size)
        with CpuAttentionPool(2, isa=isa) as isa_pool:
            out, lse = run(isa_pool, case)
        assert_close_to_reference(out, lse, case)


@pytest.mark.parametrize("num_threads", [1, 3, 16])
def test_task_split_does_not_change_results(num_threads):
    """Few sequences split their kv heads across tasks, many keep every head in one task, long
    contexts split into parts: every plan matches the reference."""
    case = make_case([5, 2000, 40], num_heads=32, num_kv_heads=8, head_dim=64,
                     dtype=torch.bfloat16, seed=num_threads)
    with CpuAttentionPool(num_threads) as split_pool:
        out, lse = run(split_pool, case)
    assert_close_to_reference(out, lse, case)


def test_custom_scale_and_default_pool():
    case = make_case([33, 129], num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    out, lse = paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                      case.seq_lens, scale=0.3)
    assert_close_to_reference(out, lse, case, scale=0.3)


@settings(max_examples=25, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 600), min_size=1, max_size=6),
    num_kv_heads=st.integers(1, 4),
    group_size=st.integers(1, 6),
    head_dim=st.sampled_from([16, 24, 64, 72, 128, 136]),
    block_size=st.sampled_from([1, 5, 16, 32]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(pool, seq_lens, num_kv_heads, group_size, head_dim, block_size, dtype,
                       seed):
    case = make_case(seq_lens, num_heads=num_kv_heads * group_size, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, dtype=dtype, block_size=block_size, seed=seed)
    out, lse = run(pool, case)
    assert_close_to_reference(out, lse, case)


def appended_case(dtype: torch.dtype) -> tuple[PagedCase, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A case whose last token per sequence is still missing from the cache, plus its rows."""
    case = make_case([5, 16, 17, 260], num_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype)
    block_size = case.k_cache.shape[2]
    last = (case.seq_lens.long() - 1)
    blocks = case.block_tables[torch.arange(4), last // block_size].long()
    slot_mapping = blocks * block_size + last % block_size
    new_k = torch.randn(4, 2, 64).to(dtype)
    new_v = torch.randn(4, 2, 64).to(dtype)
    return case, new_k, new_v, slot_mapping


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_append_equals_append_then_attend(pool, dtype):
    fused, new_k, new_v, slot_mapping = appended_case(dtype)
    separate = PagedCase(fused.q, fused.k_cache.clone(), fused.v_cache.clone(),
                         fused.block_tables, fused.seq_lens)
    out, lse = run(pool, fused, new_k=new_k, new_v=new_v, slot_mapping=slot_mapping)
    append_kv(separate.k_cache, separate.v_cache, slot_mapping, new_k, new_v)
    assert torch.equal(fused.k_cache, separate.k_cache)
    assert torch.equal(fused.v_cache, separate.v_cache)
    expected_out, expected_lse = run(pool, separate)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert_close_to_reference(out, lse, separate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_and_new_kv_as_views_of_one_qkv_buffer_equal_contiguous_ones(pool, dtype):
    """The hybrid runtime stages q|k|v rows as the fused projection leaves them: the kernel
    reads q, new_k and new_v as row-strided views of that one buffer."""
    case, new_k, new_v, slot_mapping = appended_case(dtype)
    contiguous = PagedCase(case.q, case.k_cache.clone(), case.v_cache.clone(),
                           case.block_tables, case.seq_lens)
    q_heads, kv_heads = case.q.shape[1], new_k.shape[1]
    qkv = torch.cat((case.q, new_k, new_v), dim=1)
    q, k, v = qkv.split((q_heads, kv_heads, kv_heads), dim=1)
    assert not q.is_contiguous()
    strided = PagedCase(q, case.k_cache.clone(), case.v_cache.clone(), case.block_tables,
                        case.seq_lens)
    out, lse = run(pool, strided, new_k=k, new_v=v, slot_mapping=slot_mapping)
    expected_out, expected_lse = run(pool, contiguous, new_k=new_k, new_v=new_v,
                                     slot_mapping=slot_mapping)
    assert torch.equal(strided.k_cache, contiguous.k_cache)
    assert torch.equal(strided.v_cache, contiguous.v_cache)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)


def test_jobs_from_many_threads_equal_sequential_results(pool):
    cases = [make_case([7 * i + 1, 300 + i], num_heads=8, num_kv_heads=2, head_dim=64,
                       dtype=torch.bfloat16, seed=i) for i in range(12)]
    expected = [run(pool, case) for case in cases]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def submit_all(offset: int) -> None:
        handles = [(i, *case.out_and_lse()) for i, case in enumerate(cases) if i % 3 == offset]
        jobs = [(i, pool.submit_decode(cases[i].q, cases[i].k_cache, cases[i].v_cache,
                                       cases[i].block_tables, cases[i].seq_lens, out, lse))
                for i, out, lse in handles]
        for i, job in jobs:
            results[i] = pool.wait(job)

    threads = [threading.Thread(target=submit_all, args=(offset,)) for offset in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, (out, lse) in enumerate(expected):
        assert torch.equal(results[i][0], out) and torch.equal(results[i][1], lse)


def test_worker_error_is_raised_at_wait(pool):
    case = make_case([40, 40], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    case.block_tables[1, 2] = case.k_cache.shape[0] + 5  # past the cache: only C++ sees it
    out, lse = case.out_and_lse()
    handle = pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                                case.seq_lens, out, lse, check_values=False)
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 2\]"):
        pool.wait(handle)
    # The pool keeps working after a failed job.
    good = make_case([40], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    assert_close_to_reference(*run(pool, good), good)


def test_flag_gated_job_waits_for_ready_flag_and_sets_done_flag(pool):
    case = make_case([100, 3], num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    ready, done = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    out, lse = case.out_and_lse()
    handle = pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                                case.seq_lens, out, lse, ready_flag=ready, ready_value=7,
                                done_flag=done, done_value=9)
    assert not wait_flag(done, 9, timeout_s=0.05)
    assert not handle.done and torch.isnan(out).all(), "the job ran before its ready flag"
    set_flag(ready, 6)  # below ready_value: still gated
    assert not wait_flag(done, 9, timeout_s=0.02)
    set_flag(ready, 7)
    assert wait_flag(done, 9, timeout_s=10.0)
    assert int(done[0]) == 9
    assert_close_to_reference(*pool.wait(handle), case)


def test_ungated_job_overtakes_a_gated_one(pool):
    gated_case = make_case([20], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    ready = torch.zeros(1, dtype=torch.int64)
    out, lse = gated_case.out_and_lse()
    gated = pool.submit_decode(gated_case.q, gated_case.k_cache, gated_case.v_cache,
                               gated_case.block_tables, gated_case.seq_lens, out, lse,
                               ready_flag=ready, ready_value=1)
    free_case = make_case([50], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    assert_close_to_reference(*run(pool, free_case), free_case)
    assert not gated.done
    set_flag(ready, 1)
    assert_close_to_reference(*pool.wait(gated), gated_case)


def test_close_fails_pending_gated_jobs():
    case = make_case([20], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    closing_pool = CpuAttentionPool(2)
    out, lse = case.out_and_lse()
    done = torch.zeros(1, dtype=torch.int64)
    handle = closing_pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                                        case.seq_lens, out, lse,
                                        ready_flag=torch.zeros(1, dtype=torch.int64),
                                        ready_value=1, done_flag=done, done_value=1)
    closing_pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        closing_pool.wait(handle)
    assert int(done[0]) == 1, "a cancelled job must still release waiters on its done flag"
    with pytest.raises(RuntimeError, match="closed"):
        closing_pool.decode(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens)
