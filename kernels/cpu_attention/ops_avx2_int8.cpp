// int8 KV on AVX2: q . k and p . v as VPMADDUBSW integer dot products (32 multiply-adds of an
// unsigned byte by a signed one per instruction, pairs summed into int16 lanes), then VPMADDWD
// by ones to sum those pairs into exact int32 lanes; the softmax advances four rows at a time.
// VPMADDUBSW saturates its int16 pair sums, so one side of each product has 7 bits:
// - q . k: q is quantized per row to [-63, 63] (kQueryLevels) and the keys are read as k + 128,
//   unsigned (one XOR per 32 bytes, shared by every row): pairs stay within 2 x 255 x 63, and
//   the row's 128 * sum(q), computed once, takes the offset back out. The AVX512-VNNI kernels
//   read k + 128 the same way, with 8-bit q (VPDPBUSD does not saturate).
// - p . v: each row's weights of a span of 16 tokens become 7-bit integers relative to the
//   span's largest (kWeightLevels); four tokens' values are byte-interleaved per dim, so one
//   VPMADDUBSW and one VPMADDWD sum four tokens into each dim's int32 lane.
// Against the earlier int16 kernels (VPMADDWD on widened keys and 15-bit weights: half the
// multiply-adds per instruction, plus the widening), a KV block costs ~25% less.
// Other head dims (not a multiple of 16, or 16) take the same integer products, scalar.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

#define APEX_TARGET __attribute__((target("avx2,fma")))

namespace apex {
namespace {

constexpr int kChunk = 32;       // bytes per register: key elements, or v dims per pass
constexpr int kTileTokens = 8;   // scores per int32 register after the reduction
constexpr int kQueryLevels = 63;

// Head dims of whole 16-dim halves, at least one 32-byte chunk.
inline bool int_dots(int head_dim) { return head_dim % 16 == 0 && head_dim >= kChunk; }

// Keeps `value` in a register, opaque to the optimizer: a q chunk folded into each multiply as
// a memory operand would be loaded once per token, and integer adds being associative, GCC
// would turn a running sum's chain into a tree over all its products, spilled to the stack.
APEX_TARGET inline void in_register(__m256i& value) { asm("" : "+x"(value)); }

// Lanes [0, 16) of a 32-byte register from 16 bytes, the rest zero (the 16-dim tail of a row).
APEX_TARGET inline __m256i load_16(const int8_t* bytes) {
  return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

APEX_TARGET inline __m256i load_32(const int8_t* bytes) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
}

// int32 lanes += the int16 pair sums of VPMADDUBSW(unsigned_bytes, signed_bytes).
APEX_TARGET inline __m256i add_dots(__m256i sums, __m256i unsigned_bytes, __m256i signed_bytes) {
  return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_bytes,
                                                                       signed_bytes),
                                                  _mm256_set1_epi16(1)));
}

// Prepared q, per row (row_floats(head_dim) floats apart, 32-byte multiples; inside
// prepared_q_floats' room): the 7-bit row as int8 in chunks of kChunk bytes, then its float
// scale and its int32 128 * sum(q). A row whose last chunk has only 16 dims meets the keys
// [head_dim - 32, head_dim) there (key_offset), so that chunk holds 16 zeros, then those dims.
inline int padded_dims(int head_dim) { return (head_dim + kChunk - 1) / kChunk * kChunk; }
inline int64_t row_floats(int head_dim) { return padded_dims(head_dim) / 4 + 8; }
inline int key_offset(int d, int head_dim) {
  return d + kChunk <= head_dim ? d : head_dim - kChunk;
}

inline const int8_t* q_bytes(const float* row) { return reinterpret_cast<const int8_t*>(row); }

inline float q_scale(const float* row, int head_dim) {
  float value;
  std::memcpy(&value, row + padded_dims(head_dim) / 4, sizeof(value));
  return value;
}

