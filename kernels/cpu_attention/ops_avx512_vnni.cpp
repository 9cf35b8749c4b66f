// int8 KV with AVX512-VNNI, a run of steps (one kv head of one block each) per call
// (KernelOps::attend_int8): q . k, the online softmax and p . v in registers, the token scales
// applied between them, one tile's softmax overlapping the next one's q . k.
// - q . k: q is quantized per row (llama.cpp does the same for its 8-bit caches); VPDPBUSD sums
//   4 u8 x s8 products into each int32 lane, exact. Keys are flipped to unsigned (k + 128;
//   128 * sum(q) comes off each score) and four tokens' dwords interleaved in registers, so the
//   lanes are tokens and no per-token reduction tree is needed.
// - softmax: the rows of a GQA group step together, their maxima and sums out of one shared
//   reduction tree, alpha from the vector exp (a libm call would spill every live register).
// - p . v: each row's weights of a 16-token tile become 8-bit integers relative to the largest
//   of them (SageAttention quantizes P to 8 bits the same way); four tokens' value bytes are
//   interleaved in registers so that one VPDPBUSD adds four tokens' products into each dim's
//   int32 lane, for every row of the group before the next four tokens.
// Against widening to float32 that is a quarter of the multiply instructions. Runs only after
// select_kernel_ops has found avx512vnni.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed results with _mm512_undefined_*(); see ops_avx512.cpp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define APEX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace apex {
namespace {

#include "avx512_tiles.h"

// Prepared q, per row (row_bytes(head_dim) apart, inside prepared_q_floats' room): for each
// 64-dim chunk h of the int8-quantized row and each k < 4, a "pattern" register whose 128-bit
// lane L repeats q's dword 4L + k of that chunk (the four q bytes that meet the keys in
// score_registers' interleaved keys), then its float scale and int32 sum.
constexpr int kChunkBytes = 64;
inline int num_chunks(int head_dim) { return (head_dim + kChunkBytes - 1) / kChunkBytes; }
inline int pattern_bytes(int head_dim) { return num_chunks(head_dim) * 4 * kChunkBytes; }
inline int row_bytes(int head_dim) { return pattern_bytes(head_dim) + 64; }

void vnni_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const float* rows = static_cast<const float*>(q);  // int8 kernels take q in float32
  const int padded = num_chunks(head_dim) * kChunkBytes;
  int8_t on_stack[1024];  // head dims past 1024 (none in use) take the heap
  std::vector<int8_t> on_heap(padded <= 1024 ? 0 : padded);
  int8_t* row_q = padded <= 1024 ? on_stack : on_heap.data();
  for (int g = 0; g < num_rows; ++g) {
    char* out = reinterpret_cast<char*>(prepared) + int64_t(g) * row_bytes(head_dim);
    const float scale =
        quantize_row(rows + int64_t(g) * head_dim, DType::kFloat32, head_dim, row_q);
    std::memset(row_q + head_dim, 0, padded - head_dim);  // padding meets the keys' zeros
    int32_t sum = 0;
    for (int d = 0; d < head_dim; ++d) sum += row_q[d];
    for (int h = 0; h < num_chunks(head_dim); ++h)
      for (int k = 0; k < 4; ++k)
        for (int lane = 0; lane < 4; ++lane)
          for (int slot = 0; slot < 4; ++slot)
            std::memcpy(out + (h * 4 + k) * kChunkBytes + lane * 16 + slot * 4,
                        row_q + h * kChunkBytes + (4 * lane + k) * 4, 4);
    std::memcpy(out + pattern_bytes(head_dim), &scale, sizeof(scale));
    std::memcpy(out + pattern_bytes(head_dim) + 4, &sum, sizeof(sum));
  }
}

// Past this head dim an int32 sum of (k + 128) * q could lose exactness as a float
// (256 x 255 x 127 < 2^24): the same integer dot products, one at a time.
constexpr int kMaxIntDotDim = 256;

void plain_int_scores(const char* prepared, const int8_t* k, int num_rows, int num_tokens,
                      int head_dim, float scale, float* scores) {
  for (int g = 0; g < num_rows; ++g) {
    const char* row = prepared + int64_t(g) * row_bytes(head_dim);
    float q_scale;
    std::memcpy(&q_scale, row + pattern_bytes(head_dim), sizeof(q_scale));
    for (int t = 0; t < num_tokens; ++t) {
      int32_t dot = 0;
      for (int d = 0; d < head_dim; ++d) {
        const int h = d / kChunkBytes, dword = (d % kChunkBytes) / 4;
        const int8_t q_d = row[(h * 4 + dword % 4) * kChunkBytes + (dword / 4) * 16 + d % 4];
        dot += int32_t(q_d) * k[int64_t(t) * head_dim + d];
      }
      scores[g * num_tokens + t] = float(dot) * q_scale * scale;
    }
  }
}

