// AVX-512 kernels (F/BW/VL/DQ + FMA), plus bfloat16 dot products with AVX512-BF16. Compiled
// with per-function target attributes, so this file builds with the default flags and its
// functions only run after select_kernel_ops has checked the CPU.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed results with _mm512_undefined_*(); once inlined, its own flow
// analysis reports those as uninitialised. The values are fully overwritten.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define APEX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define APEX_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace apex {
namespace {

struct Avx512Vec {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kAccumulateChunks = 2;  // 32 registers: 8 rows x 2 chunks fit

  APEX_TARGET static __mmask16 mask(int count) {
    return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u);
  }
  APEX_TARGET static Reg zero() { return _mm512_setzero_ps(); }
  APEX_TARGET static Reg set1(float value) { return _mm512_set1_ps(value); }
  APEX_TARGET static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  APEX_TARGET static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  APEX_TARGET static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  APEX_TARGET static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  APEX_TARGET static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  APEX_TARGET static float reduce_add(Reg a) { return _mm512_reduce_add_ps(a); }
  APEX_TARGET static float reduce_max(Reg a) { return _mm512_reduce_max_ps(a); }
  APEX_TARGET static Reg load_f32(const float* ptr, int count, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(count), ptr);
  }
  APEX_TARGET static void store_f32(float* ptr, int count, Reg value) {
    _mm512_mask_storeu_ps(ptr, mask(count), value);
  }
  template <DType kType>
  APEX_TARGET static Reg load(const void* base, int64_t index, int count) {
    if constexpr (kType == DType::kFloat32) {
      return _mm512_maskz_loadu_ps(mask(count), static_cast<const float*>(base) + index);
    } else {
      const __m256i half =
          _mm256_maskz_loadu_epi16(mask(count), static_cast<const uint16_t*>(base) + index);
      if constexpr (kType == DType::kBFloat16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
      else
        return _mm512_cvtph_ps(half);
    }
  }
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 Taylor polynomial
  // (relative error ~1e-7). x is clamped at -87 so 2^n stays a normal float.
  APEX_TARGET static Reg exp(Reg x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const Reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    Reg poly = _mm512_set1_ps(1.0f / 720.0f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(poly, n);
  }
};

#include "ops_simd.inc"

// bfloat16 q . k with VDPBF16PS: 32 products per instruction, pairs summed in float32.
template <int kRows>
APEX_TARGET_BF16 inline void bf16_dot_rows(const uint16_t* q, const uint16_t* k, int num_tokens,
                                           int head_dim, float scale, float* scores) {
  for (int t = 0; t < num_tokens; ++t) {
    __m512 sums[kRows];
    for (int g = 0; g < kRows; ++g) sums[g] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d += 32) {
      const int left = head_dim - d;
      const __mmask32 mask = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
      const __m512i key = _mm512_maskz_loadu_epi16(mask, k + int64_t(t) * head_dim + d);
      for (int g = 0; g < kRows; ++g) {
        const __m512i query = _mm512_maskz_loadu_epi16(mask, q + int64_t(g) * head_dim + d);
        sums[g] = _mm512_dpbf16_ps(sums[g], (__m512bh)query, (__m512bh)key);
      }
    }
    for (int g = 0; g < kRows; ++g)
      scores[g * num_tokens + t] = _mm512_reduce_add_ps(sums[g]) * scale;
  }
}

APEX_TARGET_BF16 void bf16_dot_scores(const void* q_raw, const float* /*q_f32*/, const void* k,
                                      int num_rows, int num_tokens, int head_dim, float scale,
                                      float* scores) {
  const auto* q = static_cast<const uint16_t*>(q_raw);
  const auto* keys = static_cast<const uint16_t*>(k);
  for (int g = 0; g < num_rows;) {
    const int left = num_rows - g;
    const uint16_t* q_rows = q + int64_t(g) * head_dim;
    float* score_rows = scores + g * num_tokens;
    if (left >= 8) {
      bf16_dot_rows<8>(q_rows, keys, num_tokens, head_dim, scale, score_rows);
      g += 8;
    } else if (left >= 4) {
      bf16_dot_rows<4>(q_rows, keys, num_tokens, head_dim, scale, score_rows);
      g += 4;
    } else if (left >= 2) {
      bf16_dot_rows<2>(q_rows, keys, num_tokens, head_dim, scale, score_rows);
      g += 2;
    } else {
      bf16_dot_rows<1>(q_rows, keys, num_tokens, head_dim, scale, score_rows);
      g += 1;
    }
  }
}

template <DType kType>
const KernelOps* avx512_table() {
  static const KernelOps ops{simd_scores<Avx512Vec, kType>, simd_softmax_step<Avx512Vec>,
                             simd_accumulate<Avx512Vec, kType>, "avx512"};
  return &ops;
}

}  // namespace

const KernelOps* avx512_kernel_ops(DType dtype, bool use_bf16_dot) {
  if (dtype == DType::kBFloat16 && use_bf16_dot) {
    static const KernelOps ops{bf16_dot_scores, simd_softmax_step<Avx512Vec>,
                               simd_accumulate<Avx512Vec, DType::kBFloat16>, "avx512bf16"};
    return &ops;
  }
  switch (dtype) {
    case DType::kFloat32:
      return avx512_table<DType::kFloat32>();
    case DType::kBFloat16:
      return avx512_table<DType::kBFloat16>();
    default:
      return avx512_table<DType::kFloat16>();
  }
}

}  // namespace apex
#endif  // __x86_64__
