// AVX2 + FMA kernels (F16C converts float16). Compiled with per-function target attributes,
// so this file builds with the default flags and runs only after select_kernel_ops has checked
// the CPU.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

#define APEX_TARGET __attribute__((target("avx2,fma,f16c")))

namespace apex {
namespace {

struct Avx2Vec {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kAccumulateChunks = 1;  // 16 registers: 8 rows x 1 chunk fit

  APEX_TARGET static Reg zero() { return _mm256_setzero_ps(); }
  APEX_TARGET static Reg set1(float value) { return _mm256_set1_ps(value); }
  APEX_TARGET static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  APEX_TARGET static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  APEX_TARGET static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  APEX_TARGET static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  APEX_TARGET static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  APEX_TARGET static float reduce_add(Reg a) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
  }
  APEX_TARGET static float reduce_max(Reg a) {
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
  }
  // Partial vectors (head_dim or block_size not a multiple of 8) go through a padded copy:
  // AVX2 has no 16-bit masked loads, and these tails are rare and short.
  APEX_TARGET static Reg load_f32(const float* ptr, int count, float fill) {
    if (count >= kWidth) return _mm256_loadu_ps(ptr);
    alignas(32) float padded[kWidth];
    for (int i = 0; i < kWidth; ++i) padded[i] = i < count ? ptr[i] : fill;
    return _mm256_load_ps(padded);
  }
  APEX_TARGET static void store_f32(float* ptr, int count, Reg value) {
    if (count >= kWidth) return _mm256_storeu_ps(ptr, value);
    alignas(32) float padded[kWidth];
    _mm256_store_ps(padded, value);
    for (int i = 0; i < count; ++i) ptr[i] = padded[i];
  }
  template <DType kType>
  APEX_TARGET static Reg load(const void* base, int64_t index, int count) {
    if constexpr (kType == DType::kFloat32) {
      return load_f32(static_cast<const float*>(base) + index, count, 0.0f);
    } else {
      const uint16_t* source = static_cast<const uint16_t*>(base) + index;
      __m128i half;
      if (count >= kWidth) {
        half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
      } else {
        alignas(16) uint16_t padded[kWidth] = {};
        std::memcpy(padded, source, sizeof(uint16_t) * (count > 0 ? count : 0));
        half = _mm_load_si128(reinterpret_cast<const __m128i*>(padded));
      }
      if constexpr (kType == DType::kBFloat16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
      else
        return _mm256_cvtph_ps(half);
    }
  }
  // Same polynomial as the AVX-512 version; 2^n is built in the exponent field directly.
  APEX_TARGET static Reg exp(Reg x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const Reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    Reg poly = _mm256_set1_ps(1.0f / 720.0f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 120.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 24.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f / 6.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(0.5f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0f));
    const __m256i exponent =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
  }
};

#include "ops_simd.inc"

template <DType kType>
const KernelOps* avx2_table() {
  static const KernelOps ops{rows_to_float<kType>, simd_scores<Avx2Vec, kType>,
                             simd_softmax<Avx2Vec>, simd_accumulate<Avx2Vec, kType>, "avx2"};
  return &ops;
}

}  // namespace

const KernelOps* avx2_kernel_ops(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return avx2_table<DType::kFloat32>();
    case DType::kBFloat16:
      return avx2_table<DType::kBFloat16>();
    default:
      return avx2_table<DType::kFloat16>();
  }
}

}  // namespace apex
#endif  // __x86_64__