// VPUNPCK{L,H}{BW,WD,DQ,QDQ}: interleave kBits-wide elements of a and b inside 128-bit lanes.
template <int kBits>
APEX_TARGET inline __m512i unpack_low(__m512i a, __m512i b) {
  if constexpr (kBits == 8) return _mm512_unpacklo_epi8(a, b);
  else if constexpr (kBits == 16) return _mm512_unpacklo_epi16(a, b);
  else if constexpr (kBits == 32) return _mm512_unpacklo_epi32(a, b);
  else return _mm512_unpacklo_epi64(a, b);
}

template <int kBits>
APEX_TARGET inline __m512i unpack_high(__m512i a, __m512i b) {
  if constexpr (kBits == 8) return _mm512_unpackhi_epi8(a, b);
  else if constexpr (kBits == 16) return _mm512_unpackhi_epi16(a, b);
  else if constexpr (kBits == 32) return _mm512_unpackhi_epi32(a, b);
  else return _mm512_unpackhi_epi64(a, b);
}

// Four tokens' 64-byte chunks a[0..3] -> o[k], by two unpack levels inside 128-bit lanes:
// - kUnit 4 (keys): o[k]'s lane L holds dword 4L + k of each token, in slots 0..3;
// - kUnit 1 (values): o[k]'s dword (L, s) holds the four tokens' bytes of dim 16L + 4k + s.
template <int kUnit>
APEX_TARGET inline void interleave_tokens(const __m512i (&a)[4], __m512i (&o)[4]) {
  constexpr int kBits = 8 * kUnit;
  const __m512i low01 = unpack_low<kBits>(a[0], a[1]);
  const __m512i high01 = unpack_high<kBits>(a[0], a[1]);
  const __m512i low23 = unpack_low<kBits>(a[2], a[3]);
  const __m512i high23 = unpack_high<kBits>(a[2], a[3]);
  o[0] = unpack_low<2 * kBits>(low01, low23);
  o[1] = unpack_high<2 * kBits>(low01, low23);
  o[2] = unpack_low<2 * kBits>(high01, high23);
  o[3] = unpack_high<2 * kBits>(high01, high23);
}

// One level of the lane sum: for acc[i] lane (L, slot s) = a partial dot of token 4i + s over
// the lane-L dwords, fold(acc[0], acc[1]) then fold(that, the same of acc[2], acc[3]) is one
// register with the 16 tokens' full dots in token order.
APEX_TARGET inline __m512i fold_lanes(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}

