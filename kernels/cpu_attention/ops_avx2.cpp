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
  static constexpr int kAccumulateRegs = 8;  // of 16 registers: the rest hold v and p

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
  // Exactly kWidth elements, no tail handling (the hot loops' common case).
  template <DType kType>
  APEX_TARGET static Reg load_full(const void* base, int64_t index) {
    if constexpr (kType == DType::kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + index);
    } else {
      const __m128i half = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + index));
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

// ---- q . k over tiles of 8 tokens ----------------------------------------------------------
// The tile's keys are widened to float32 once (into L1) and every query row of the group then
// streams them with one FMA per 8 elements; 8 per-token accumulators are summed by one
// transpose-and-add tree into a register of 8 scores, instead of a horizontal reduction per
// token per row. Rows are kPadded floats apart (head_dim rounded up to 8, zero-filled), so
// every load is a full vector.
constexpr int kTileTokens = 8;
constexpr int kMaxTileHeadDim = 256;

inline int padded_dim(int head_dim) { return (head_dim + 7) & ~7; }

// q rows in kType -> float32 rows padded_dim(head_dim) apart, zeros past head_dim.
template <DType kType>
void padded_rows(const void* q, int num_rows, int head_dim, float* prepared) {
  const int stride = padded_dim(head_dim);
  for (int g = 0; g < num_rows; ++g)
    for (int d = 0; d < stride; ++d)
      prepared[int64_t(g) * stride + d] =
          d < head_dim ? load_as_float(q, int64_t(g) * head_dim + d, kType) : 0.0f;
}

// lane t = the sum of the lanes of acc[t].
APEX_TARGET inline __m256 reduce_tile(const __m256 (&acc)[kTileTokens]) {
  const __m256 pair01 = _mm256_hadd_ps(acc[0], acc[1]);
  const __m256 pair23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 pair45 = _mm256_hadd_ps(acc[4], acc[5]);
  const __m256 pair67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 low = _mm256_hadd_ps(pair01, pair23);   // per 128-bit half: tokens 0-3
  const __m256 high = _mm256_hadd_ps(pair45, pair67);  // tokens 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                       _mm256_permute2f128_ps(low, high, 0x31));
}

template <int kDim>
APEX_TARGET inline __m256 row_tile(const float* q_row, const float* keys, int runtime_dim) {
  const int dim = kDim > 0 ? kDim : runtime_dim;
  __m256 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm256_setzero_ps();
  for (int d = 0; d < dim; d += 8) {
    const __m256 query = _mm256_loadu_ps(q_row + d);
#pragma GCC unroll 8
    for (int t = 0; t < kTileTokens; ++t)
      acc[t] = _mm256_fmadd_ps(query, _mm256_load_ps(keys + t * dim + d), acc[t]);
  }
  return reduce_tile(acc);
}

// Widens `count` key rows into [kTileTokens, stride] float32; rows past count are zeros.
template <DType kType>
APEX_TARGET inline void widen_tile(const void* k, int count, int head_dim, int stride,
                                   float* widened) {
  if (count == kTileTokens && head_dim == stride) {  // a full tile: one run of elements
#pragma GCC unroll 4
    for (int i = 0; i < kTileTokens * head_dim; i += 8)
      _mm256_store_ps(widened + i, Avx2Vec::load_full<kType>(k, i));
    return;
  }
  for (int t = 0; t < kTileTokens; ++t)
    for (int d = 0; d < stride; d += 8) {
      const __m256 value = t < count ? Avx2Vec::load<kType>(k, int64_t(t) * head_dim + d,
                                                            head_dim - d)
                                     : _mm256_setzero_ps();
      _mm256_store_ps(widened + t * stride + d, value);
    }
}

template <DType kType>
APEX_TARGET void tile_scores(const float* q_f32, const void* k, int num_rows, int num_tokens,
                             int head_dim, float scale, float* scores, RowPrefetch& /*ahead*/) {
  const int stride = padded_dim(head_dim);
  const int64_t element = element_size(kType);
  alignas(32) float widened[kTileTokens * kMaxTileHeadDim];
  const __m256 scale_reg = _mm256_set1_ps(scale);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    widen_tile<kType>(static_cast<const char*>(k) + int64_t(token) * head_dim * element, count,
                      head_dim, stride, widened);
    for (int g = 0; g < num_rows; ++g) {
      const float* q_row = q_f32 + int64_t(g) * stride;
      const __m256 sums = stride == 128 ? row_tile<128>(q_row, widened, stride)
                                        : row_tile<0>(q_row, widened, stride);
      Avx2Vec::store_f32(scores + g * num_tokens + token, count, _mm256_mul_ps(sums, scale_reg));
    }
  }
}

