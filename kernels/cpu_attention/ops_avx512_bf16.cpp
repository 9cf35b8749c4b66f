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

// acc[t] += packed q chunk c . key chunk c of token t, for the tile's tokens.
template <int kPack, bool kFull, bool kTail>
APEX_TARGET inline void pack_chunk(const __m512i* packed_q, const uint16_t* k, int num_tokens,
                                   int head_dim, int c, __m512 (&acc)[kTileTokens],
                                   RowPrefetch& ahead) {
  constexpr int kWidth = 32 / kPack;
  const __m512bh query = (__m512bh)_mm512_loadu_si512(packed_q + c);
  ahead.step();
#pragma GCC unroll 16
  for (int t = 0; t < kTileTokens; ++t) {
    if (!kFull && t >= num_tokens) break;
    const __m512i key =
        broadcast_key<kPack, kTail>(k + int64_t(t) * head_dim + c * kWidth, head_dim - c * kWidth);
    acc[t] = _mm512_dpbf16_ps(acc[t], query, (__m512bh)key);
  }
}

// Scores of kPack rows against a tile of up to 16 tokens; rows' results in out[kPack].
// kHeadDim > 0 fixes head_dim at compile time (every key row a constant offset). kFull: all
// 16 tokens present; otherwise tokens >= num_tokens keep zero accumulators and are never read.
template <int kPack, int kHeadDim, bool kFull>
APEX_TARGET inline void pack_tile(const __m512i* packed_q, const uint16_t* k, int num_tokens,
                                  int runtime_head_dim, __m512 (&out)[kPack],
                                  RowPrefetch& ahead) {
  constexpr int kWidth = 32 / kPack;
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  __m512 acc[kTileTokens];
  for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_ps();
  const int full_chunks = head_dim / kWidth;
  for (int c = 0; c < full_chunks; ++c)
    pack_chunk<kPack, kFull, false>(packed_q, k, num_tokens, head_dim, c, acc, ahead);
  if (full_chunks * kWidth < head_dim)
    pack_chunk<kPack, kFull, true>(packed_q, k, num_tokens, head_dim, full_chunks, acc, ahead);
  reduce_packed_tile<kPack>(acc, out);
}

template <int kPack, int kHeadDim>
APEX_TARGET inline void pack_scores(const __m512i* packed_q, const uint16_t* k, int num_tokens,
                                    int head_dim, float scale, float* scores, int row_stride,
                                    RowPrefetch& ahead) {
  __m512 sums[kPack];
  if (num_tokens == kTileTokens)
    pack_tile<kPack, kHeadDim, true>(packed_q, k, num_tokens, head_dim, sums, ahead);
  else
    pack_tile<kPack, kHeadDim, false>(packed_q, k, num_tokens, head_dim, sums, ahead);
  for (int r = 0; r < kPack; ++r)
    _mm512_mask_storeu_ps(scores + r * row_stride, lanes(num_tokens),
                          _mm512_mul_ps(sums[r], _mm512_set1_ps(scale)));
}

template <int kHeadDim>
APEX_TARGET void tile_rows(const float* prepared_q, const uint16_t* k, int num_rows,
                           int num_tokens, int head_dim, float scale, float* scores,
                           int row_stride, RowPrefetch& ahead) {
  const auto* packed = reinterpret_cast<const __m512i*>(prepared_q);
  int g = 0;
  for (; g + 4 <= num_rows; g += 4, packed += num_chunks<4>(head_dim))
    pack_scores<4, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride, ahead);
  for (; g + 2 <= num_rows; g += 2, packed += num_chunks<2>(head_dim))
    pack_scores<2, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride, ahead);
  for (; g < num_rows; ++g, packed += num_chunks<1>(head_dim))
    pack_scores<1, kHeadDim>(packed, k, num_tokens, head_dim, scale, scores + g * row_stride,
                             row_stride, ahead);
}

APEX_TARGET void bf16_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores,
                             RowPrefetch& ahead) {
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    const auto* keys = static_cast<const uint16_t*>(k) + int64_t(token) * head_dim;
    float* tile = scores + token;
    if (head_dim == 128) {
      tile_rows<128>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens, ahead);
    } else if (head_dim == 64) {
      tile_rows<64>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens, ahead);
    } else {
      tile_rows<0>(prepared_q, keys, num_rows, count, head_dim, scale, tile, num_tokens, ahead);
    }
  }
}

// ---- p . v ------------------------------------------------------------------------------------
// With two V rows interleaved element by element (v[t][d], v[t+1][d]) and the weight pair
// (p[t], p[t+1]) broadcast, one VDPBF16PS adds two tokens into 16 outputs. The weights are
// rounded to bfloat16 (relative error 2^-9 per weight, random in sign, below the bfloat16
// output's own rounding); sums stay in float32.