// dots[g] lane t = scale * q_g . k_t for the tile's tokens t < num_tokens (other lanes: any
// value). kChunks = 0: head dims past kMaxIntDotDim, one dot at a time.
template <int kRows, int kChunks>
APEX_TARGET inline void score_registers(const char* prepared, const int8_t* k, int num_tokens,
                                        int head_dim, float scale, __m512 (&dots)[kRows],
                                        RowPrefetch& ahead) {
  if constexpr (kChunks == 0) {
    float scores[kRows * kTileTokens];  // row g at g * num_tokens
    plain_int_scores(prepared, k, kRows, num_tokens, head_dim, scale, scores);
    for (int g = 0; g < kRows; ++g)
      dots[g] = _mm512_maskz_loadu_ps(lanes(num_tokens), scores + g * num_tokens);
  } else {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    __m512i folded[kRows][2];  // per row, token quads 0-1 and 2-3 with one fold level done
    // Two token quads at a time: each q pattern, loaded once into a register, meets both
    // quads' keys. Loaded per dot product, the patterns were the step's bottleneck (one
    // 64-byte load per cycle on this AMD CPU: q . k took 1.7x as long as with the patterns
    // in registers).
#pragma GCC unroll 2
    for (int pair = 0; pair < 2; ++pair) {
      __m512i acc[kRows][2];
#pragma GCC unroll 4
      for (int g = 0; g < kRows; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int h = 0; h < kChunks; ++h) {
        const int left = head_dim - h * kChunkBytes;
        const __mmask64 dims = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
        __m512i interleaved[2][4];
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          __m512i keys[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const int token = 8 * pair + 4 * half + j;
            // Missing tokens and dims load as zero: their q is zero, or their lane is unused.
            keys[j] = _mm512_xor_si512(
                _mm512_maskz_loadu_epi8(token < num_tokens ? dims : 0,
                                        k + int64_t(token) * head_dim + h * kChunkBytes),
                flip);
          }
          ahead.step();  // 8 steps of a tile over 128 dims: an 8-bit head
          interleave_tokens<4>(keys, interleaved[half]);
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
          for (int g = 0; g < kRows; ++g) {
            __m512i pattern = _mm512_loadu_si512(
                prepared + int64_t(g) * row_bytes(head_dim) + (h * 4 + j) * kChunkBytes);
            asm("" : "+v"(pattern));  // one load: GCC would fold it into both dot products
#pragma GCC unroll 2
            for (int half = 0; half < 2; ++half)
              acc[g][half] = _mm512_dpbusd_epi32(acc[g][half], interleaved[half][j], pattern);
          }
      }
      // Folded now, the pair's sums take half the registers through the next pair.
#pragma GCC unroll 4
      for (int g = 0; g < kRows; ++g) folded[g][pair] = fold_lanes(acc[g][0], acc[g][1]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) {
      const char* row = prepared + int64_t(g) * row_bytes(head_dim);
      float q_scale;
      int32_t q_sum;
      std::memcpy(&q_scale, row + pattern_bytes(head_dim), sizeof(q_scale));
      std::memcpy(&q_sum, row + pattern_bytes(head_dim) + 4, sizeof(q_sum));
      // Sums stay below 2^24 (kMaxIntDotDim), so the float conversion is exact.
      const __m512 sums = _mm512_sub_ps(_mm512_cvtepi32_ps(fold_lanes(folded[g][0], folded[g][1])),
                                        _mm512_set1_ps(128.0f * float(q_sum)));
      dots[g] = _mm512_mul_ps(sums, _mm512_set1_ps(q_scale * scale));
    }
  }
}

struct MaxOf {
  APEX_TARGET __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct SumOf {
  APEX_TARGET __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};

// Lane g (g < kRows) = combine over the 16 lanes of rows[g], for an associative combine: one
// transpose-and-combine tree for up to four rows (9 shuffles), where a reduction per row takes
// 4 shuffles on a chain of its own. Missing rows repeat row 0.
template <int kRows, class Combine>
APEX_TARGET inline __m128 combine_rows(const __m512 (&rows)[kRows], Combine combine) {
  const __m512 r0 = rows[0], r1 = rows[kRows > 1 ? 1 : 0], r2 = rows[kRows > 2 ? 2 : 0],
               r3 = rows[kRows > 3 ? 3 : 0];
  // 128-bit lanes: [row 0 (0|2), row 0 (1|3), row 1 (0|2), row 1 (1|3)], the same for 2, 3.
  const __m512 r01 =
      combine(_mm512_shuffle_f32x4(r0, r1, 0x44), _mm512_shuffle_f32x4(r0, r1, 0xee));
  const __m512 r23 =
      combine(_mm512_shuffle_f32x4(r2, r3, 0x44), _mm512_shuffle_f32x4(r2, r3, 0xee));
  // 128-bit lane L: four partials of row L.
  __m512 x = combine(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xdd));
  x = combine(x, _mm512_permute_ps(x, 0x4e));
  x = combine(x, _mm512_permute_ps(x, 0xb1));
  return _mm512_castps512_ps128(
      _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x));
}

// p . v in integers for head dims that are whole 64-byte chunks (others: the float kernel).
constexpr int kMaxPvChunks = 4;
inline bool int_pv(int head_dim) {
  return head_dim % kChunkBytes == 0 && head_dim / kChunkBytes <= kMaxPvChunks;
}

