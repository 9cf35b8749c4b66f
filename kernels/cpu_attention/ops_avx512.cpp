// AVX-512 kernels (F/BW/VL/DQ + FMA), plus bfloat16 dot products with AVX512-BF16. Compiled
// with per-function target attributes, so this file builds with the default flags and its
// functions only run after select_kernel_ops has checked the CPU.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// ---- q . k for up to 16 tokens at once --------------------------------------------------------
// One query row against a tile of up to 16 keys: 16 independent accumulators (vertical FMAs
// over head_dim), then one transpose-and-add tree turns them into one register holding the 16
// scores in token order. That is ~3 shuffles/adds per token instead of a full horizontal
// reduction (and its latency chain) per token per row.

constexpr int kTileTokens = 16;

// sums[t] = acc[t][0] + ... + acc[t][15], returned as lane t.
APEX_TARGET inline __m512 reduce_tile(__m512 (&acc)[kTileTokens]) {
  __m512 pairs[8];  // per 128-bit lane: halves of tokens 2i and 2i+1, interleaved
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  __m512 quads[4];  // per 128-bit lane: that lane's partial sums of tokens 4i..4i+3
  for (int i = 0; i < 4; ++i) {
    const __m512d low = _mm512_castps_pd(pairs[2 * i]);
    const __m512d high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
  __m512 halves[2];  // 128-bit lane pairs summed: lanes of quads 2i and 2i+1
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

APEX_TARGET inline __mmask16 lanes(int count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1u);
}

// kHeadDim > 0 fixes head_dim at compile time (the common 64 and 128): q stays in registers
// and every key row is a constant offset from one pointer. kFull: all 16 tokens are present;
// otherwise tokens >= num_tokens keep a zero accumulator and are never read (the rows past a
// context may hold any bits).
template <DType kType, int kHeadDim, bool kFull>
APEX_TARGET inline __m512 f32_row_tile(const float* q_row, const void* k, int num_tokens,
                                       int runtime_head_dim) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  __m512 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_ps();
  for (int d = 0; d < head_dim; d += 16) {
    const int count = head_dim - d;
    const __m512 query = Avx512Vec::load_f32(q_row + d, count, 0.0f);
#pragma GCC unroll 16
    for (int t = 0; t < kTileTokens; ++t) {
      if (!kFull && t >= num_tokens) break;
      const __m512 key = Avx512Vec::load<kType>(k, int64_t(t) * head_dim + d, count);
      acc[t] = _mm512_fmadd_ps(query, key, acc[t]);
    }
  }
  return reduce_tile(acc);
}

// Same with VDPBF16PS: 32 bfloat16 products per instruction, q used as stored (exact).
template <int kHeadDim, bool kFull>
APEX_TARGET_BF16 inline __m512 bf16_row_tile(const uint16_t* q_row, const uint16_t* k,
                                             int num_tokens, int runtime_head_dim) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  __m512 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_ps();
  for (int d = 0; d < head_dim; d += 32) {
    const int left = head_dim - d;
    const __mmask32 mask = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
    const __m512bh query = (__m512bh)_mm512_maskz_loadu_epi16(mask, q_row + d);
#pragma GCC unroll 16
    for (int t = 0; t < kTileTokens; ++t) {
      if (!kFull && t >= num_tokens) break;
      const __m512i key = _mm512_maskz_loadu_epi16(mask, k + int64_t(t) * head_dim + d);
      acc[t] = _mm512_dpbf16_ps(acc[t], query, (__m512bh)key);
    }
  }
  return reduce_tile(acc);
}

// One tile of 16 tokens (or fewer, at a context's end) against every query row of the group;
// scores[g * row_stride + t] = scale * dot(q[g], k[t]).
template <DType kType, bool kDot, int kHeadDim>
APEX_TARGET_BF16 void tile_rows(const void* q_raw, const float* q_f32, const void* k, int num_rows,
                                int num_tokens, int head_dim, float scale, float* scores,
                                int row_stride) {
  const __m512 scale_reg = _mm512_set1_ps(scale);
  for (int g = 0; g < num_rows; ++g) {
    __m512 sums;
    if constexpr (kDot) {
      const auto* q_row = static_cast<const uint16_t*>(q_raw) + int64_t(g) * head_dim;
      const auto* keys = static_cast<const uint16_t*>(k);
      sums = num_tokens == kTileTokens
                 ? bf16_row_tile<kHeadDim, true>(q_row, keys, num_tokens, head_dim)
                 : bf16_row_tile<kHeadDim, false>(q_row, keys, num_tokens, head_dim);
    } else {
      const float* q_row = q_f32 + int64_t(g) * head_dim;
      sums = num_tokens == kTileTokens
                 ? f32_row_tile<kType, kHeadDim, true>(q_row, k, num_tokens, head_dim)
                 : f32_row_tile<kType, kHeadDim, false>(q_row, k, num_tokens, head_dim);
    }
    _mm512_mask_storeu_ps(scores + g * row_stride, lanes(num_tokens),
                          _mm512_mul_ps(sums, scale_reg));
  }
}