// ---- Direct kernels: head_dim a multiple of 16 (the common case) --------------------------
// Keys and values are widened in registers, 16 elements per step, with no round trip through
// L1. A 256-bit load of 16 bfloat16 gives two float vectors with one shift and one mask: lane
// i of the first is element 2i, of the second element 2i + 1. Dot products don't mind the
// order, so q rows are prepared in that (even, odd) order, and p . v keeps its accumulators in
// it until finish_acc restores the natural order once per task. Other types keep the natural
// order (elements 0-7, then 8-15).
constexpr int kStep = 16;

inline bool direct(int head_dim) { return head_dim % kStep == 0; }

// Makes the compiler keep `value` in a register: folded into each user as a memory operand,
// it would be loaded again per use, and the loads, not the FMAs, would set the pace.
template <class Reg>
APEX_TARGET inline void in_register(Reg& value) {
  asm("" : "+x"(value));
}

template <DType kType>
APEX_TARGET inline void load_step(const void* base, int64_t index, __m256 (&out)[2]) {
  if constexpr (kType == DType::kBFloat16) {
    __m256i raw = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + index));
    in_register(raw);
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xffff0000u))));
  } else {
    out[0] = Avx2Vec::load_full<kType>(base, index);
    out[1] = Avx2Vec::load_full<kType>(base, index + 8);
  }
}

// Position, within a step, of element j in the step's lane order.
template <DType kType>
inline int lane_position(int j) {
  return kType == DType::kBFloat16 ? (j % 2) * 8 + j / 2 : j;
}

// kRows x kTokens accumulators (8 independent FMA chains where the rows allow) over tokens
// [token, token + kTokens): each q vector is loaded once per step and serves every token.
template <DType kType, int kRows, int kTokens>
APEX_TARGET inline void direct_dots(const float* q, const void* k, int token, int head_dim,
                                    __m256 (&out)[kRows][kTileTokens], int slot) {
  __m256 acc[kRows][kTokens];
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) acc[g][t] = _mm256_setzero_ps();
  for (int d = 0; d < head_dim; d += kStep) {
    __m256 keys[kTokens][2];
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t)
      load_step<kType>(k, int64_t(token + t) * head_dim + d, keys[t]);
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        __m256 query = _mm256_loadu_ps(q + int64_t(g) * head_dim + d + half * 8);
        if (kTokens > 1) in_register(query);
#pragma GCC unroll 8
        for (int t = 0; t < kTokens; ++t)
          acc[g][t] = _mm256_fmadd_ps(query, keys[t][half], acc[g][t]);
      }
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) out[g][slot + t] = acc[g][t];
}

template <DType kType, int kRows>
APEX_TARGET void direct_scores_rows(const float* q, const void* k, int num_tokens, int head_dim,
                                    float scale, float* scores, RowPrefetch& ahead) {
  constexpr int kTokens = kRows >= 8 ? 1 : (kRows >= 4 ? 2 : 4);
  const __m256 scale_reg = _mm256_set1_ps(scale);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    __m256 sums[kRows][kTileTokens];
    int t = 0;
    for (; t + kTokens <= count; t += kTokens) {
      ahead.step(kTokens * RowPrefetch::kLinesPerStep);  // 16-bit: a head per 4 rows' tile
      direct_dots<kType, kRows, kTokens>(q, k, token + t, head_dim, sums, t);
    }
    for (; t < count; ++t) direct_dots<kType, kRows, 1>(q, k, token + t, head_dim, sums, t);
    for (; t < kTileTokens; ++t)
      for (int g = 0; g < kRows; ++g) sums[g][t] = _mm256_setzero_ps();
    for (int g = 0; g < kRows; ++g)
      Avx2Vec::store_f32(scores + g * num_tokens + token, count,
                         _mm256_mul_ps(reduce_tile(sums[g]), scale_reg));
  }
}

// p . v over 16 dims [d, d + 16) for kRows rows: the values, widened once per token, serve
// every row (a broadcast from memory is a load, no vector ALU work).
template <DType kType, int kRows>
APEX_TARGET inline void direct_pass(const float* p, const void* v, int num_tokens, int head_dim,
                                    int d, const float* alpha, float* acc) {
  __m256 sums[kRows][2];
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half)
      sums[g][half] = _mm256_mul_ps(_mm256_loadu_ps(acc + int64_t(g) * head_dim + d + half * 8),
                                    _mm256_set1_ps(alpha[g]));
