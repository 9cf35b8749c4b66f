// int8 KV on AVX2: q . k as integer dot products. q is quantized per row to int8, exactly as
// the AVX512-VNNI kernels do (so both solve the same problem), and kept as int16; each key
// chunk is widened int8 -> int16 once per token and VPMADDWD multiplies it by every query row,
// summing pairs into int32 lanes. Against widening keys to float32 (two conversions per 8
// elements) and one FMA per 8 elements per row, that is one conversion per 16 elements and one
// multiply-add plus one integer add per 16 elements per row; the sums are exact in int32 and
// become float once per 8-token tile. p . v multiplies integers too (15-bit weights against
// int8 values, see below), and the softmax advances four rows at a time; head dims that are
// not a multiple of 16 keep the float AVX2 p . v.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>
#include <limits>

#include "common.h"

#define APEX_TARGET __attribute__((target("avx2,fma")))

namespace apex {
namespace {

constexpr int kStep = 16;        // key elements per widened register
constexpr int kTileTokens = 8;   // scores per int32 register after the reduction

inline bool int_dots(int head_dim) { return head_dim % kStep == 0; }

// Keeps `value` in a register, opaque to the optimizer: a q chunk folded into each VPMADDWD as
// a memory operand would be loaded once per token, and integer adds being associative, GCC
// would turn a running sum's chain into a tree over all its products, spilled to the stack.
APEX_TARGET inline void in_register(__m256i& value) { asm("" : "+x"(value)); }

// Prepared q, per row (row_floats(head_dim) floats apart, 32-byte multiples so that row chunks
// never straddle cache lines; inside prepared_q_floats' room): the int8-quantized row as
// int16, then (at float scale_index(head_dim)) its float scale.
inline int64_t scale_index(int head_dim) { return (head_dim + 1) / 2; }
inline int64_t row_floats(int head_dim) { return (scale_index(head_dim) + 8) & ~int64_t(7); }

inline int16_t q_element(const float* row, int d) {
  int16_t value;
  std::memcpy(&value, reinterpret_cast<const char*>(row) + 2 * d, sizeof(value));
  return value;
}

inline float q_scale(const float* row, int head_dim) {
  float value;
  std::memcpy(&value, row + scale_index(head_dim), sizeof(value));
  return value;
}

void int8_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const float* rows = static_cast<const float*>(q);  // int8 kernels take q in float32
  for (int g = 0; g < num_rows; ++g) {
    float* out = prepared + g * row_floats(head_dim);
    char* bytes = reinterpret_cast<char*>(out);
    // Quantized into the upper half of the int16 area, then widened forward in place:
    // element d is read (byte head_dim + d) before anything overwrites it (bytes 2d, 2d + 1).
    auto* quantized = reinterpret_cast<int8_t*>(bytes + head_dim);
    const float scale = quantize_row(rows + int64_t(g) * head_dim, DType::kFloat32, head_dim,
                                     quantized);
    for (int d = 0; d < head_dim; ++d) {
      const int16_t value = quantized[d];
      std::memcpy(bytes + 2 * d, &value, sizeof(value));
    }
    std::memcpy(out + scale_index(head_dim), &scale, sizeof(scale));
  }
}

// Per 128-bit half: (a0 + a2, b0 + b2, a1 + a3, b1 + b3).
APEX_TARGET inline __m256i add_pairs(__m256i a, __m256i b) {
  return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}

// lane t = the sum of the lanes of acc[t]: unpack-and-add levels (a VPHADDD, three uops,
// issued once per two cycles on the EPYC this was measured on).
APEX_TARGET inline __m256i reduce_tile(const __m256i (&acc)[kTileTokens]) {
  const __m256i pair01 = add_pairs(acc[0], acc[1]);
  const __m256i pair23 = add_pairs(acc[2], acc[3]);
  const __m256i pair45 = add_pairs(acc[4], acc[5]);
  const __m256i pair67 = add_pairs(acc[6], acc[7]);
  // per 128-bit half: tokens 0-3, then tokens 4-7
  const __m256i low = _mm256_add_epi32(_mm256_unpacklo_epi64(pair01, pair23),
                                       _mm256_unpackhi_epi64(pair01, pair23));
  const __m256i high = _mm256_add_epi32(_mm256_unpacklo_epi64(pair45, pair67),
                                        _mm256_unpackhi_epi64(pair45, pair67));
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                          _mm256_permute2x128_si256(low, high, 0x31));
}