template <DType kType, bool kDot>
APEX_TARGET_BF16 void tile_scores(const void* q_raw, const float* q_f32, const void* k,
                                  int num_rows, int num_tokens, int head_dim, float scale,
                                  float* scores) {
  const int64_t element = element_size(kType);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    const void* keys = static_cast<const char*>(k) + int64_t(token) * head_dim * element;
    float* tile = scores + token;
    if (head_dim == 128) {
      tile_rows<kType, kDot, 128>(q_raw, q_f32, keys, num_rows, count, head_dim, scale, tile,
                                  num_tokens);
    } else if (head_dim == 64) {
      tile_rows<kType, kDot, 64>(q_raw, q_f32, keys, num_rows, count, head_dim, scale, tile,
                                 num_tokens);
    } else {
      tile_rows<kType, kDot, 0>(q_raw, q_f32, keys, num_rows, count, head_dim, scale, tile,
                                num_tokens);
    }
  }
}

// ---- p . v with bfloat16 dot products -------------------------------------------------------
// VDPBF16PS sums two products per float32 lane: with two V rows interleaved element by element
// (v[t][d], v[t+1][d]) and the weight pair (p[t], p[t+1]) broadcast, one instruction adds two
// tokens into 16 outputs. The weights are rounded to bfloat16 (relative error 2^-9 per weight,
// random in sign, far below the bfloat16 output's own rounding); sums stay in float32.

// Rows of V as pairs of 16-bit lanes: kInterleaveLow takes elements 0..15 of both rows, high
// takes 16..31, so the float32 outputs stay in natural head_dim order.
APEX_TARGET inline __m512i interleave_index(int first) {
  alignas(64) uint16_t index[32];
  for (int i = 0; i < 16; ++i) {
    index[2 * i] = uint16_t(first + i);
    index[2 * i + 1] = uint16_t(first + i + 32);
  }
  return _mm512_load_si512(index);
}