// acc rows [0, kRows) = acc * alpha + weights . values for one tile of up to 16 tokens, per
// 64-dim chunk: four tokens' value rows at a time are interleaved (four tokens' bytes of a
// dim in each dword) and meet every row's weights in registers, so the values are read once
// per tile and nothing goes through memory but acc. The weights (>= 0, kTileTokens apart)
// become u = round(w * 255 / max w), max w the row's `largest`; sum(u * v) is exact in int32,
// and each weight moves by at most 2^-9 of the largest, an error that averages out over the
// tokens (the int8 values themselves move by up to 2^-8 of their row's range). A 16-bit u in
// two passes (high and low byte) cost 13% more time for 2^-17. Each 64-dim chunk of a row is
// kept in the interleave's order (a 4 x 4 transpose of 4-dim units), undone by
// vnni_finish_acc.
template <int kRows, int kChunks>
APEX_TARGET inline void int_pv_rows(const float* weights, const float* largest,
                                    const float* alpha, const int8_t* values, int num_tokens,
                                    float* acc) {
  constexpr int kHeadDim = kChunks * kChunkBytes;
  // Four tokens' weights per int32 lane, in token order, in every 128-bit lane.
  __m512i quads[kRows];
  __m512 units[kRows];
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) {
    // A row whose weights are all 0 (largest 0) gets u = 0 and keeps its acc * alpha.
    const float to_units = largest[g] > 0.0f ? 255.0f / largest[g] : 0.0f;
    const __m512i u = _mm512_min_epu32(
        _mm512_cvtps_epu32(_mm512_mul_ps(_mm512_load_ps(weights + g * kTileTokens),
                                         _mm512_set1_ps(to_units))),
        _mm512_set1_epi32(255));
    quads[g] = _mm512_broadcast_i32x4(_mm512_cvtepi32_epi8(u));
    units[g] = _mm512_set1_ps(largest[g] / 255.0f);
  }
#pragma GCC unroll 4
  for (int h = 0; h < kChunks; ++h) {
    // Each chunk broadcasts the weights anew: kept across chunks, the kRows x 4 broadcasts
    // take more registers than there are and spill.
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) asm("" : "+v"(quads[g]));
    __m512i sums[kRows][4];
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) sums[g][r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512i rows[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int t = 4 * i + j;  // missing tokens load as zero (their weight is 0 too)
        rows[j] = _mm512_maskz_loadu_epi8(t < num_tokens ? ~__mmask64(0) : 0,
                                          values + int64_t(t) * kHeadDim + h * kChunkBytes);
      }
      __m512i interleaved[4];
      interleave_tokens<1>(rows, interleaved);
#pragma GCC unroll 4
      for (int g = 0; g < kRows; ++g) {
        const __m512i weight = _mm512_permutexvar_epi32(_mm512_set1_epi32(i), quads[g]);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
          sums[g][r] = _mm512_dpbusd_epi32(sums[g][r], weight, interleaved[r]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) {
      float* out = acc + g * kHeadDim + h * kChunkBytes;
      // alpha is 1 once the row's maximum settles: skip the rescale then.
      if (alpha[g] == 1.0f) {
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
          _mm512_storeu_ps(out + 16 * r, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[g][r]), units[g],
                                                         _mm512_loadu_ps(out + 16 * r)));
      } else {
        const __m512 rescale = _mm512_set1_ps(alpha[g]);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r)
          _mm512_storeu_ps(out + 16 * r,
                           _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[g][r]), units[g],
                                           _mm512_mul_ps(_mm512_loadu_ps(out + 16 * r), rescale)));
      }
    }
  }
}

// Rows of a GQA group that one pass over a call's tiles carries (its buffers live on the
// stack); a larger group takes more passes.
constexpr int kMaxPassRows = 16;

// A tile's scores [row][kTileTokens] between its q . k and its softmax, each token's k scale
// applied, lanes past the tile's tokens -inf.
struct TileScores {
  alignas(64) float scores[kMaxPassRows * kTileTokens];
};

// What a tile's softmax hands its p . v, per row: the weights with each token's v scale in
// them (integer p . v: kTileTokens apart; float p . v: packed, num_tokens apart), alpha, and
// the largest weight.
struct TileWeights {
  alignas(64) float p[kMaxPassRows * kTileTokens];
  float alpha[kMaxPassRows];
  float largest[kMaxPassRows];
};

// A tile's q . k for rows [0, num_rows), into `tile`. Steps `ahead` along the way. kWhole:
// head_dim is kChunks whole chunks.
template <int kChunks, bool kWhole>
APEX_TARGET inline void tile_scores(const char* prepared, const int8_t* keys,
                                    const float* k_scales, int num_tokens, int num_rows,
                                    int head_dim, float scale, TileScores& tile,
                                    RowPrefetch& ahead) {
  const __mmask16 valid = lanes(num_tokens);
  const __m512 k_scale = _mm512_maskz_loadu_ps(valid, k_scales);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
    constexpr int kRows = decltype(rows)::value;
    // Computed here, not captured (see attend_pass).
    const int dim = kWhole ? kChunks * kChunkBytes : head_dim;
    __m512 dots[kRows];
    score_registers<kRows, kChunks>(prepared + int64_t(g) * row_bytes(dim), keys, num_tokens,
                                    dim, scale, dots, ahead);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
      _mm512_store_ps(tile.scores + (g + r) * kTileTokens,
                      _mm512_mask_mul_ps(neg_inf, valid, dots[r], k_scale));
  });
}