// kRows x kTokens int32 accumulators over tokens [token, token + kTokens); each widened key
// chunk serves every row, each q chunk every token. kHeadDim > 0 fixes head_dim at compile
// time (every address a constant offset). The d loop stays rolled: unrolled, GCC hoists every
// q chunk out of the token loop and spills them to the stack.
template <int kRows, int kTokens, int kHeadDim>
APEX_TARGET inline void int_dots_step(const float* q, const int8_t* k, int token,
                                      int runtime_head_dim, __m256i (&out)[kRows][kTileTokens],
                                      int slot) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const auto* q_elements = reinterpret_cast<const int16_t*>(q);
  const int64_t q_stride = 2 * row_floats(head_dim);  // int16 elements between q rows
  const int8_t* keys_base = k + int64_t(token) * head_dim;
  __m256i acc[kRows][kTokens];
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t) acc[g][t] = _mm256_setzero_si256();
#pragma GCC unroll 1
  for (int d = 0; d < head_dim; d += kStep) {
    __m256i keys[kTokens];
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t)
      keys[t] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys_base + t * head_dim + d)));
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g) {
      __m256i query =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q_elements + g * q_stride + d));
      if (kTokens > 1) in_register(query);
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t) {
        acc[g][t] = _mm256_add_epi32(acc[g][t], _mm256_madd_epi16(query, keys[t]));
        in_register(acc[g][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t) out[g][slot + t] = acc[g][t];
}

template <int kRows, int kHeadDim>
APEX_TARGET void int_scores_rows(const float* q, const int8_t* k, int num_tokens, int head_dim,
                                 float scale, float* scores, RowPrefetch& ahead) {
  constexpr int kTokens = kRows >= 8 ? 1 : (kRows >= 4 ? 2 : 4);
  __m256 row_scales[kRows];  // q's quantization step times the softmax scale
  for (int g = 0; g < kRows; ++g)
    row_scales[g] = _mm256_set1_ps(q_scale(q + g * row_floats(head_dim), head_dim) * scale);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    __m256i sums[kRows][kTileTokens];
    int t = 0;
    for (; t + kTokens <= count; t += kTokens) {
      ahead.step(kTokens * RowPrefetch::kLinesPerStep / 2);  // 8-bit: a head per 4 rows' tile
      int_dots_step<kRows, kTokens, kHeadDim>(q, k, token + t, head_dim, sums, t);
    }
    for (; t < count; ++t) int_dots_step<kRows, 1, kHeadDim>(q, k, token + t, head_dim, sums, t);
    for (; t < kTileTokens; ++t)
      for (int g = 0; g < kRows; ++g) sums[g][t] = _mm256_setzero_si256();
    for (int g = 0; g < kRows; ++g) {
      // Sums stay below 2^24 (head_dim x 127 x 127 for head_dim <= 1040): exact in float.
      const __m256 dots =
          _mm256_mul_ps(_mm256_cvtepi32_ps(reduce_tile(sums[g])), row_scales[g]);
      float* out = scores + g * num_tokens + token;
      if (count == kTileTokens) {
        _mm256_storeu_ps(out, dots);
      } else {
        alignas(32) float tile[kTileTokens];
        _mm256_store_ps(tile, dots);
        std::memcpy(out, tile, sizeof(float) * count);
      }
    }
  }
}

