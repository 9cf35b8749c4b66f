"""Bad input to the CPU attention kernel raises a clear Python exception, never a crash."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool, append_kv, set_flag, wait_flag
from cpu_attention_reference import make_case


@pytest.fixture(scope="module")
def pool():
    with CpuAttentionPool(2) as shared_pool:
        yield shared_pool


def base_arguments() -> dict[str, object]:
    case = make_case([20, 33], num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    out, lse = case.out_and_lse()
    return dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache,
                block_tables=case.block_tables, seq_lens=case.seq_lens, out=out, lse=lse)


def bad_block_table(arguments):
    arguments["block_tables"][1, 1] = arguments["k_cache"].shape[0]


def negative_block_id(arguments):
    arguments["block_tables"][0, 0] = -1


def zero_length(arguments):
    arguments["seq_lens"][1] = 0


def too_long(arguments):
    arguments["seq_lens"][0] = arguments["block_tables"].shape[1] * 16 + 1


def slot_out_of_range(arguments):
    arguments.update(new_k=torch.zeros(2, 2, 64), new_v=torch.zeros(2, 2, 64),
                     slot_mapping=torch.tensor([0, 10**6]))


CASES = {
    "q dtype differs from cache": (TypeError, "q must be",
                                   lambda a: a.update(q=a["q"].to(torch.bfloat16))),
    "unsupported dtype": (TypeError, "KV cache dtype", lambda a: a.update(
        k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double())),
    "q rank": (ValueError, "q must have 3 dimensions", lambda a: a.update(q=a["q"][0])),
    "head_dim mismatch": (ValueError, "head_dim", lambda a: a.update(q=a["q"][..., :32].clone())),
    "non-contiguous cache": (ValueError, "k_cache must be contiguous", lambda a: a.update(
        k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3))),
    "block table dtype": (TypeError, "block_tables must be torch.int32", lambda a: a.update(
        block_tables=a["block_tables"].long())),
    "lse shape": (ValueError, "lse must have shape", lambda a: a.update(lse=a["lse"][:1])),
    "not a tensor": (TypeError, "seq_lens must be a torch.Tensor",
                     lambda a: a.update(seq_lens=[20, 33])),
    "block id past the cache": (ValueError, r"block_tables\[1, 1\]", bad_block_table),
    "negative block id": (ValueError, r"block_tables\[0, 0\] = -1", negative_block_id),
    "empty context": (ValueError, r"seq_lens\[1\] = 0", zero_length),
    "context longer than its table": (ValueError, "longer than its block table", too_long),
    "slot out of range": (ValueError, r"slot_mapping\[1\]", slot_out_of_range),
    "partial append": (ValueError, "given together",
                       lambda a: a.update(new_k=torch.zeros(2, 2, 64))),
    "flag dtype": (TypeError, "ready_flag must be torch.int64",
                   lambda a: a.update(ready_flag=torch.zeros(1, dtype=torch.int32))),
    "bad scale": (ValueError, "scale", lambda a: a.update(scale=float("nan"))),
    # Rows may be strided (views of a fused q|k|v buffer), a row's heads may not.
    "q heads not contiguous": (ValueError, "heads contiguously", lambda a: a.update(
        q=a["q"].transpose(1, 2).contiguous().transpose(1, 2))),
    "q rows overlapping": (ValueError, "rows not overlapping", lambda a: a.update(
        q=a["q"].flatten()[:8 * 64 + 64].as_strided((2, 8, 64), (64, 64, 1)))),
    "new_k and new_v strides differ": (ValueError, "same row stride", lambda a: a.update(
        new_k=torch.zeros(2, 4, 64)[:, :2], new_v=torch.zeros(2, 2, 64),
        slot_mapping=torch.tensor([0, 1]))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises(pool, name):
    error, message, corrupt = CASES[name]
    arguments = base_arguments()
    corrupt(arguments)
    with pytest.raises(error, match=message):
        pool.decode(**arguments)


def test_padding_past_the_context_may_hold_any_value(pool):
    arguments = base_arguments()
    arguments["block_tables"][0, -1] = -7  # seq 0 uses 2 blocks; the last entry is padding
    pool.decode(**arguments)


def test_kernel_rejects_bad_lengths_even_without_value_checks(pool):
    arguments = base_arguments()
    too_long(arguments)
    with pytest.raises(ValueError, match="capacity"):
        pool.decode(**arguments, check_values=False)


def test_cuda_tensors_are_rejected(pool):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    arguments = base_arguments()
    arguments["q"] = arguments["q"].cuda()
    with pytest.raises(ValueError, match="CPU tensors"):
        pool.decode(**arguments)


def test_append_and_flag_helpers_validate():
    cache = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError, match="outside the KV cache"):
        append_kv(cache, cache.clone(), torch.tensor([64]), torch.zeros(1, 2, 64),
                  torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="exactly one"):
        set_flag(torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="non-negative"):
        wait_flag(torch.zeros(1, dtype=torch.int64), 1, timeout_s=-1.0)
    with pytest.raises(ValueError, match="num_threads"):
        CpuAttentionPool(0)
