"""The native kernel over an 8-bit (int8 + per-token scale) KV cache, on every ISA, against the
float64 reference: exactly (to float32 rounding) on the dequantized cache, and within the
quantization error of the original one; appends quantize bit-identically to kv_cache/quantized."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool, append_kv, runs_isa
from apex_grpc.kv_cache.quantized import dequantize_rows, quantize_rows
from cpu_attention_reference import (PagedCase, assert_close_to_reference, make_case,
                                     reference_decode)

Q_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Kernel sets whose q . k quantizes q per row to int8 and multiplies integers: the levels
# each side of zero (7 bits on avx2, where VPMADDUBSW's int16 pair sums must not saturate).
Q_LEVELS = {"avx512vnni": 127, "avx2": 63}
# Bits to which a kernel set's p . v rounds each row's weights, per span of 16 tokens, relative
# to the span's largest: 7 on avx2, 8 on avx512vnni; absent: float32 weights.
WEIGHT_BITS = {"avx2": 7, "avx512vnni": 8}


def dequantized_tolerance(isa: str, q_dtype: torch.dtype) -> float:
    """Relative error allowed against the float64 reference on the dequantized cache: float32
    rounding (1e-5), or q/out dtype rounding for 16-bit q. Rounding a weight to b bits moves it
    by at most half a step: 1 / (2 (2^b - 1)) of its span's largest weight m. Those errors are
    uniform and independent, so they add in quadrature: an rms of 1 / ((2^b - 1) sqrt(12))
    times rho = sqrt(sum_t m_t^2 |v_t|^2) / |sum_t p_t v_t|, which is 1.3-2.1 for these
    unit-normal cases; 3 sigma at rho = 2, plus float32's 1e-5. 15 bits: 6e-5 (a float64 model
    of the rounding gave 0.8-1.7e-5 over these cases, the kernel 1.0-1.3e-5); 8 bits: 6.8e-3
    (the kernel 1.3e-3)."""
    if q_dtype != torch.float32:
        return 1e-2
    if isa not in WEIGHT_BITS:
        return 1e-5
    rms = 1.0 / ((2 ** WEIGHT_BITS[isa] - 1) * 12 ** 0.5)
    return 3 * 2 * rms + 1e-5


def int8_isas() -> list[str]:
    """Every kernel set this CPU runs for int8 KV (avx512bf16 has none of its own)."""
    return [isa for isa in ("avx512vnni", "avx512", "avx2", "scalar") if runs_isa(isa)]


def quantized(case: PagedCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k, k_scales = quantize_rows(case.k_cache)
    v, v_scales = quantize_rows(case.v_cache)
    return k, v, k_scales, v_scales


def dequantized_case(case: PagedCase, k, v, k_scales, v_scales, isa: str = "") -> PagedCase:
    """The float64 problem the kernel solves exactly: the cache dequantized, and q quantized
    per row as well for kernel sets with integer q . k (Q_LEVELS)."""
    q = (dequantize_rows(*quantize_rows(case.q, Q_LEVELS[isa]), torch.float64)
         if isa in Q_LEVELS else case.q)
    return PagedCase(q, dequantize_rows(k, k_scales, torch.float64),
                     dequantize_rows(v, v_scales, torch.float64), case.block_tables,
                     case.seq_lens)


def run_int8(pool: CpuAttentionPool, case: PagedCase, k, v, k_scales, v_scales, **options):
    out, lse = case.out_and_lse()
    handle = pool.submit_decode(case.q, k, v, case.block_tables, case.seq_lens, out, lse,
                                k_scales=k_scales, v_scales=v_scales, **options)
    return pool.wait(handle)


def assert_matches_dequantized(out, lse, case: PagedCase, tolerance: float) -> None:
    expected_out, expected_lse = reference_decode(case)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    relative = (out.double() - expected_out).norm() / expected_out.norm()
    assert relative < tolerance, f"relative error {relative:.3e}"
    assert (lse.double() - expected_lse).abs().max() < 1e-4


@pytest.mark.parametrize("isa", int8_isas())
@pytest.mark.parametrize("q_dtype", Q_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,group",
                         [(128, 4), (64, 8), (36, 7), (80, 1), (264, 2), (64, 20)])
def test_int8_kv_matches_float64_reference(isa, q_dtype, head_dim, group):
    """Odd head dims and groups reach every tail path (264: past the tiled loops' 256; a
    group of 20: past the 16 rows one pass of the VNNI kernel carries); contexts leave partial
    tiles and blocks and one is long enough to be split and merged."""
    case = make_case([1, 15, 17, 300, 3000], num_heads=2 * group, num_kv_heads=2,
                     head_dim=head_dim, dtype=q_dtype, seed=head_dim + group)
    k, v, k_scales, v_scales = quantized(case)
    with CpuAttentionPool(2, isa=isa) as pool:
        assert pool.isa(torch.int8) == isa
        out, lse = run_int8(pool, case, k, v, k_scales, v_scales)
    # On the dequantized cache the kernel is exact up to float32 (and q/out dtype) rounding,
    # and the weights' rounding where p . v multiplies integers.
    assert_matches_dequantized(out, lse, dequantized_case(case, k, v, k_scales, v_scales, isa),
                               dequantized_tolerance(isa, q_dtype))
    # Against the unquantized cache: the 8-bit error (~1% of a row's range per element) stays
    # small after the softmax average.
    expected_out, _ = reference_decode(case)
    relative = (out.double() - expected_out).norm() / expected_out.norm()
    assert relative < 3e-2, f"int8 KV drifts {relative:.3e} from the unquantized reference"


def test_quantize_rows_round_trip_and_zero_rows():
    rows = torch.randn(5, 3, 64) * torch.tensor([1e-3, 1.0, 50.0]).view(1, 3, 1)
    rows[0, 0] = 0.0
    q, scales = quantize_rows(rows)
    assert q.dtype == torch.int8 and scales.shape == (5, 3)
    assert int(q[0, 0].abs().max()) == 0 and float(scales[0, 0]) == 0.0
    assert int(q.abs().max()) == 127
    error = (dequantize_rows(q, scales, torch.float32) - rows).abs()
    assert bool((error <= scales.unsqueeze(-1) / 2 + 1e-12).all()), "error beyond half a step"


@pytest.mark.parametrize("q_dtype", Q_DTYPES, ids=str)
def test_fused_append_quantizes_like_quantize_rows(q_dtype):
    """The kernel's append (fused into a decode job, and standalone) writes the same int8 rows
    and scales as quantize_rows, so every writer of the host tier agrees bit for bit."""
    case = make_case([5, 16, 17, 260], num_heads=8, num_kv_heads=2, head_dim=64, dtype=q_dtype)
    k, v, k_scales, v_scales = quantized(case)
    block_size = case.k_cache.shape[2]
    last = case.seq_lens.long() - 1
    blocks = case.block_tables[torch.arange(4), last // block_size].long()
    slot_mapping = blocks * block_size + last % block_size
    new_k = (torch.randn(4, 2, 64) * 3).to(q_dtype)
    new_v = torch.randn(4, 2, 64).to(q_dtype)
    new_k[1, 0] = 0.0  # an all-zero row: scale 0
    fused = [t.clone() for t in (k, v, k_scales, v_scales)]
    with CpuAttentionPool(2) as pool:
        isa = pool.isa(torch.int8)
        out, lse = run_int8(pool, case, *fused, new_k=new_k, new_v=new_v,
                            slot_mapping=slot_mapping)
    separate = [t.clone() for t in (k, v, k_scales, v_scales)]
    append_kv(separate[0], separate[1], slot_mapping, new_k, new_v, k_scales=separate[2],
              v_scales=separate[3])
    for got, other in zip(fused, separate):
        assert torch.equal(got, other)
    for rows, cache, scales in ((new_k, fused[0], fused[2]), (new_v, fused[1], fused[3])):
        expected_q, expected_scales = quantize_rows(rows)
        slot_blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        assert torch.equal(cache[slot_blocks, :, offsets], expected_q)
        assert torch.equal(scales[slot_blocks, :, offsets], expected_scales)
    written = dequantized_case(case, *fused, isa=isa)
    assert_matches_dequantized(out, lse, written, dequantized_tolerance(isa, q_dtype))


def test_int8_cache_needs_scales_and_a_float_q():
    case = make_case([20], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    k, v, k_scales, v_scales = quantized(case)
    out, lse = case.out_and_lse()
    with CpuAttentionPool(1) as pool:
        with pytest.raises(ValueError, match="needs k_scales"):
            pool.submit_decode(case.q, k, v, case.block_tables, case.seq_lens, out, lse)
        with pytest.raises(ValueError, match="v_scales must have shape"):
            pool.submit_decode(case.q, k, v, case.block_tables, case.seq_lens, out, lse,
                               k_scales=k_scales, v_scales=v_scales[:, :1].contiguous())
        with pytest.raises(TypeError, match="q must be float32, bfloat16 or float16"):
            pool.submit_decode(torch.zeros(1, 4, 64, dtype=torch.int8), k, v,
                               case.block_tables, case.seq_lens, out, lse, k_scales=k_scales,
                               v_scales=v_scales)
        with pytest.raises(ValueError, match="belong to an int8 KV cache only"):
            pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                               case.seq_lens, out, lse, k_scales=k_scales, v_scales=v_scales)


def test_bf16_results_unchanged_by_the_int8_support():
    """The default (16-bit) path still matches its reference exactly as before."""
    case = make_case([33, 700], num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    with CpuAttentionPool(2) as pool:
        out, lse = case.out_and_lse()
        pool.wait(pool.submit_decode(case.q, case.k_cache, case.v_cache, case.block_tables,
                                     case.seq_lens, out, lse))
    assert_close_to_reference(out, lse, case)