// Head dims that are not a multiple of 16 (no model in use has them): the same integer dot
// products, one at a time.
void plain_int_scores(const float* q, const int8_t* k, int num_rows, int num_tokens,
                      int head_dim, float scale, float* scores) {
  for (int g = 0; g < num_rows; ++g) {
    const float* row = q + g * row_floats(head_dim);
    const float row_scale = q_scale(row, head_dim) * scale;
    for (int t = 0; t < num_tokens; ++t) {
      int32_t dot = 0;
      for (int d = 0; d < head_dim; ++d)
        dot += int32_t(q_element(row, d)) * k[int64_t(t) * head_dim + d];
      scores[g * num_tokens + t] = float(dot) * row_scale;
    }
  }
}

template <int kHeadDim>
APEX_TARGET void int_scores(const float* prepared_q, const int8_t* k, int num_rows,
                            int num_tokens, int head_dim, float scale, float* scores,
                            RowPrefetch& ahead) {
  for_row_groups<8>(num_rows, [&](auto rows, int g) APEX_TARGET {
    int_scores_rows<decltype(rows)::value, kHeadDim>(prepared_q + g * row_floats(head_dim), k,
                                                     num_tokens, head_dim, scale,
                                                     scores + g * num_tokens, ahead);
  });
}

APEX_TARGET void int8_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores,
                             RowPrefetch& ahead) {
  const auto* keys = static_cast<const int8_t*>(k);
  if (!int_dots(head_dim)) {
    plain_int_scores(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores);
  } else if (head_dim == 128) {
    int_scores<128>(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores, ahead);
  } else {
    int_scores<0>(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores, ahead);
  }
}

// ---- Online softmax, four rows at a time ------------------------------------------------
// A row's step is a chain of dependent reductions (max, then the exps, then the sum); the
// float AVX2 softmax runs them row after row. Here up to four rows advance together: their
// reductions share one transpose-and-combine tree and their exps interleave.
constexpr int kTreeRows = 4;  // rows per shared reduction tree

// exp(x) for x <= 0 with the float kernels' range reduction and polynomial (x clamped at -87:
// exp(-inf) gives ~1e-38, not 0), on a shorter dependency chain: n = round(x / ln 2) by adding
// 1.5 * 2^23, which leaves n in the low mantissa bits (2^n is built from them directly), and
// the degree-6 polynomial in r evaluated in powers of r^2 (three FMAs deep, not six).
APEX_TARGET inline __m256 exp_approx(__m256 x) {
  const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(shifted, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 c01 = _mm256_add_ps(r, _mm256_set1_ps(1.0f));
  const __m256 c23 = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 6.0f), _mm256_set1_ps(0.5f));
  const __m256 c45 =
      _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 120.0f), _mm256_set1_ps(1.0f / 24.0f));
  __m256 poly = _mm256_fmadd_ps(r2, _mm256_set1_ps(1.0f / 720.0f), c45);
  poly = _mm256_fmadd_ps(poly, r2, c23);
  poly = _mm256_fmadd_ps(poly, r2, c01);
  // The bits of `shifted` are 0x4b400000 + n.
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4b400000 - 127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(exponent));
}

struct MaxOf {
  APEX_TARGET __m256 operator()(__m256 a, __m256 b) const { return _mm256_max_ps(a, b); }
};
struct SumOf {
  APEX_TARGET __m256 operator()(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
};

// Lane g (of 4) = combine over the 8 lanes of rows[g], for an associative combine.
template <class Combine>
APEX_TARGET inline __m128 combine_rows(const __m256 (&rows)[kTreeRows], Combine combine) {
  const __m256 rows01 = combine(_mm256_unpacklo_ps(rows[0], rows[1]),
                                _mm256_unpackhi_ps(rows[0], rows[1]));
  const __m256 rows23 = combine(_mm256_unpacklo_ps(rows[2], rows[3]),
                                _mm256_unpackhi_ps(rows[2], rows[3]));
  const __m256 halves = combine(_mm256_shuffle_ps(rows01, rows23, 0x44),
                                _mm256_shuffle_ps(rows01, rows23, 0xee));
  return _mm256_castps256_ps128(
      combine(halves, _mm256_permute2f128_ps(halves, halves, 1)));
}

// Lanes [0, count) of tokens t..t+7 of a row, -inf in the others.
APEX_TARGET inline __m256 load_scores(const float* row, int count) {
  if (count >= 8) return _mm256_loadu_ps(row);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                          _mm256_maskload_ps(row, inside), _mm256_castsi256_ps(inside));
}