// One online-softmax step for rows [0, kRows) of a tile's scores, the rows stepping together
// (lane g of each __m128 is row g's; lanes past kRows unused); their weights, alphas and
// largest weights go to `out` from row `first` on.
template <int kRows, bool kIntPv>
APEX_TARGET inline void softmax_rows(const float* scores, const float* v_scales, int num_tokens,
                                     float* running_max, float* running_sum, int first,
                                     TileWeights& out) {
  const __mmask16 valid = lanes(num_tokens);
  __m512 rows_scores[kRows];
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) rows_scores[g] = _mm512_load_ps(scores + g * kTileTokens);
  const __mmask8 rows = __mmask8((1u << kRows) - 1u);
  const __m128 old_max = _mm_mask_loadu_ps(_mm_set1_ps(-std::numeric_limits<float>::infinity()),
                                           rows, running_max);
  const __m128 new_max = _mm_max_ps(old_max, combine_rows<kRows>(rows_scores, MaxOf()));
  // The maximum rarely moves once a few blocks are in: alpha is exactly 1 then.
  const __m128 alpha = _mm_mask_blend_ps(
      _mm_cmp_ps_mask(new_max, old_max, _CMP_EQ_OQ),
      _mm512_castps512_ps128(exp_lanes(_mm512_castps128_ps512(_mm_sub_ps(old_max, new_max)))),
      _mm_set1_ps(1.0f));
  const __m512 maxima = _mm512_broadcast_f32x4(new_max);
  __m512 weights[kRows];
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) {
    const __m512 row_max = _mm512_permutexvar_ps(_mm512_set1_epi32(g), maxima);
    weights[g] = _mm512_maskz_mov_ps(valid, exp_lanes(_mm512_sub_ps(rows_scores[g], row_max)));
  }
  const __m128 old_sum = _mm_maskz_loadu_ps(rows, running_sum);
  _mm_mask_storeu_ps(running_sum, rows,
                     _mm_add_ps(_mm_mul_ps(old_sum, alpha), combine_rows<kRows>(weights, SumOf())));
  _mm_mask_storeu_ps(running_max, rows, new_max);
  _mm_mask_storeu_ps(out.alpha + first, rows, alpha);
  // A token's weight on v carries its scale.
  const __m512 v_scale = _mm512_maskz_loadu_ps(valid, v_scales);
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) weights[g] = _mm512_mul_ps(weights[g], v_scale);
  if constexpr (kIntPv) {
    _mm_mask_storeu_ps(out.largest + first, rows, combine_rows<kRows>(weights, MaxOf()));
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) _mm512_store_ps(out.p + (first + g) * kTileTokens, weights[g]);
  } else {
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g)
      _mm512_mask_storeu_ps(out.p + (first + g) * num_tokens, valid, weights[g]);
  }
}

// acc rows [0, num_rows) += the tile's weights . values (after alpha's rescale).
template <int kChunks, bool kIntPv>
APEX_TARGET inline void tile_pv(const TileWeights& weights, const int8_t* values, int num_tokens,
                                int num_rows, int head_dim, float* acc) {
  if constexpr (kIntPv) {
    for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
      int_pv_rows<decltype(rows)::value, kChunks>(
          weights.p + g * kTileTokens, weights.largest + g, weights.alpha + g, values,
          num_tokens, acc + int64_t(g) * kChunks * kChunkBytes);
    });
  } else {
    avx512_kernel_ops(DType::kInt8, false)
        ->accumulate(weights.p, values, num_rows, num_tokens, head_dim, weights.alpha, acc);
  }
}