inline int32_t q_offset(const float* row, int head_dim) {
  int32_t value;
  std::memcpy(&value, row + padded_dims(head_dim) / 4 + 1, sizeof(value));
  return value;
}

// Byte of q element d in a prepared row.
inline int q_index(int d, int head_dim) {
  const int chunk = d / kChunk * kChunk;
  return chunk + d - key_offset(chunk, head_dim);
}

// quantize_row (common.h) of a float32 row to kQueryLevels levels, 8 elements at a time: the
// same division and round-half-to-even (prepare_q runs for every query row of every step).
APEX_TARGET float quantize_q_row(const float* row, int head_dim, int8_t* out) {
  const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 most = _mm256_setzero_ps();
  int d = 0;
  for (; d + 8 <= head_dim; d += 8)
    // Operands in this order, a NaN element is skipped, as quantize_row's comparison skips it.
    most = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + d), magnitude_bits), most);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, most);
  float absmax = 0.0f;
  for (float lane : lanes) absmax = lane > absmax ? lane : absmax;
  for (; d < head_dim; ++d) absmax = std::fabs(row[d]) > absmax ? std::fabs(row[d]) : absmax;
  const float top = float(kQueryLevels);
  const float scale = absmax / top;
  const __m256 divisor = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
  for (d = 0; d + 8 <= head_dim; d += 8) {
    const __m256 value = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(row + d), divisor),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i words = _mm_packs_epi32(
        _mm256_castsi256_si128(_mm256_cvtps_epi32(value)),
        _mm256_extracti128_si256(_mm256_cvtps_epi32(value), 1));
    // |value| <= top already (x / (max|x| / top)), up to the division's rounding: clamp.
    const __m128i bytes = _mm_max_epi8(_mm_min_epi8(_mm_packs_epi16(words, words),
                                                    _mm_set1_epi8(kQueryLevels)),
                                       _mm_set1_epi8(-kQueryLevels));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + d), bytes);
  }
  for (; d < head_dim; ++d) {
    const float value = std::nearbyint(row[d] / (scale > 0.0f ? scale : 1.0f));
    out[d] = int8_t(value > top ? top : (value < -top ? -top : value));
  }
  return scale;
}

