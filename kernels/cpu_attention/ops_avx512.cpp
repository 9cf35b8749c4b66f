// AVX-512 kernels (F/BW/VL/DQ + FMA); the bfloat16 dot-product set is in ops_avx512_bf16.cpp.
// Compiled with per-function target attributes, so this file builds with the default flags and
// its functions only run after select_kernel_ops has checked the CPU.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
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

namespace apex {
namespace {

#include "avx512_tiles.h"

struct Avx512Vec {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kAccumulateRegs = 16;  // of 32 registers: the rest hold v and p

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
    } else if constexpr (kType == DType::kInt8) {
      const __m128i bytes =
          _mm_maskz_loadu_epi8(mask(count), static_cast<const int8_t*>(base) + index);
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    } else {
      const __m256i half =
          _mm256_maskz_loadu_epi16(mask(count), static_cast<const uint16_t*>(base) + index);
      if constexpr (kType == DType::kBFloat16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
      else
        return _mm512_cvtph_ps(half);
    }
  }
  // Exactly kWidth elements, no mask (the hot loops' common case).
  template <DType kType>
  APEX_TARGET static Reg load_full(const void* base, int64_t index) {
    if constexpr (kType == DType::kFloat32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + index);
    } else if constexpr (kType == DType::kInt8) {
      const __m128i bytes = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + index));
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    } else {
      const __m256i half = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + index));
      if constexpr (kType == DType::kBFloat16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
      else
        return _mm512_cvtph_ps(half);
    }
  }
  APEX_TARGET static Reg exp(Reg x) { return exp_lanes(x); }
};

#include "ops_simd.inc"

// kHeadDim > 0 fixes head_dim at compile time (the common 64 and 128): q stays in registers
// and every key row is a constant offset from one pointer. kFull: all 16 tokens are present;
// otherwise tokens >= num_tokens keep a zero accumulator and are never read (the rows past a
// context may hold any bits).
template <DType kType, int kHeadDim, bool kFull>
APEX_TARGET inline __m512 f32_row_tile(const float* q_row, const void* k, int num_tokens,
                                       int runtime_head_dim, RowPrefetch& ahead) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  __m512 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_ps();
  for (int d = 0; d < head_dim; d += 16) {
    const int count = head_dim - d;
    const __m512 query = Avx512Vec::load_f32(q_row + d, count, 0.0f);
    ahead.step(RowPrefetch::kLinesPerStep / 2);  // a 16-bit head over 4 rows' 8 steps each
#pragma GCC unroll 16
    for (int t = 0; t < kTileTokens; ++t) {
      if (!kFull && t >= num_tokens) break;
      const __m512 key = Avx512Vec::load<kType>(k, int64_t(t) * head_dim + d, count);
      acc[t] = _mm512_fmadd_ps(query, key, acc[t]);
    }
  }
  return reduce_tile(acc);
}

// One tile of 16 tokens (or fewer, at a context's end) against every query row of the group;
// scores[g * row_stride + t] = scale * dot(q[g], k[t]).
template <DType kType, int kHeadDim>
APEX_TARGET void tile_rows(const float* q_f32, const void* k, int num_rows, int num_tokens,
                           int head_dim, float scale, float* scores, int row_stride,
                           RowPrefetch& ahead) {
  const __m512 scale_reg = _mm512_set1_ps(scale);
  for (int g = 0; g < num_rows; ++g) {
    const float* q_row = q_f32 + int64_t(g) * head_dim;
    const __m512 sums = num_tokens == kTileTokens
                            ? f32_row_tile<kType, kHeadDim, true>(q_row, k, num_tokens, head_dim,
                                                                  ahead)
                            : f32_row_tile<kType, kHeadDim, false>(q_row, k, num_tokens, head_dim,
                                                                   ahead);
    _mm512_mask_storeu_ps(scores + g * row_stride, lanes(num_tokens),
                          _mm512_mul_ps(sums, scale_reg));
  }
}

// 16-bit keys of the common head dims are widened to float32 once per tile, not once per query
// row: the rows then read float32 keys from L1.
constexpr int kMaxWidenedHeadDim = 128;

template <DType kType>
APEX_TARGET void widen_tile(const void* k, int count, int head_dim, float* widened) {
  for (int64_t i = 0; i < int64_t(count) * head_dim; i += 16) {
    const int left = int(std::min<int64_t>(16, int64_t(count) * head_dim - i));
    _mm512_mask_storeu_ps(widened + i, lanes(left), Avx512Vec::load<kType>(k, i, left));
  }
}

template <DType kType>
APEX_TARGET void tile_scores(const float* q_f32, const void* k, int num_rows, int num_tokens,
                             int head_dim, float scale, float* scores, RowPrefetch& ahead) {
  const int64_t element = element_size(kType);
  alignas(64) float widened[kTileTokens * kMaxWidenedHeadDim];
  const bool widen = kType != DType::kFloat32 && num_rows > 1 && head_dim <= kMaxWidenedHeadDim;
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    const void* keys = static_cast<const char*>(k) + int64_t(token) * head_dim * element;
    float* tile = scores + token;
    if (widen) {
      widen_tile<kType>(keys, count, head_dim, widened);
      if (head_dim == 128) {
        tile_rows<DType::kFloat32, 128>(q_f32, widened, num_rows, count, head_dim, scale, tile,
                                        num_tokens, ahead);
      } else {
        tile_rows<DType::kFloat32, 0>(q_f32, widened, num_rows, count, head_dim, scale, tile,
                                      num_tokens, ahead);
      }
    } else if (head_dim == 128) {
      tile_rows<kType, 128>(q_f32, keys, num_rows, count, head_dim, scale, tile, num_tokens,
                            ahead);
    } else if (head_dim == 64) {
      tile_rows<kType, 64>(q_f32, keys, num_rows, count, head_dim, scale, tile, num_tokens,
                           ahead);
    } else {
      tile_rows<kType, 0>(q_f32, keys, num_rows, count, head_dim, scale, tile, num_tokens,
                          ahead);
    }
  }
}

template <DType kType>
const KernelOps* avx512_table() {
  static const KernelOps ops{rows_to_float<prepare_q_dtype(kType)>, tile_scores<kType>,
                             simd_softmax<Avx512Vec>,
                             simd_accumulate<Avx512Vec, kType>, "avx512"};
  return &ops;
}

}  // namespace

const KernelOps* avx512_kernel_ops(DType dtype, bool use_bf16_dot) {
  if (dtype == DType::kBFloat16 && use_bf16_dot) return avx512_bf16_kernel_ops();
  switch (dtype) {
    case DType::kFloat32:
      return avx512_table<DType::kFloat32>();
    case DType::kBFloat16:
      return avx512_table<DType::kBFloat16>();
    case DType::kInt8:
      return avx512_table<DType::kInt8>();
    default:
      return avx512_table<DType::kFloat16>();
  }
}

}  // namespace apex
#endif  // __x86_64__