// Rows [first_row, first_row + num_rows) of every step, tile by tile in order, software-
// pipelined: each tile's softmax, then the next tile's q . k, then this tile's p . v. The
// softmax is a chain of dependent reductions and exps; with the next tile's q . k (which
// depends on nothing) right behind it, the out-of-order core has other work beside it.
template <int kChunks, bool kIntPv>
APEX_TARGET void attend_pass(const Int8Step* steps, int num_steps, int first_row, int num_rows,
                             int head_dim, float scale) {
  // Integer p . v means whole chunks: a constant head dim makes every stride, mask and row
  // offset an immediate. GCC compiles the lambdas and row-group visitors out of line, so they
  // see this constant only where it is not a captured variable that was reassigned.
  const int dim = kIntPv ? kChunks * kChunkBytes : head_dim;
  TileScores tiles[2];
  TileWeights weights;
  const int64_t q_offset = int64_t(first_row) * row_bytes(dim);
  auto tile_tokens = [&](int s, int token) {
    return std::min(kTileTokens, steps[s].num_tokens - token);
  };
  auto scores = [&](int s, int token, TileScores& tile) APEX_TARGET {
    const Int8Step& step = steps[s];
    tile_scores<kChunks, kIntPv>(reinterpret_cast<const char*>(step.prepared_q) + q_offset,
                                 step.k + int64_t(token) * dim, step.k_scales + token,
                                 tile_tokens(s, token), num_rows, dim, scale, tile,
                                 *step.ahead);
    if (token + kTileTokens >= step.num_tokens) step.ahead->finish();
  };
  int s = 0, token = 0, slot = 0;  // the tile behind, its scores in tiles[slot]
  scores(0, 0, tiles[0]);
  for (;;) {
    const Int8Step& step = steps[s];
    const int count = tile_tokens(s, token);
    float* running_max = step.running_max + first_row;
    float* running_sum = step.running_sum + first_row;
    for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
      softmax_rows<decltype(rows)::value, kIntPv>(tiles[slot].scores + g * kTileTokens,
                                                  step.v_scales + token, count,
                                                  running_max + g, running_sum + g, g, weights);
    });
    int next_s = s, next_token = token + kTileTokens;
    if (next_token >= step.num_tokens) next_s = s + 1, next_token = 0;
    if (next_s < num_steps) scores(next_s, next_token, tiles[slot ^ 1]);
    tile_pv<kChunks, kIntPv>(weights, step.v + int64_t(token) * dim, count, num_rows,
                             dim, step.acc + int64_t(first_row) * dim);
    if (next_s == num_steps) return;
    s = next_s, token = next_token, slot ^= 1;
  }
}

APEX_TARGET void vnni_attend_int8(const Int8Step* steps, int num_steps, int num_rows,
                                  int head_dim, float scale) {
  if (num_steps == 0) return;
  const int chunks = head_dim > kMaxIntDotDim ? 0 : num_chunks(head_dim);
  auto run = [&](auto chunks_constant, auto int_pv_constant) {
    for (int first = 0; first < num_rows; first += kMaxPassRows)
      attend_pass<decltype(chunks_constant)::value, decltype(int_pv_constant)::value>(
          steps, num_steps, first, std::min(kMaxPassRows, num_rows - first), head_dim, scale);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  const bool integers = int_pv(head_dim);
  switch (chunks) {
    case 1:
      return integers ? run(std::integral_constant<int, 1>(), Yes())
                      : run(std::integral_constant<int, 1>(), No());
    case 2:
      return integers ? run(std::integral_constant<int, 2>(), Yes())
                      : run(std::integral_constant<int, 2>(), No());
    case 3:
      return integers ? run(std::integral_constant<int, 3>(), Yes())
                      : run(std::integral_constant<int, 3>(), No());
    case 4:
      return integers ? run(std::integral_constant<int, 4>(), Yes())
                      : run(std::integral_constant<int, 4>(), No());
    default:
      return run(std::integral_constant<int, 0>(), No());
  }
}

// int_pv_row's order -> natural: within each 64-dim chunk, 4-dim unit (k, L) <-> (L, k).
void vnni_finish_acc(float* acc, int num_rows, int head_dim) {
  if (!int_pv(head_dim)) return;
  for (int g = 0; g < num_rows; ++g)
    for (int h = 0; h < head_dim / kChunkBytes; ++h) {
      float* chunk = acc + int64_t(g) * head_dim + h * kChunkBytes;
      float natural[kChunkBytes];
      for (int k = 0; k < 4; ++k)
        for (int lane = 0; lane < 4; ++lane)
          std::memcpy(natural + 16 * lane + 4 * k, chunk + 16 * k + 4 * lane, 4 * sizeof(float));
      std::memcpy(chunk, natural, sizeof(natural));
    }
}

}  // namespace

const KernelOps* avx512_vnni_kernel_ops() {
  // Only the fused step: no separate scores, softmax or accumulate reads this prepared q.
  static const KernelOps ops = [] {
    KernelOps vnni{vnni_prepare_q, nullptr, nullptr, nullptr, "avx512vnni", vnni_finish_acc};
    vnni.attend_int8 = vnni_attend_int8;
    return vnni;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