APEX_TARGET inline void store_weights(float* row, int count, __m256 weights) {
  if (count >= 8) return _mm256_storeu_ps(row, weights);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(row, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes), weights);
}

// Rows g < kRows (<= 4); the reductions of the missing rows repeat row 0 and are not stored.
template <int kRows>
APEX_TARGET void softmax_rows(float* scores, int num_tokens, float* running_max,
                              float* running_sum, float* alpha) {
  __m256 partial[kTreeRows];
  for (int g = 0; g < kRows; ++g)
    partial[g] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int t = 0; t < num_tokens; t += 8)
    for (int g = 0; g < kRows; ++g)
      partial[g] = _mm256_max_ps(partial[g], load_scores(scores + g * num_tokens + t,
                                                         num_tokens - t));
  for (int g = kRows; g < kTreeRows; ++g) partial[g] = partial[0];
  alignas(16) float old_max[kTreeRows], new_max[kTreeRows];
  for (int g = 0; g < kTreeRows; ++g) old_max[g] = running_max[g < kRows ? g : 0];
  const __m128 old_max4 = _mm_load_ps(old_max);
  const __m128 new_max4 = _mm_max_ps(old_max4, combine_rows(partial, MaxOf()));
  _mm_store_ps(new_max, new_max4);
  __m256 row_max[kRows];  // broadcast in registers: a store and reload would sit on the chain
  for (int g = 0; g < kRows; ++g)
    row_max[g] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(new_max4),
                                          _mm256_set1_epi32(g));
  // exp(0) is exactly 1: a maximum that did not move leaves acc as it is.
  const __m128 alpha4 = _mm256_castps256_ps128(
      exp_approx(_mm256_castps128_ps256(_mm_sub_ps(old_max4, new_max4))));
  for (int g = 0; g < kRows; ++g) partial[g] = _mm256_setzero_ps();
  for (int t = 0; t < num_tokens; t += 8)
    for (int g = 0; g < kRows; ++g) {
      float* row = scores + g * num_tokens + t;
      const __m256 weights = exp_approx(_mm256_sub_ps(load_scores(row, num_tokens - t),
                                                      row_max[g]));
      store_weights(row, num_tokens - t, weights);
      partial[g] = _mm256_add_ps(partial[g], weights);
    }
  for (int g = kRows; g < kTreeRows; ++g) partial[g] = partial[0];
  alignas(16) float old_sum[kTreeRows], new_sum[kTreeRows], new_alpha[kTreeRows];
  for (int g = 0; g < kTreeRows; ++g) old_sum[g] = running_sum[g < kRows ? g : 0];
  _mm_store_ps(new_sum, _mm_fmadd_ps(_mm_load_ps(old_sum), alpha4, combine_rows(partial, SumOf())));
  _mm_store_ps(new_alpha, alpha4);
  for (int g = 0; g < kRows; ++g) {
    running_max[g] = new_max[g];
    running_sum[g] = new_sum[g];
    alpha[g] = new_alpha[g];
  }
}

APEX_TARGET void int8_softmax(float* scores, int num_rows, int num_tokens, float* running_max,
                              float* running_sum, float* alpha) {
  for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
    softmax_rows<decltype(rows)::value>(scores + g * num_tokens, num_tokens, running_max + g,
                                        running_sum + g, alpha + g);
  });
}

// ---- p . v in integers --------------------------------------------------------------------
// Each row's weights of a span of at most kSpanTokens tokens (p >= 0, the token's v scale
// already applied) become 15-bit integers relative to the span's largest: w = round(p / step),
// step = max / 32767. Two token rows of v, byte-interleaved and widened to int16, meet the
// broadcast weight pair (w[t], w[t + 1]) in one VPMADDWD per 8 dims, which sums both tokens
// into int32 lanes in the natural dim order: exact (16 x 32767 x 127 < 2^31), and one convert
// and FMA per 8 dims per span bring them into the float acc.
constexpr int kSpanTokens = 16;
constexpr int kSpanPairs = kSpanTokens / 2;
constexpr float kWeightLevels = 32767.0f;