// kChunks chunks of 32 head_dim elements per pass: kRows * 2 * kChunks accumulators.
template <int kRows, int kHeadDim>
APEX_TARGET_BF16 void bf16_accumulate_rows(const float* p, int num_tokens, const uint16_t* v,
                                           int runtime_head_dim, const float* alpha,
                                           float* acc) {
  constexpr int kChunks = kRows <= 2 ? 4 : (kRows <= 4 ? 2 : 1);
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const __m512i low_index = interleave_index(0);
  const __m512i high_index = interleave_index(16);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    // weights[g][t]: row g's weights of this tile in bfloat16, zero past count.
    alignas(64) uint16_t weights[kRows][kTileTokens];
    for (int g = 0; g < kRows; ++g) {
      const __m512 row = _mm512_maskz_loadu_ps(lanes(count), p + g * num_tokens + token);
      _mm256_store_si256(reinterpret_cast<__m256i*>(weights[g]),
                         (__m256i)_mm512_cvtneps_pbh(row));
    }
    const uint16_t* tile = v + int64_t(token) * head_dim;
    for (int d = 0; d < head_dim; d += 32 * kChunks) {
      __m512 sums[kRows][2 * kChunks];
      __mmask16 masks[2 * kChunks];
      __mmask32 row_masks[kChunks];
      for (int c = 0; c < kChunks; ++c) {
        const int left = head_dim - d - 32 * c;
        row_masks[c] = left >= 32 ? __mmask32(0xffffffffu)
                                  : (left <= 0 ? __mmask32(0) : __mmask32((1u << left) - 1u));
        masks[2 * c] = lanes(left < 0 ? 0 : left);
        masks[2 * c + 1] = lanes(left < 16 ? 0 : left - 16);
      }
      for (int g = 0; g < kRows; ++g) {
        const __m512 scale = _mm512_set1_ps(token == 0 ? alpha[g] : 1.0f);
        for (int c = 0; c < 2 * kChunks; ++c)
          sums[g][c] = _mm512_mul_ps(
              _mm512_maskz_loadu_ps(masks[c], acc + int64_t(g) * head_dim + d + 16 * c), scale);
      }
      for (int t = 0; t < count; t += 2) {
        const bool has_pair = t + 1 < count;  // an odd last token pairs with zeros
        __m512i values[2 * kChunks];
        for (int c = 0; c < kChunks; ++c) {
          const uint16_t* row = tile + int64_t(t) * head_dim + d + 32 * c;
          const __m512i first = _mm512_maskz_loadu_epi16(row_masks[c], row);
          const __m512i second = has_pair ? _mm512_maskz_loadu_epi16(row_masks[c], row + head_dim)
                                          : _mm512_setzero_si512();
          values[2 * c] = _mm512_permutex2var_epi16(first, low_index, second);
          values[2 * c + 1] = _mm512_permutex2var_epi16(first, high_index, second);
        }
        for (int g = 0; g < kRows; ++g) {
          uint32_t pair;
          std::memcpy(&pair, &weights[g][t], sizeof(pair));
          const __m512bh weight = (__m512bh)_mm512_set1_epi32(int(pair));
          for (int c = 0; c < 2 * kChunks; ++c)
            sums[g][c] = _mm512_dpbf16_ps(sums[g][c], (__m512bh)values[c], weight);
        }
      }
      for (int g = 0; g < kRows; ++g)
        for (int c = 0; c < 2 * kChunks; ++c)
          _mm512_mask_storeu_ps(acc + int64_t(g) * head_dim + d + 16 * c, masks[c], sums[g][c]);
    }
  }
}

template <int kRows>
APEX_TARGET_BF16 void bf16_accumulate_head_dim(const float* p, int num_tokens, const uint16_t* v,
                                               int head_dim, const float* alpha, float* acc) {
  if (head_dim == 128) {
    bf16_accumulate_rows<kRows, 128>(p, num_tokens, v, head_dim, alpha, acc);
  } else if (head_dim == 64) {
    bf16_accumulate_rows<kRows, 64>(p, num_tokens, v, head_dim, alpha, acc);
  } else {
    bf16_accumulate_rows<kRows, 0>(p, num_tokens, v, head_dim, alpha, acc);
  }
}

APEX_TARGET_BF16 void bf16_dot_accumulate(const float* p, const void* v, int num_rows,
                                          int num_tokens, int head_dim, const float* alpha,
                                          float* acc) {
  const auto* values = static_cast<const uint16_t*>(v);
  for (int g = 0; g < num_rows;) {
    const int left = num_rows - g;
    const float* p_rows = p + g * num_tokens;
    float* acc_rows = acc + int64_t(g) * head_dim;
    if (left >= 8) {
      bf16_accumulate_head_dim<8>(p_rows, num_tokens, values, head_dim, alpha + g, acc_rows);
      g += 8;
    } else if (left >= 4) {
      bf16_accumulate_head_dim<4>(p_rows, num_tokens, values, head_dim, alpha + g, acc_rows);
      g += 4;
    } else if (left >= 2) {
      bf16_accumulate_head_dim<2>(p_rows, num_tokens, values, head_dim, alpha + g, acc_rows);
      g += 2;
    } else {
      bf16_accumulate_head_dim<1>(p_rows, num_tokens, values, head_dim, alpha + g, acc_rows);
      g += 1;
    }
  }
}

template <DType kType>
const KernelOps* avx512_table() {
  static const KernelOps ops{tile_scores<kType, false>, simd_softmax<Avx512Vec>,
                             simd_accumulate<Avx512Vec, kType>, "avx512"};
  return &ops;
}

}  // namespace

const KernelOps* avx512_kernel_ops(DType dtype, bool use_bf16_dot) {
  if (dtype == DType::kBFloat16 && use_bf16_dot) {
    static const KernelOps ops{tile_scores<DType::kBFloat16, true>, simd_softmax<Avx512Vec>,
                               bf16_dot_accumulate, "avx512bf16"};
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