void int8_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const float* rows = static_cast<const float*>(q);  // int8 kernels take q in float32
  int8_t on_stack[1024];  // head dims past 1024 (none in use) take the heap
  std::vector<int8_t> on_heap(head_dim <= 1024 ? 0 : head_dim);
  int8_t* quantized = head_dim <= 1024 ? on_stack : on_heap.data();
  for (int g = 0; g < num_rows; ++g) {
    float* out = prepared + g * row_floats(head_dim);
    const float scale = quantize_q_row(rows + int64_t(g) * head_dim, head_dim, quantized);
    auto* chunks = reinterpret_cast<int8_t*>(out);
    std::memset(chunks, 0, padded_dims(head_dim));
    int32_t sum = 0;
    for (int d = 0; d < head_dim; ++d) {
      sum += quantized[d];
      chunks[q_index(d, head_dim)] = quantized[d];
    }
    const int32_t offset = 128 * sum;
    std::memcpy(out + padded_dims(head_dim) / 4, &scale, sizeof(scale));
    std::memcpy(out + padded_dims(head_dim) / 4 + 1, &offset, sizeof(offset));
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

// kRows x kTokens int32 accumulators of q . (k + 128) over tokens [token, token + kTokens);
// each key chunk serves every row, each q chunk every token (pinned to a register, so that
// GCC neither reloads it per token nor hoists every chunk out of the token loop and spills
// them). kHeadDim > 0 fixes head_dim at compile time (every address a constant offset).
template <int kRows, int kTokens, int kHeadDim>
APEX_TARGET inline void int_dots_step(const float* q, const int8_t* k, int token,
                                      int runtime_head_dim, __m256i (&out)[kRows][kTileTokens],
                                      int slot) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const int8_t* queries = q_bytes(q);
  const int64_t q_stride = 4 * row_floats(head_dim);  // bytes between q rows
  const int8_t* keys_base = k + int64_t(token) * head_dim;
  const __m256i flip = _mm256_set1_epi8(char(0x80));  // k + 128, as an unsigned byte
  __m256i acc[kRows][kTokens];
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t) acc[g][t] = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int d = 0; d < head_dim; d += kChunk) {
    const int at = key_offset(d, head_dim);
    __m256i keys[kTokens];
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t)
      keys[t] = _mm256_xor_si256(load_32(keys_base + t * head_dim + at), flip);
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g) {
      __m256i query = load_32(queries + g * q_stride + d);
      if (kTokens > 1) in_register(query);
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t) {
        acc[g][t] = add_dots(acc[g][t], keys[t], query);
        in_register(acc[g][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t) out[g][slot + t] = acc[g][t];
}

// scores[g * num_tokens + t] = dot(q[g], k[t]) * q's step * scale * k_scales[t], for rows
// [0, kRows) of a prepared q.
template <int kRows, int kHeadDim>
APEX_TARGET void int_scores_rows(const float* q, const int8_t* k, int num_tokens, int head_dim,
                                 float scale, const float* k_scales, float* scores,
                                 RowPrefetch& ahead) {
  constexpr int kTokens = kRows >= 4 ? 2 : 4;  // tokens per key load: 8 accumulators or more
  __m256 row_scales[kRows];   // q's quantization step times the softmax scale
  __m256i row_offsets[kRows];  // 128 * sum(q): what reading k + 128 added
  for (int g = 0; g < kRows; ++g) {
    const float* row = q + g * row_floats(head_dim);
    row_scales[g] = _mm256_set1_ps(q_scale(row, head_dim) * scale);
    row_offsets[g] = _mm256_set1_epi32(q_offset(row, head_dim));
  }
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
    alignas(32) float tile_scales[kTileTokens] = {};
    std::memcpy(tile_scales, k_scales + token, sizeof(float) * count);
    const __m256 token_scales = _mm256_load_ps(tile_scales);
    for (int g = 0; g < kRows; ++g) {
      // |q . k| <= head_dim x 63 x 127: exact in float for head dims up to 2096.
      const __m256 dots = _mm256_mul_ps(
          _mm256_mul_ps(
              _mm256_cvtepi32_ps(_mm256_sub_epi32(reduce_tile(sums[g]), row_offsets[g])),
              row_scales[g]),
          token_scales);
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

// Head dims that are not a multiple of 16, or 16 (no model in use has them): the same
// integer dot products, one at a time.
void plain_int_scores(const float* q, const int8_t* k, int num_rows, int num_tokens,
                      int head_dim, float scale, const float* k_scales, float* scores) {
  for (int g = 0; g < num_rows; ++g) {
    const float* row = q + g * row_floats(head_dim);
    const float row_scale = q_scale(row, head_dim) * scale;
    for (int t = 0; t < num_tokens; ++t) {
      int32_t dot = 0;
      for (int d = 0; d < head_dim; ++d)
        dot += int32_t(q_bytes(row)[q_index(d, head_dim)]) * k[int64_t(t) * head_dim + d];
      scores[g * num_tokens + t] = float(dot) * row_scale * k_scales[t];
    }
  }
}

// ---- Online softmax, four rows at a time ------------------------------------------------
// A row's step is a chain of dependent reductions (max, then the exps, then the sum); the
// float AVX2 softmax runs them row after row. Here up to four rows advance together: their
// reductions share one transpose-and-combine tree and their exps interleave. A span's scores
// (at most 16 tokens) stay in registers from the max to the quantized weights.
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

// All ones in lanes [0, count) of 8.
APEX_TARGET inline __m256i lanes_below(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lanes [0, count) of tokens t..t+7 of a row, -inf in the others.
APEX_TARGET inline __m256 load_scores(const float* row, int count) {
  if (count >= 8) return _mm256_loadu_ps(row);
  const __m256i inside = lanes_below(count);
  return _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                          _mm256_maskload_ps(row, inside), _mm256_castsi256_ps(inside));
}

// ---- p . v in integers --------------------------------------------------------------------
// Each row's weights of a span of at most kSpanTokens tokens (p >= 0, the token's v scale
// already applied) become 7-bit integers relative to the span's largest: w = round(p / step),
// step = max / 127. Four token rows of v, byte-interleaved (each dim's dword holds its four
// tokens' values), meet the broadcast weights (w[t] .. w[t + 3]) in one VPMADDUBSW and one
// VPMADDWD by ones per 8 dims: exact (16 x 127 x 127 < 2^31), and one convert and FMA per 8
// dims per span bring the int32 sums into the float acc.
constexpr int kSpanTokens = 16;
constexpr float kWeightLevels = 127.0f;

// Quantized weights of kRows rows of one span: levels[g][t] = w[t] (zero past a short span);
// step[g] turns an integer sum back into float (0: a row of zeros).
template <int kRows>
struct SpanWeights {
  alignas(16) uint8_t levels[kRows][kSpanTokens];
  alignas(16) float step[kTreeRows];
};

// Lanes [0, count) of a span's 8 token scales, zero in the others.
APEX_TARGET inline __m256 load_token_scales(const float* scales, int count) {
  if (count >= 8) return _mm256_loadu_ps(scales);
  return _mm256_maskload_ps(scales, lanes_below(count));
}

// One online-softmax step on rows g < kRows (<= 4) of a span's scores [kRows, count]:
// running_max[g] and running_sum[g] updated, alpha[g] = exp(old max - new max), and the
// weights p = exp(x - new max), times the token's v scale, quantized into `weights`. The
// reductions of the missing rows repeat row 0 and are not stored; the rows' largest weights
// come out of one shared tree, and one division serves them all.
template <int kRows>
APEX_TARGET void span_softmax(const float* scores, int count, const float* v_scales,
                              float* running_max, float* running_sum, float* alpha,
                              SpanWeights<kRows>& weights) {
  __m256 x[kRows][2], partial[kTreeRows];
  for (int g = 0; g < kRows; ++g) {
    const float* row = scores + g * count;
    x[g][0] = load_scores(row, count);
    x[g][1] = load_scores(row + 8, count - 8);
    partial[g] = _mm256_max_ps(x[g][0], x[g][1]);
  }
  for (int g = kRows; g < kTreeRows; ++g) partial[g] = partial[0];
  alignas(16) float old_max[kTreeRows], new_max[kTreeRows];
  for (int g = 0; g < kTreeRows; ++g) old_max[g] = running_max[g < kRows ? g : 0];
  const __m128 old_max4 = _mm_load_ps(old_max);
  const __m128 new_max4 = _mm_max_ps(old_max4, combine_rows(partial, MaxOf()));
  _mm_store_ps(new_max, new_max4);
  // exp(0) is exactly 1: a maximum that did not move leaves acc as it is.
  const __m128 alpha4 = _mm256_castps256_ps128(
      exp_approx(_mm256_castps128_ps256(_mm_sub_ps(old_max4, new_max4))));
  const __m256 v_scale[2] = {load_token_scales(v_scales, count),
                             load_token_scales(v_scales + 8, count - 8)};
  __m256 most[kTreeRows];
  for (int g = 0; g < kRows; ++g) {
    // the row's maximum broadcast in registers: a store and reload would sit on the chain
    const __m256 row_max =
        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(new_max4), _mm256_set1_epi32(g));
    for (int h = 0; h < 2; ++h) x[g][h] = exp_approx(_mm256_sub_ps(x[g][h], row_max));
    partial[g] = _mm256_add_ps(x[g][0], x[g][1]);
    for (int h = 0; h < 2; ++h) x[g][h] = _mm256_mul_ps(x[g][h], v_scale[h]);
    most[g] = _mm256_max_ps(x[g][0], x[g][1]);
  }
  for (int g = kRows; g < kTreeRows; ++g) partial[g] = most[g] = partial[0];
  alignas(16) float old_sum[kTreeRows], new_sum[kTreeRows];
  for (int g = 0; g < kTreeRows; ++g) old_sum[g] = running_sum[g < kRows ? g : 0];
  _mm_store_ps(new_sum,
               _mm_fmadd_ps(_mm_load_ps(old_sum), alpha4, combine_rows(partial, SumOf())));
  alignas(16) float new_alpha[kTreeRows];
  _mm_store_ps(new_alpha, alpha4);
  for (int g = 0; g < kRows; ++g) {
    running_max[g] = new_max[g];
    running_sum[g] = new_sum[g];
    alpha[g] = new_alpha[g];
  }
  const __m128 largest = combine_rows(most, MaxOf());
  const __m128 positive = _mm_cmpgt_ps(largest, _mm_setzero_ps());
  alignas(16) float to_levels[kTreeRows];
  _mm_store_ps(to_levels, _mm_and_ps(_mm_div_ps(_mm_set1_ps(kWeightLevels), largest), positive));
  _mm_store_ps(weights.step,
               _mm_and_ps(_mm_mul_ps(largest, _mm_set1_ps(1.0f / kWeightLevels)), positive));
  for (int g = 0; g < kRows; ++g) {
    const __m256 scale = _mm256_set1_ps(to_levels[g]);
    // packs interleaves the 128-bit halves (tokens 0-3, 8-11, 4-7, 12-15): permute them back.
    const __m256i words = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x[g][0], scale)),
                           _mm256_cvtps_epi32(_mm256_mul_ps(x[g][1], scale))),
        0xd8);
    _mm_store_si128(reinterpret_cast<__m128i*>(weights.levels[g]),
                    _mm_packus_epi16(_mm256_castsi256_si128(words),
                                     _mm256_extracti128_si256(words, 1)));
  }
}

