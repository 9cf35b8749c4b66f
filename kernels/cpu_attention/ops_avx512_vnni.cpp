// int8 KV with AVX512-VNNI: q . k as integer dot products. q is quantized per row (llama.cpp
// does the same for its 8-bit caches); VPDPBUSD sums 4 u8 x s8 products into each int32 lane,
// 64 key elements per instruction, exact. It needs unsigned keys, so each tile's keys are
// flipped to k + 128 once, and 128 * sum(q) is taken off each score. p . v stays the float
// kernel of ops_avx512.cpp. Runs only after select_kernel_ops has found avx512vnni.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <cstring>

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

// Prepared q, per row (row_bytes(head_dim) apart, inside prepared_q_floats' room): the int8
// row padded with zeros to a multiple of 64, then its float scale and int32 sum.
inline int padded_bytes(int head_dim) { return (head_dim + 63) & ~63; }
inline int row_bytes(int head_dim) { return padded_bytes(head_dim) + 64; }

void vnni_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const float* rows = static_cast<const float*>(q);  // int8 kernels take q in float32
  const int padded = padded_bytes(head_dim);
  for (int g = 0; g < num_rows; ++g) {
    char* out = reinterpret_cast<char*>(prepared) + int64_t(g) * row_bytes(head_dim);
    auto* quantized = reinterpret_cast<int8_t*>(out);
    const float scale = quantize_row(rows + int64_t(g) * head_dim, DType::kFloat32, head_dim,
                                     quantized);
    std::memset(quantized + head_dim, 0, padded - head_dim);
    int32_t sum = 0;
    for (int d = 0; d < head_dim; ++d) sum += quantized[d];
    std::memcpy(out + padded, &scale, sizeof(scale));
    std::memcpy(out + padded + 4, &sum, sizeof(sum));
  }
}

// Keys of `count` tokens as unsigned bytes (k + 128), rows `padded` bytes apart; the padding
// meets q's zeros, so its value does not matter.
APEX_TARGET inline void flip_tile(const int8_t* k, int count, int head_dim, int padded,
                                  uint8_t* tile) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int t = 0; t < count; ++t)
    for (int d = 0; d < padded; d += 64) {
      const int left = head_dim - d;
      const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      const __m512i bytes = _mm512_maskz_loadu_epi8(mask, k + int64_t(t) * head_dim + d);
      _mm512_store_si512(tile + t * padded + d, _mm512_xor_si512(bytes, flip));
    }
}

// Head dims past kMaxTileBytes (no model in use has them): the same integer dot products,
// one at a time.
constexpr int kMaxTileBytes = 256;

void plain_int_scores(const char* prepared, const int8_t* k, int num_rows, int num_tokens,
                      int head_dim, float scale, float* scores) {
  const int padded = padded_bytes(head_dim);
  for (int g = 0; g < num_rows; ++g) {
    const char* row = prepared + int64_t(g) * row_bytes(head_dim);
    float q_scale;
    std::memcpy(&q_scale, row + padded, sizeof(q_scale));
    for (int t = 0; t < num_tokens; ++t) {
      int32_t dot = 0;
      for (int d = 0; d < head_dim; ++d)
        dot += int32_t(reinterpret_cast<const int8_t*>(row)[d]) * k[int64_t(t) * head_dim + d];
      scores[g * num_tokens + t] = float(dot) * q_scale * scale;
    }
  }
}

APEX_TARGET void vnni_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores) {
  const int padded = padded_bytes(head_dim);
  if (padded > kMaxTileBytes) {
    return plain_int_scores(reinterpret_cast<const char*>(prepared_q),
                            static_cast<const int8_t*>(k), num_rows, num_tokens, head_dim,
                            scale, scores);
  }
  alignas(64) uint8_t tile[kTileTokens * kMaxTileBytes];
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    flip_tile(static_cast<const int8_t*>(k) + int64_t(token) * head_dim, count, head_dim,
              padded, tile);
    for (int g = 0; g < num_rows; ++g) {
      const char* row =
          reinterpret_cast<const char*>(prepared_q) + int64_t(g) * row_bytes(head_dim);
      float q_scale;
      int32_t q_sum;
      std::memcpy(&q_scale, row + padded, sizeof(q_scale));
      std::memcpy(&q_sum, row + padded + 4, sizeof(q_sum));
      __m512i acc[kTileTokens];
      for (int t = 0; t < kTileTokens; ++t) acc[t] = _mm512_setzero_si512();
      for (int d = 0; d < padded; d += 64) {
        const __m512i query = _mm512_loadu_si512(row + d);
#pragma GCC unroll 16
        for (int t = 0; t < kTileTokens; ++t) {
          if (t >= count) break;  // tokens past the context keep a zero accumulator
          acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_load_si512(tile + t * padded + d), query);
        }
      }
      // Sums stay below 2^24 (256 x 255 x 127), so the float conversion is exact.
      __m512 sums[kTileTokens];
      for (int t = 0; t < kTileTokens; ++t) sums[t] = _mm512_cvtepi32_ps(acc[t]);
      const __m512 dots = _mm512_sub_ps(reduce_tile(sums), _mm512_set1_ps(128.0f * q_sum));
      _mm512_mask_storeu_ps(scores + g * num_tokens + token, lanes(count),
                            _mm512_mul_ps(dots, _mm512_set1_ps(q_scale * scale)));
    }
  }
}

}  // namespace

const KernelOps* avx512_vnni_kernel_ops() {
  static const KernelOps ops = [] {
    KernelOps vnni = *avx512_kernel_ops(DType::kInt8, false);  // its softmax and p . v
    vnni.prepare_q = vnni_prepare_q;
    vnni.scores = vnni_scores;
    vnni.name = "avx512vnni";
    return vnni;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