#pragma GCC unroll 2
  for (int t = 0; t < num_tokens; ++t) {
    __m256 values[2];
    load_step<kType>(v, int64_t(t) * head_dim + d, values);
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g) {
      const __m256 weight = _mm256_broadcast_ss(p + g * num_tokens + t);
      sums[g][0] = _mm256_fmadd_ps(weight, values[0], sums[g][0]);
      sums[g][1] = _mm256_fmadd_ps(weight, values[1], sums[g][1]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half)
      _mm256_storeu_ps(acc + int64_t(g) * head_dim + d + half * 8, sums[g][half]);
}

template <DType kType, int kRows>
APEX_TARGET void direct_accumulate_rows(const float* p, const void* v, int num_tokens,
                                        int head_dim, const float* alpha, float* acc) {
  for (int d = 0; d < head_dim; d += kStep)
    direct_pass<kType, kRows>(p, v, num_tokens, head_dim, d, alpha, acc);
}

// Rows in groups of at most 4: 8 accumulators and 2 values per pass fit the 16 registers.
template <DType kType>
APEX_TARGET void direct_accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                                   int head_dim, const float* alpha, float* acc) {
  for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
    direct_accumulate_rows<kType, decltype(rows)::value>(
        p + g * num_tokens, v, num_tokens, head_dim, alpha + g, acc + int64_t(g) * head_dim);
  });
}

template <DType kType>
APEX_TARGET void direct_scores(const float* q, const void* k, int num_rows, int num_tokens,
                               int head_dim, float scale, float* scores, RowPrefetch& ahead) {
  for_row_groups<8>(num_rows, [&](auto rows, int g) APEX_TARGET {
    direct_scores_rows<kType, decltype(rows)::value>(q + int64_t(g) * head_dim, k, num_tokens,
                                                     head_dim, scale, scores + g * num_tokens,
                                                     ahead);
  });
}

// q rows -> float32 rows head_dim apart, each step in its lane order.
template <DType kType>
void lane_order_rows(const void* q, int num_rows, int head_dim, float* prepared) {
  for (int64_t row = 0; row < num_rows; ++row)
    for (int d = 0; d < head_dim; ++d)
      prepared[row * head_dim + d - d % kStep + lane_position<kType>(d % kStep)] =
          load_as_float(q, row * head_dim + d, prepare_q_dtype(kType));
}

// Accumulator rows back from the lane order to the natural one.
template <DType kType>
void finish_acc(float* acc, int num_rows, int head_dim) {
  if (kType != DType::kBFloat16 || !direct(head_dim)) return;
  for (int64_t i = 0; i < int64_t(num_rows) * head_dim; i += kStep) {
    float step[kStep];
    for (int j = 0; j < kStep; ++j) step[j] = acc[i + lane_position<kType>(j)];
    std::memcpy(acc + i, step, sizeof(step));
  }
}

// Head dims past kMaxTileHeadDim (rare) keep the plain layout and loops.
template <DType kType>
void prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  if (direct(head_dim)) {
    lane_order_rows<kType>(q, num_rows, head_dim, prepared);
  } else if (head_dim <= kMaxTileHeadDim) {
    padded_rows<prepare_q_dtype(kType)>(q, num_rows, head_dim, prepared);
  } else {
    rows_to_float<prepare_q_dtype(kType)>(q, num_rows, head_dim, prepared);
  }
}

template <DType kType>
APEX_TARGET void scores(const float* q_f32, const void* k, int num_rows, int num_tokens,
                        int head_dim, float scale, float* out, RowPrefetch& ahead) {
  if (direct(head_dim)) {
    direct_scores<kType>(q_f32, k, num_rows, num_tokens, head_dim, scale, out, ahead);
  } else if (head_dim <= kMaxTileHeadDim) {
    tile_scores<kType>(q_f32, k, num_rows, num_tokens, head_dim, scale, out, ahead);
  } else {
    simd_scores<Avx2Vec, kType>(q_f32, k, num_rows, num_tokens, head_dim, scale, out, ahead);
  }
}

template <DType kType>
APEX_TARGET void accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                            int head_dim, const float* alpha, float* acc) {
  if (direct(head_dim)) {
    direct_accumulate<kType>(p, v, num_rows, num_tokens, head_dim, alpha, acc);
  } else {
    simd_accumulate<Avx2Vec, kType>(p, v, num_rows, num_tokens, head_dim, alpha, acc);
  }
}

template <DType kType>
const KernelOps* avx2_table() {
  static const KernelOps ops{prepare_q<kType>, scores<kType>, simd_softmax<Avx2Vec>,
                             accumulate<kType>, "avx2", finish_acc<kType>};
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
