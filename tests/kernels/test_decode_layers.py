"""DecodeLayers (CpuAttentionPool.prepare_decode_layers): a whole step's flag-gated jobs in
one native call give exactly what one submit_decode per layer gives, start only when their
layer's ready flag is raised, and bad input is refused before any job is queued."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool, LayerStaging, set_flag

LAYERS, SEQS, HEADS, KV_HEADS, HEAD_DIM, BLOCK, BLOCKS = 3, 3, 4, 2, 16, 4, 12


@pytest.fixture(scope="module")
def pool():
    with CpuAttentionPool(2) as pool:
        yield pool


def step_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn((LAYERS, 2, BLOCKS, KV_HEADS, BLOCK, HEAD_DIM), generator=gen)
    seq_lens = torch.tensor([5, 1, 9], dtype=torch.int32)  # each including its new token
    block_tables = torch.tensor([[0, 1, 0], [2, 0, 0], [3, 4, 5]], dtype=torch.int32)
    slot_mapping = torch.tensor([1 * BLOCK + 0, 2 * BLOCK + 0, 5 * BLOCK + 0], dtype=torch.int64)

    def buffers() -> LayerStaging:
        return LayerStaging(torch.randn((SEQS, HEADS, HEAD_DIM), generator=gen),
                            torch.randn((SEQS, KV_HEADS, HEAD_DIM), generator=gen),
                            torch.randn((SEQS, KV_HEADS, HEAD_DIM), generator=gen),
                            torch.zeros((SEQS, HEADS, HEAD_DIM)), torch.zeros((SEQS, HEADS)))

    return kv, block_tables, seq_lens, slot_mapping, (buffers(), buffers())


def test_one_call_equals_one_submit_per_layer_and_waits_for_each_ready_flag(pool):
    kv, block_tables, seq_lens, slots, staging = step_inputs(0)
    expected_kv = kv.clone()
    expected = []
    for layer in range(2):  # layers 0 and 1 have their own staging; layer 2 reuses parity 0
        s = staging[layer]
        out, lse = torch.empty_like(s.out), torch.empty_like(s.lse)
        pool.decode(s.q, expected_kv[layer, 0], expected_kv[layer, 1], block_tables, seq_lens,
                    out, lse, new_k=s.new_k, new_v=s.new_v, slot_mapping=slots)
        expected.append((out, lse))

    flags = torch.zeros((2, LAYERS, 1), dtype=torch.int64)
    jobs = pool.prepare_decode_layers(staging, kv, flags).submit(block_tables, seq_lens, slots,
                                                                 7)
    assert len(jobs) == LAYERS
    set_flag(flags[0, 1], 7)
    pool.wait(jobs[1])
    assert int(flags[1, 1]) == 7
    assert not jobs[0].done and int(flags[1, 0]) == 0, "layer 0 ran before its ready flag"
    set_flag(flags[0, 0], 7)
    pool.wait(jobs[0])
    for layer in range(2):
        torch.testing.assert_close(staging[layer].out, expected[layer][0], rtol=0, atol=0)
        torch.testing.assert_close(staging[layer].lse, expected[layer][1], rtol=0, atol=0)
        torch.testing.assert_close(kv[layer], expected_kv[layer], rtol=0, atol=0)
    set_flag(flags[0, 2], 7)
    pool.wait(jobs[2])
    assert int(flags[1, 2]) == 7


@pytest.mark.parametrize("problem, match", [
    ("flags", "flags must have shape"),
    ("kv", "kv_cache must be contiguous"),
    ("seq_lens", r"seq_lens\[1\] = 0"),
    ("block_tables", "block_tables has 2 rows for 3 sequences"),
    ("odd_staging", "out must have shape"),
])
def test_bad_input_is_refused_before_any_job_runs(pool, problem, match):
    kv, block_tables, seq_lens, slots, staging = step_inputs(1)
    flags = torch.zeros((2, LAYERS, 1), dtype=torch.int64)
    if problem == "flags":
        flags = torch.zeros((2, LAYERS - 1, 1), dtype=torch.int64)
    elif problem == "kv":
        kv = kv.transpose(0, 1)
    elif problem == "seq_lens":
        seq_lens = torch.tensor([5, 0, 9], dtype=torch.int32)
    elif problem == "block_tables":
        block_tables = block_tables[:2]
    else:
        staging = (staging[0], LayerStaging(staging[1].q, staging[1].new_k, staging[1].new_v,
                                            staging[1].out[:2], staging[1].lse))
    with pytest.raises((ValueError, TypeError), match=match):
        pool.prepare_decode_layers(staging, kv, flags).submit(block_tables, seq_lens, slots, 1)
    # The pool still serves the next step.
    kv, block_tables, seq_lens, slots, staging = step_inputs(2)
    flags = torch.zeros((2, LAYERS, 1), dtype=torch.int64)
    flags[0].fill_(1)
    for job in pool.prepare_decode_layers(staging, kv, flags).submit(block_tables, seq_lens,
                                                                     slots, 1):
        pool.wait(job)
    assert bool((flags[1] == 1).all())


def test_a_bounded_wait_on_a_job_still_gated_times_out_then_the_job_completes(pool):
    kv, block_tables, seq_lens, _, (staging, _) = step_inputs(2)
    ready = torch.zeros(1, dtype=torch.int64)
    handle = pool.submit_decode(staging.q, kv[0, 0], kv[0, 1], block_tables, seq_lens,
                                staging.out, staging.lse, ready_flag=ready, ready_value=1)
    with pytest.raises(TimeoutError, match="still running after 0.1 s"):
        pool.wait(handle, timeout_s=0.1)
    set_flag(ready, 1)
    out, _ = pool.wait(handle, timeout_s=10.0)
    assert bool(out.abs().sum() > 0)