// Quantized weights of kRows rows of one span: pairs[g][j] holds w[2j] (low) and w[2j + 1]
// (high) as int16; step[g] turns an integer sum back into float (0: a row of zeros).
template <int kRows>
struct SpanWeights {
  alignas(32) int32_t pairs[kRows][kSpanPairs];
  alignas(16) float step[kTreeRows];
};

// The rows' largest weights come out of one shared reduction tree, and one division serves
// them all.
template <int kRows>
APEX_TARGET inline void quantize_span(const float* p, int num_tokens, int first, int count,
                                      SpanWeights<kRows>& weights) {
  __m256 low[kRows], high[kRows], most[kTreeRows];
  for (int g = 0; g < kRows; ++g) {
    const float* row = p + g * num_tokens + first;
    if (count == kSpanTokens) {
      low[g] = _mm256_loadu_ps(row);
      high[g] = _mm256_loadu_ps(row + 8);
    } else {  // a short block: zero weights past count
      alignas(32) float padded[kSpanTokens] = {};
      std::memcpy(padded, row, sizeof(float) * count);
      low[g] = _mm256_load_ps(padded);
      high[g] = _mm256_load_ps(padded + 8);
    }
    most[g] = _mm256_max_ps(low[g], high[g]);
  }
  for (int g = kRows; g < kTreeRows; ++g) most[g] = most[0];
  const __m128 largest = combine_rows(most, MaxOf());
  const __m128 positive = _mm_cmpgt_ps(largest, _mm_setzero_ps());
  alignas(16) float to_levels[kTreeRows];
  _mm_store_ps(to_levels, _mm_and_ps(_mm_div_ps(_mm_set1_ps(kWeightLevels), largest), positive));
  _mm_store_ps(weights.step,
               _mm_and_ps(_mm_mul_ps(largest, _mm_set1_ps(1.0f / kWeightLevels)), positive));
  for (int g = 0; g < kRows; ++g) {
    const __m256 scale = _mm256_set1_ps(to_levels[g]);
    // packs interleaves the 128-bit halves (tokens 0-3, 8-11, 4-7, 12-15): permute them back.
    const __m256i levels =
        _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(low[g], scale)),
                           _mm256_cvtps_epi32(_mm256_mul_ps(high[g], scale)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(weights.pairs[g]),
                       _mm256_permute4x64_epi64(levels, 0xd8));
  }
}

// Adds, for dims [d, d + 16), both tokens of pair j weighted into sums[g][0] (dims d..d+7) and
// sums[g][1] (d+8..d+15). `second` is the pair's second token row (zeros past a short block).
template <int kRows>
APEX_TARGET inline void add_pair(const int32_t (*pairs)[kSpanPairs], int j, __m128i first,
                                 __m128i second, __m256i (&sums)[kRows][2]) {
  const __m256i low = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(first, second));
  const __m256i high = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(first, second));
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) {
    const __m256i pair = _mm256_set1_epi32(pairs[g][j]);  // a load, no shuffle
    sums[g][0] = _mm256_add_epi32(sums[g][0], _mm256_madd_epi16(low, pair));
    sums[g][1] = _mm256_add_epi32(sums[g][1], _mm256_madd_epi16(high, pair));
    in_register(sums[g][0]);
    in_register(sums[g][1]);
  }
}

