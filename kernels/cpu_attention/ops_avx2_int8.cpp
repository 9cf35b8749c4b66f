// int8 KV on AVX2: q . k as integer dot products. q is quantized per row to int8, exactly as
// the AVX512-VNNI kernels do (so both solve the same problem), and kept as int16; each key
// chunk is widened int8 -> int16 once per token and VPMADDWD multiplies it by every query row,
// summing pairs into int32 lanes. Against widening keys to float32 (two conversions per 8
// elements) and one FMA per 8 elements per row, that is one conversion per 16 elements and one
// multiply-add plus one integer add per 16 elements per row; the sums are exact in int32 and
// become float once per 8-token tile. p . v and the softmax stay the float AVX2 kernels.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "common.h"

#define APEX_TARGET __attribute__((target("avx2,fma")))

namespace apex {
namespace {

constexpr int kStep = 16;        // key elements per widened register
constexpr int kTileTokens = 8;   // scores per int32 register after the reduction

inline bool int_dots(int head_dim) { return head_dim % kStep == 0; }

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

// lane t = the sum of the lanes of acc[t].
APEX_TARGET inline __m256i reduce_tile(const __m256i (&acc)[kTileTokens]) {
  const __m256i pair01 = _mm256_hadd_epi32(acc[0], acc[1]);
  const __m256i pair23 = _mm256_hadd_epi32(acc[2], acc[3]);
  const __m256i pair45 = _mm256_hadd_epi32(acc[4], acc[5]);
  const __m256i pair67 = _mm256_hadd_epi32(acc[6], acc[7]);
  const __m256i low = _mm256_hadd_epi32(pair01, pair23);   // per 128-bit half: tokens 0-3
  const __m256i high = _mm256_hadd_epi32(pair45, pair67);  // tokens 4-7
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
      const __m256i query =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q_elements + g * q_stride + d));
#pragma GCC unroll 4
      for (int t = 0; t < kTokens; ++t)
        acc[g][t] = _mm256_add_epi32(acc[g][t], _mm256_madd_epi16(query, keys[t]));
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int t = 0; t < kTokens; ++t) out[g][slot + t] = acc[g][t];
}

template <int kRows, int kHeadDim>
APEX_TARGET void int_scores_rows(const float* q, const int8_t* k, int num_tokens, int head_dim,
                                 float scale, float* scores) {
  constexpr int kTokens = kRows >= 8 ? 1 : (kRows >= 4 ? 2 : 4);
  __m256 row_scales[kRows];  // q's quantization step times the softmax scale
  for (int g = 0; g < kRows; ++g)
    row_scales[g] = _mm256_set1_ps(q_scale(q + g * row_floats(head_dim), head_dim) * scale);
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    __m256i sums[kRows][kTileTokens];
    int t = 0;
    for (; t + kTokens <= count; t += kTokens)
      int_dots_step<kRows, kTokens, kHeadDim>(q, k, token + t, head_dim, sums, t);
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
                            int num_tokens, int head_dim, float scale, float* scores) {
  for (int g = 0; g < num_rows;) {
    const int left = num_rows - g;
    const float* q_rows = prepared_q + g * row_floats(head_dim);
    float* score_rows = scores + g * num_tokens;
    if (left >= 8) {
      int_scores_rows<8, kHeadDim>(q_rows, k, num_tokens, head_dim, scale, score_rows);
      g += 8;
    } else if (left >= 4) {
      int_scores_rows<4, kHeadDim>(q_rows, k, num_tokens, head_dim, scale, score_rows);
      g += 4;
    } else if (left >= 2) {
      int_scores_rows<2, kHeadDim>(q_rows, k, num_tokens, head_dim, scale, score_rows);
      g += 2;
    } else {
      int_scores_rows<1, kHeadDim>(q_rows, k, num_tokens, head_dim, scale, score_rows);
      g += 1;
    }
  }
}

APEX_TARGET void int8_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores) {
  const auto* keys = static_cast<const int8_t*>(k);
  if (!int_dots(head_dim)) {
    plain_int_scores(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores);
  } else if (head_dim == 128) {
    int_scores<128>(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores);
  } else {
    int_scores<0>(prepared_q, keys, num_rows, num_tokens, head_dim, scale, scores);
  }
}

}  // namespace

const KernelOps* avx2_int8_kernel_ops() {
  static const KernelOps ops = [] {
    KernelOps int8 = *avx2_kernel_ops(DType::kInt8);  // its softmax and p . v
    int8.prepare_q = int8_prepare_q;
    int8.scores = int8_scores;
    return int8;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