// acc[:, d, d + kWidth) += step * (integer sums) over one span of `count` tokens for kRows
// rows, kWidth 32 or 16 (a row's last 16 dims). kFull: count is kSpanTokens (a constant trip
// count, fully unrolled; no token past the span's end to replace by zeros).
// Always inlined: as a call per 32 dims it cost 8% of p . v (block_ops).
template <int kRows, bool kFull, int kWidth>
__attribute__((always_inline)) APEX_TARGET inline void accumulate_dims(
    const SpanWeights<kRows>& weights, const int8_t* column, int count, int head_dim,
    float* acc) {
  // sums[g][j], per 128-bit half: j = 0: dims 0-3 | 16-19, 1: 4-7 | 20-23, 2: 8-11 | 24-27,
  // 3: 12-15 | 28-31 (the order the byte, then word, interleaves leave). Two passes over the
  // tokens (j = 0, 1, then 2, 3) keep each pass's sums in registers.
  __m256i sums[kRows][4];
  // Read the weights afresh per pass: hoisted across dims, they would be spilled.
  const uint8_t(*levels)[kSpanTokens] = weights.levels;
  auto token_row = [&](int t) APEX_TARGET {
    if (!kFull && t >= count) return _mm256_setzero_si256();
    const int8_t* row = column + int64_t(t) * head_dim;
    return kWidth == kChunk ? load_32(row) : load_16(row);
  };
#pragma GCC unroll 2
  for (int pass = 0; pass < 2; ++pass) {
    __m256i pass_sums[kRows][2];
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) pass_sums[g][0] = pass_sums[g][1] = _mm256_setzero_si256();
    asm("" : "+r"(levels));
#pragma GCC unroll 4
    for (int t = 0; t < count; t += 4) {
      // Tokens t, t + 1 and t + 2, t + 3 byte-interleaved: pass 0 takes dims 0-7 | 16-23,
      // pass 1 dims 8-15 | 24-31.
      const __m256i pair01 = pass == 0 ? _mm256_unpacklo_epi8(token_row(t), token_row(t + 1))
                                       : _mm256_unpackhi_epi8(token_row(t), token_row(t + 1));
      const __m256i pair23 = pass == 0
                                 ? _mm256_unpacklo_epi8(token_row(t + 2), token_row(t + 3))
                                 : _mm256_unpackhi_epi8(token_row(t + 2), token_row(t + 3));
      const __m256i quads[2] = {_mm256_unpacklo_epi16(pair01, pair23),
                                _mm256_unpackhi_epi16(pair01, pair23)};
#pragma GCC unroll 4
      for (int g = 0; g < kRows; ++g) {
        int32_t four;
        std::memcpy(&four, &levels[g][t], sizeof(four));
        const __m256i w = _mm256_set1_epi32(four);  // a load, no shuffle
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          pass_sums[g][j] = add_dots(pass_sums[g][j], w, quads[j]);
          in_register(pass_sums[g][j]);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) {
      sums[g][2 * pass] = pass_sums[g][0];
      sums[g][2 * pass + 1] = pass_sums[g][1];
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) {
    const __m256 step = _mm256_set1_ps(weights.step[g]);
    float* out = acc + int64_t(g) * head_dim;
    if (kWidth == kChunk) {  // acc keeps the sums' order, undone by int8_finish_acc
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[g][j]), step,
                                                      _mm256_loadu_ps(out + 8 * j)));
    } else {  // the low halves: dims 0-7, then 8-15
      const __m256i natural[2] = {_mm256_permute2x128_si256(sums[g][0], sums[g][1], 0x20),
                                  _mm256_permute2x128_si256(sums[g][2], sums[g][3], 0x20)};
#pragma GCC unroll 2
      for (int i = 0; i < 2; ++i)
        _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(natural[i]), step,
                                                      _mm256_loadu_ps(out + 8 * i)));
    }
  }
}

