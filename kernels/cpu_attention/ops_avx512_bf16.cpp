// bfloat16 KV with AVX512-BF16 (VDPBF16PS: 32 bfloat16 products summed pairwise into 16 float32
// lanes per instruction) for both q . k and p . v. Compiled with per-function target
// attributes; runs only after select_kernel_ops has found avx512bf16 on this CPU.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed results with _mm512_undefined_*(); see ops_avx512.cpp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define APEX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

namespace apex {
namespace {

#include "avx512_tiles.h"

// ---- q . k ------------------------------------------------------------------------------------
// kPack query rows share one register: row r owns 16 / kPack float32 lanes, i.e. 32 / kPack
// consecutive head_dim elements per chunk, and the key's matching elements are broadcast to
// every row's slot. Each VDPBF16PS then serves kPack rows, and the transpose-and-add tree runs
// once per kPack rows (its last levels become a cheap 128/256-bit lane transpose).

// Prepared q: for each pack of rows (4s, then a 2, then a 1, covering num_rows), chunk c of
// width 32 / kPack is one 64-byte vector whose slot r holds q[row r][c * width ...], zero past
// head_dim.
template <int kPack>
inline int num_chunks(int head_dim) {
  return (head_dim + 32 / kPack - 1) / (32 / kPack);
}

template <int kPack>
void pack_rows(const uint16_t* q, int head_dim, uint16_t* packed) {
  constexpr int kWidth = 32 / kPack;
  const int chunks = num_chunks<kPack>(head_dim);
  for (int c = 0; c < chunks; ++c)
    for (int r = 0; r < kPack; ++r)
      for (int i = 0; i < kWidth; ++i) {
        const int d = c * kWidth + i;
        packed[(c * kPack + r) * kWidth + i] = d < head_dim ? q[int64_t(r) * head_dim + d] : 0;
      }
}

void bf16_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const auto* rows = static_cast<const uint16_t*>(q);
  auto* packed = reinterpret_cast<uint16_t*>(prepared);
  int g = 0;
  for (; g + 4 <= num_rows; g += 4, packed += 32 * num_chunks<4>(head_dim))
    pack_rows<4>(rows + int64_t(g) * head_dim, head_dim, packed);
  for (; g + 2 <= num_rows; g += 2, packed += 32 * num_chunks<2>(head_dim))
    pack_rows<2>(rows + int64_t(g) * head_dim, head_dim, packed);
  for (; g < num_rows; ++g, packed += 32 * num_chunks<1>(head_dim))
    pack_rows<1>(rows + int64_t(g) * head_dim, head_dim, packed);
}

// The key elements [d, d + 32 / kPack) of one row, repeated in every row slot; zero past
// head_dim (the elements after a row belong to the next token and may be anything).
template <int kPack, bool kTail>
APEX_TARGET inline __m512i broadcast_key(const uint16_t* key, int left) {
  if constexpr (kPack == 4) {
    const __m128i part = kTail ? _mm_maskz_loadu_epi16(__mmask8((1u << left) - 1u), key)
                               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(key));
    return _mm512_broadcast_i32x4(part);
  } else if constexpr (kPack == 2) {
    const __m256i part = kTail ? _mm256_maskz_loadu_epi16(__mmask16((1u << left) - 1u), key)
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key));
    return _mm512_broadcast_i64x4(part);
  } else {
    return kTail ? _mm512_maskz_loadu_epi16(__mmask32((1u << left) - 1u), key)
                 : _mm512_loadu_si512(key);
  }
}

// Scores of kPack rows against a tile of up to 16 tokens; rows' results in out[kPack].
// kHeadDim > 0 fixes head_dim at compile time (every key row a constant offset).
template <int kPack, int kHeadDim, bool kFull>
APEX_TARGET inline void pack_tile(const __m512i* packed_q, const uint16_t* k, int num_tokens,
                                  int runtime_head_dim, __m512 (&out)[kPack]) {
  constexpr int kWidth = 32 / kPack;
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  __m512 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_ps();
  auto chunk = [&](int c, auto tail) {
    const __m512bh query = (__m512bh)_mm512_loadu_si512(packed_q + c);
#pragma GCC unroll 16
    for (int t = 0; t < kTileTokens; ++t) {
      if (!kFull && t >= num_tokens) break;
      const __m512i key = broadcast_key<kPack, decltype(tail)::value>(
          k + int64_t(t) * head_dim + c * kWidth, head_dim - c * kWidth);
      acc[t] = _mm512_dpbf16_ps(acc[t], query, (__m512bh)key);
    }
  };
  const int full_chunks = head_dim / kWidth;
  for (int c = 0; c < full_chunks; ++c) chunk(c, std::false_type{});
  if (full_chunks * kWidth < head_dim) chunk(full_chunks, std::true_type{});
  reduce_packed_tile<kPack>(acc, out);
}

template <int kPack, int kHeadDim>
APEX_TARGET inline void pack_scores(const __m512i* packed_q, const uint16_t* k, int num_tokens,
                                    int head_dim, float scale, float* scores, int row_stride) {
  __m512 sums[kPack];
  if (num_tokens == kTileTokens)
    pack_tile<kPack, kHeadDim, true>(packed_q, k, num_tokens, head_dim, sums);
  else
    pack_tile<kPack, kHeadDim, false>(packed_q, k, num_tokens, head_dim, sums);
  for (int r = 0; r < kPack; ++r)
    _mm512_mask_storeu_ps(scores + r * row_stride, lanes(num_tokens),
                          _mm512_mul_ps(sums[r], _mm512_set1_ps(scale)));
}

template <int kHeadDim>
APEX_TARGET void tile_rows(const float* prepared_q, const uint16_t* k, int num_rows,
                           int num_tokens, int head_dim, float scale, float* scores,
                           int row_stride) {
  const auto* packed = reinterpret_cast<const __m512i*>(prepared_q);
  int g = 0;
  for (; g + 4 <= num_rows; g += 4, packed += num_chunks<4>(head_dim))
    pack_scores<4, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride);
  for (; g + 2 <= num_rows; g += 2, packed += num_chunks<2>(head_dim))
    pack_scores<2, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride);
  for (; g < num_rows; ++g, packed += num_chunks<1>(head_dim))
    pack_scores<1, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride);
}

APEX_TARGET void bf16_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores) {
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    const auto* keys = static_cast<const uint16_t*>(k) + int64_t(token) * head_dim;
    float* tile = scores + token;
    if (head_dim == 128) {
      tile_rows<128>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens);
    } else if (head_dim == 64) {
      tile_rows<64>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens);
    } else {
      tile_rows<0>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens);
    }
  }
}