// acc += step * (integer sums) over one span of `count` tokens for kRows rows. kFull: count
// is kSpanTokens (a constant trip count, fully unrolled).
template <int kRows, bool kFull, int kHeadDim>
APEX_TARGET void accumulate_span(const SpanWeights<kRows>& weights, const int8_t* v,
                                 int runtime_count, int runtime_head_dim, float* acc) {
  const int count = kFull ? kSpanTokens : runtime_count;
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  for (int d = 0; d < head_dim; d += kStep) {
    __m256i sums[kRows][2];
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) sums[g][0] = sums[g][1] = _mm256_setzero_si256();
    const int8_t* column = v + d;
    // Read the weights afresh per pass: hoisted out of the d loop, they would be broadcast
    // from registers (a shuffle each) or spilled.
    const int32_t(*pairs)[kSpanPairs] = weights.pairs;
    asm("" : "+r"(pairs));
#pragma GCC unroll 8
    for (int j = 0; j < count / 2; ++j) {
      const __m128i first =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(column + int64_t(2 * j) * head_dim));
      const __m128i second = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(column + int64_t(2 * j + 1) * head_dim));
      add_pair<kRows>(pairs, j, first, second, sums);
    }
    if (count % 2 != 0) {  // the last token has no partner inside the block
      const __m128i last = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(column + int64_t(count - 1) * head_dim));
      add_pair<kRows>(pairs, count / 2, last, _mm_setzero_si128(), sums);
    }
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) {
      const __m256 step = _mm256_set1_ps(weights.step[g]);
      float* out = acc + int64_t(g) * head_dim + d;
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half)
        _mm256_storeu_ps(out + 8 * half, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[g][half]), step,
                                                         _mm256_loadu_ps(out + 8 * half)));
    }
  }
}

template <int kRows, int kHeadDim>
APEX_TARGET void int_accumulate_rows(const float* p, const int8_t* v, int num_tokens,
                                     int head_dim, const float* alpha, float* acc) {
  // Once a few blocks are in, the running maximum rarely moves: rescale only where it did.
  for (int g = 0; g < kRows; ++g) {
    if (alpha[g] == 1.0f) continue;
    const __m256 scale = _mm256_set1_ps(alpha[g]);
    float* row = acc + int64_t(g) * head_dim;
    for (int d = 0; d < head_dim; d += 8)
      _mm256_storeu_ps(row + d, _mm256_mul_ps(_mm256_loadu_ps(row + d), scale));
  }
  SpanWeights<kRows> weights;
  for (int first = 0; first < num_tokens; first += kSpanTokens) {
    const int count = num_tokens - first < kSpanTokens ? num_tokens - first : kSpanTokens;
    quantize_span(p, num_tokens, first, count, weights);
    const int8_t* span_v = v + int64_t(first) * head_dim;
    if (count == kSpanTokens)
      accumulate_span<kRows, true, kHeadDim>(weights, span_v, count, head_dim, acc);
    else
      accumulate_span<kRows, false, kHeadDim>(weights, span_v, count, head_dim, acc);
  }
}

template <int kHeadDim>
APEX_TARGET void int_accumulate(const float* p, const int8_t* v, int num_rows, int num_tokens,
                                int head_dim, const float* alpha, float* acc) {
  for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
    int_accumulate_rows<decltype(rows)::value, kHeadDim>(
        p + g * num_tokens, v, num_tokens, head_dim, alpha + g, acc + int64_t(g) * head_dim);
  });
}

// Head dims that are not a multiple of 16 keep the float AVX2 p . v.
APEX_TARGET void int8_accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                                 int head_dim, const float* alpha, float* acc) {
  const auto* values = static_cast<const int8_t*>(v);
  if (!int_dots(head_dim)) {
    avx2_kernel_ops(DType::kInt8)->accumulate(p, v, num_rows, num_tokens, head_dim, alpha, acc);
  } else if (head_dim == 128) {
    int_accumulate<128>(p, values, num_rows, num_tokens, head_dim, alpha, acc);
  } else {
    int_accumulate<0>(p, values, num_rows, num_tokens, head_dim, alpha, acc);
  }
}

}  // namespace

const KernelOps* avx2_int8_kernel_ops() {
  static const KernelOps ops = [] {
    KernelOps int8 = *avx2_kernel_ops(DType::kInt8);  // its softmax and p . v
    int8.prepare_q = int8_prepare_q;
    int8.scores = int8_scores;
    int8.softmax = int8_softmax;
    int8.accumulate = int8_accumulate;
    return int8;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