// Pairs of 16-bit lanes from two rows: first = 0 takes elements 0..15 of both, 16 takes
// 16..31, so the float32 outputs stay in head_dim order.
APEX_TARGET inline __m512i interleave_index(int first) {
  alignas(64) uint16_t index[32];
  for (int i = 0; i < 16; ++i) {
    index[2 * i] = uint16_t(first + i);
    index[2 * i + 1] = uint16_t(first + i + 32);
  }
  return _mm512_load_si512(index);
}

// Rows' weights of one tile in bfloat16, zero past count: weights[g][t].
template <int kRows>
APEX_TARGET inline void tile_weights(const float* p, int row_stride, int count,
                                     uint16_t (&weights)[kRows][kTileTokens]) {
  for (int g = 0; g < kRows; ++g) {
    const __m512 row = _mm512_maskz_loadu_ps(lanes(count), p + g * row_stride);
    _mm256_store_si256(reinterpret_cast<__m256i*>(weights[g]), (__m256i)_mm512_cvtneps_pbh(row));
  }
}

// acc[g][d .. d + 32 * kChunks) over one tile: kRows * 2 * kChunks float32 accumulators.
template <int kRows, int kChunks>
APEX_TARGET inline void accumulate_pass(const uint16_t (&weights)[kRows][kTileTokens],
                                        const uint16_t* tile, int count, int head_dim, int d,
                                        const float* scales, float* acc) {
  const __m512i low_index = interleave_index(0);
  const __m512i high_index = interleave_index(16);
  __m512 sums[kRows][2 * kChunks];
  __mmask16 masks[2 * kChunks];
  __mmask32 row_masks[kChunks];
  for (int c = 0; c < kChunks; ++c) {
    const int left = std::max(0, head_dim - d - 32 * c);
    row_masks[c] = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
    masks[2 * c] = lanes(left);
    masks[2 * c + 1] = lanes(std::max(0, left - 16));
  }
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < 2 * kChunks; ++c)
      sums[g][c] = _mm512_mul_ps(
          _mm512_maskz_loadu_ps(masks[c], acc + int64_t(g) * head_dim + d + 16 * c),
          _mm512_set1_ps(scales[g]));
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

// V is read once per pass; kChunks keeps kRows * 2 * kChunks accumulators at 16 or fewer.
template <int kRows, int kHeadDim>
APEX_TARGET void accumulate_rows(const float* p, int num_tokens, const uint16_t* v,
                                 int runtime_head_dim, const float* alpha, float* acc) {
  constexpr int kChunks = kRows <= 2 ? 4 : (kRows <= 4 ? 2 : 1);
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = std::min(kTileTokens, num_tokens - token);
    alignas(64) uint16_t weights[kRows][kTileTokens];
    tile_weights<kRows>(p + token, num_tokens, count, weights);
    float scales[kRows];  // the old accumulators are rescaled once, on the first tile
    for (int g = 0; g < kRows; ++g) scales[g] = token == 0 ? alpha[g] : 1.0f;
    const uint16_t* tile = v + int64_t(token) * head_dim;
    for (int d = 0; d < head_dim; d += 32 * kChunks)
      accumulate_pass<kRows, kChunks>(weights, tile, count, head_dim, d, scales, acc);
  }
}

template <int kRows>
APEX_TARGET void accumulate_head_dim(const float* p, int num_tokens, const uint16_t* v,
                                     int head_dim, const float* alpha, float* acc) {
  if (head_dim == 128) {
    accumulate_rows<kRows, 128>(p, num_tokens, v, head_dim, alpha, acc);
  } else if (head_dim == 64) {
    accumulate_rows<kRows, 64>(p, num_tokens, v, head_dim, alpha, acc);
  } else {
    accumulate_rows<kRows, 0>(p, num_tokens, v, head_dim, alpha, acc);
  }
}

APEX_TARGET void bf16_accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                                 int head_dim, const float* alpha, float* acc) {
  const auto* values = static_cast<const uint16_t*>(v);
  for_row_groups<8>(num_rows, [&](auto rows, int g) APEX_TARGET {
    accumulate_head_dim<decltype(rows)::value>(p + g * num_tokens, num_tokens, values, head_dim,
                                               alpha + g, acc + int64_t(g) * head_dim);
  });
}

}  // namespace

const KernelOps* avx512_bf16_kernel_ops() {
  static const KernelOps ops{bf16_prepare_q, bf16_scores,
                             avx512_kernel_ops(DType::kBFloat16, false)->softmax,
                             bf16_accumulate, "avx512bf16"};
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