template <int kRows, bool kFull, int kHeadDim>
APEX_TARGET void accumulate_span(const SpanWeights<kRows>& weights, const int8_t* v,
                                 int runtime_count, int runtime_head_dim, float* acc) {
  const int count = kFull ? kSpanTokens : runtime_count;
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  int d = 0;
  for (; d + kChunk <= head_dim; d += kChunk)
    accumulate_dims<kRows, kFull, kChunk>(weights, v + d, count, head_dim, acc + d);
  if (d < head_dim) accumulate_dims<kRows, kFull, 16>(weights, v + d, count, head_dim, acc + d);
}

// Head dims that are not a multiple of 16, or 16: the same integer sums, one at a time.
template <int kRows>
void plain_accumulate(const SpanWeights<kRows>& weights, const int8_t* v, int count,
                      int head_dim, float* acc) {
  for (int g = 0; g < kRows; ++g)
    for (int d = 0; d < head_dim; ++d) {
      int32_t sum = 0;
      for (int t = 0; t < count; ++t) sum += weights.levels[g][t] * v[int64_t(t) * head_dim + d];
      acc[int64_t(g) * head_dim + d] += float(sum) * weights.step[g];
    }
}

// ---- The step: one kv head of one KV block, span by span --------------------------------
template <int kRows, int kHeadDim>
APEX_TARGET void attend_rows(const Int8Step& step, int first_row, int runtime_head_dim,
                             float scale) {
  const int head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const float* q = step.prepared_q + first_row * row_floats(head_dim);
  float* acc = step.acc + int64_t(first_row) * head_dim;
  for (int first = 0; first < step.num_tokens; first += kSpanTokens) {
    const int count =
        step.num_tokens - first < kSpanTokens ? step.num_tokens - first : kSpanTokens;
    const int8_t* k = step.k + int64_t(first) * head_dim;
    alignas(32) float scores[kRows * kSpanTokens];
    if (int_dots(head_dim)) {
      int_scores_rows<kRows, kHeadDim>(q, k, count, head_dim, scale, step.k_scales + first,
                                       scores, *step.ahead);
    } else {
      plain_int_scores(q, k, kRows, count, head_dim, scale, step.k_scales + first, scores);
    }
    if (first + kSpanTokens >= step.num_tokens) step.ahead->finish();
    SpanWeights<kRows> weights;
    alignas(16) float alpha[kRows];
    span_softmax<kRows>(scores, count, step.v_scales + first, step.running_max + first_row,
                        step.running_sum + first_row, alpha, weights);
    // Once a few blocks are in, the running maximum rarely moves: rescale only where it did.
    for (int g = 0; g < kRows; ++g) {
      if (alpha[g] == 1.0f) continue;
      const __m256 factor = _mm256_set1_ps(alpha[g]);
      float* row = acc + int64_t(g) * head_dim;
      int d = 0;
      for (; d + 8 <= head_dim; d += 8)
        _mm256_storeu_ps(row + d, _mm256_mul_ps(_mm256_loadu_ps(row + d), factor));
      for (; d < head_dim; ++d) row[d] *= alpha[g];
    }
    const int8_t* v = step.v + int64_t(first) * head_dim;
    if (!int_dots(head_dim)) {
      plain_accumulate(weights, v, count, head_dim, acc);
    } else if (count == kSpanTokens) {
      accumulate_span<kRows, true, kHeadDim>(weights, v, count, head_dim, acc);
    } else {
      accumulate_span<kRows, false, kHeadDim>(weights, v, count, head_dim, acc);
    }
  }
}

template <int kHeadDim>
APEX_TARGET void attend_steps(const Int8Step* steps, int num_steps, int num_rows, int head_dim,
                              float scale) {
  for (int i = 0; i < num_steps; ++i)
    for_row_groups<4>(num_rows, [&](auto rows, int g) APEX_TARGET {
      attend_rows<decltype(rows)::value, kHeadDim>(steps[i], g, head_dim, scale);
    });
}

void int8_attend(const Int8Step* steps, int num_steps, int num_rows, int head_dim,
                 float scale) {
  if (head_dim == 128) {
    attend_steps<128>(steps, num_steps, num_rows, head_dim, scale);
  } else {
    attend_steps<0>(steps, num_steps, num_rows, head_dim, scale);
  }
}

// accumulate_dims' order -> natural, in each whole 32-dim chunk of a row: (0-3, 16-19),
// (4-7, 20-23), (8-11, 24-27), (12-15, 28-31) back to 0-31.
void int8_finish_acc(float* acc, int num_rows, int head_dim) {
  if (!int_dots(head_dim)) return;  // the float p . v keeps the natural order
  for (int g = 0; g < num_rows; ++g)
    for (int d = 0; d + kChunk <= head_dim; d += kChunk) {
      float* chunk = acc + int64_t(g) * head_dim + d;
      float natural[kChunk];
      for (int j = 0; j < 4; ++j) {
        std::memcpy(natural + 4 * j, chunk + 8 * j, 4 * sizeof(float));
        std::memcpy(natural + 16 + 4 * j, chunk + 8 * j + 4, 4 * sizeof(float));
      }
      std::memcpy(chunk, natural, sizeof(natural));
    }
}

}  // namespace

const KernelOps* avx2_int8_kernel_ops() {
  // Only the fused step: q . k, softmax and p . v of a span pass the scores in registers.
  static const KernelOps ops = [] {
    KernelOps int8{int8_prepare_q, nullptr, nullptr, nullptr, "avx2", int8_finish_acc};
    int8.attend_int8 = int8_attend;
    return int8;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
