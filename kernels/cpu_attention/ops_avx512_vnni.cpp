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

// Prepared q, per row (row_bytes(head_dim) apart, inside prepared_q_floats' room): for each
// 64-dim chunk h of the int8-quantized row and each k < 4, a "pattern" register whose 128-bit
// lane L repeats q's dword 4L + k of that chunk (the four q bytes that meet the keys in
// vnni_scores' transposed registers), then its float scale and int32 sum.
constexpr int kChunkBytes = 64;
inline int num_chunks(int head_dim) { return (head_dim + kChunkBytes - 1) / kChunkBytes; }
inline int pattern_bytes(int head_dim) { return num_chunks(head_dim) * 4 * kChunkBytes; }
inline int row_bytes(int head_dim) { return pattern_bytes(head_dim) + 64; }

void vnni_prepare_q(const void* q, int num_rows, int head_dim, float* prepared) {
  const float* rows = static_cast<const float*>(q);  // int8 kernels take q in float32
  const int padded = num_chunks(head_dim) * kChunkBytes;
  int8_t quantized[1024];
  int8_t* row_q = padded <= 1024 ? quantized : new int8_t[padded];
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
  if (row_q != quantized) delete[] row_q;
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

// Four tokens' 64-byte chunks a[0..3] -> o[k], whose 128-bit lane L holds dword 4L + k of each
// token in slots 0..3 (two unpack levels, no lane crossing).
APEX_TARGET inline void interleave_dwords(const __m512i (&a)[4], __m512i (&o)[4]) {
  const __m512i low01 = _mm512_unpacklo_epi32(a[0], a[1]);
  const __m512i high01 = _mm512_unpackhi_epi32(a[0], a[1]);
  const __m512i low23 = _mm512_unpacklo_epi32(a[2], a[3]);
  const __m512i high23 = _mm512_unpackhi_epi32(a[2], a[3]);
  o[0] = _mm512_unpacklo_epi64(low01, low23);
  o[1] = _mm512_unpackhi_epi64(low01, low23);
  o[2] = _mm512_unpacklo_epi64(high01, high23);
  o[3] = _mm512_unpackhi_epi64(high01, high23);
}

// acc[i] lane (L, slot s): partial dot of token 4i + s over the lane-L dwords -> one register
// with the 16 tokens' full dots in token order.
APEX_TARGET inline __m512i sum_lanes(const __m512i (&acc)[4]) {
  const __m512i x = _mm512_add_epi32(_mm512_shuffle_i32x4(acc[0], acc[1], 0x88),
                                     _mm512_shuffle_i32x4(acc[0], acc[1], 0xdd));
  const __m512i y = _mm512_add_epi32(_mm512_shuffle_i32x4(acc[2], acc[3], 0x88),
                                     _mm512_shuffle_i32x4(acc[2], acc[3], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xdd));
}

// Rows [0, kRows) of one block: lanes are tokens, so no per-token reduction tree. Each group of
// four keys is loaded once, flipped to unsigned (k + 128; VPDPBUSD multiplies unsigned by
// signed bytes, and 128 * sum(q) comes off each score) and interleaved for every row.
template <int kRows, int kChunks>
APEX_TARGET inline void vnni_score_rows(const char* prepared, const int8_t* k, int num_tokens,
                                        int head_dim, float scale, float* scores,
                                        int score_stride) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i acc[kRows][4];
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
    for (int h = 0; h < kChunks; ++h) {
      const int left = head_dim - h * kChunkBytes;
      const __mmask64 dims = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      __m512i keys[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int token = 4 * i + j;
        // Missing tokens and dims load as zero: their q is zero, or their lane is not stored.
        keys[j] = _mm512_xor_si512(
            _mm512_maskz_loadu_epi8(token < num_tokens ? dims : 0,
                                    k + int64_t(token) * head_dim + h * kChunkBytes),
            flip);
      }
      __m512i interleaved[4];
      interleave_dwords(keys, interleaved);
#pragma GCC unroll 4
      for (int g = 0; g < kRows; ++g) {
        const char* patterns = prepared + int64_t(g) * row_bytes(head_dim) + h * 4 * kChunkBytes;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          acc[g][i] = _mm512_dpbusd_epi32(acc[g][i], interleaved[j],
                                          _mm512_loadu_si512(patterns + j * kChunkBytes));
      }
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < kRows; ++g) {
    const char* row = prepared + int64_t(g) * row_bytes(head_dim);
    float q_scale;
    int32_t q_sum;
    std::memcpy(&q_scale, row + pattern_bytes(head_dim), sizeof(q_scale));
    std::memcpy(&q_sum, row + pattern_bytes(head_dim) + 4, sizeof(q_sum));
    // Sums stay below 2^24 (kMaxIntDotDim), so the float conversion is exact.
    const __m512 dots = _mm512_sub_ps(_mm512_cvtepi32_ps(sum_lanes(acc[g])),
                                      _mm512_set1_ps(128.0f * float(q_sum)));
    _mm512_mask_storeu_ps(scores + g * score_stride, lanes(num_tokens),
                          _mm512_mul_ps(dots, _mm512_set1_ps(q_scale * scale)));
  }
}

template <int kChunks>
APEX_TARGET void vnni_score_tiles(const char* prepared, const int8_t* keys, int num_rows,
                                  int num_tokens, int head_dim, float scale, float* scores) {
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    const int8_t* tile = keys + int64_t(token) * head_dim;
    for (int g = 0; g < num_rows;) {
      const char* rows = prepared + int64_t(g) * row_bytes(head_dim);
      float* out = scores + g * num_tokens + token;
      if (num_rows - g >= 4) {
        vnni_score_rows<4, kChunks>(rows, tile, count, head_dim, scale, out, num_tokens);
        g += 4;
      } else if (num_rows - g >= 2) {
        vnni_score_rows<2, kChunks>(rows, tile, count, head_dim, scale, out, num_tokens);
        g += 2;
      } else {
        vnni_score_rows<1, kChunks>(rows, tile, count, head_dim, scale, out, num_tokens);
        g += 1;
      }
    }
  }
}

APEX_TARGET void vnni_scores(const float* prepared_q, const void* k, int num_rows,
                             int num_tokens, int head_dim, float scale, float* scores) {
  const char* prepared = reinterpret_cast<const char*>(prepared_q);
  const int8_t* keys = static_cast<const int8_t*>(k);
  switch (num_chunks(head_dim)) {
    case 1:
      return vnni_score_tiles<1>(prepared, keys, num_rows, num_tokens, head_dim, scale, scores);
    case 2:
      return vnni_score_tiles<2>(prepared, keys, num_rows, num_tokens, head_dim, scale, scores);
    case 3:
      return vnni_score_tiles<3>(prepared, keys, num_rows, num_tokens, head_dim, scale, scores);
    case 4:
      return vnni_score_tiles<4>(prepared, keys, num_rows, num_tokens, head_dim, scale, scores);
    default:  // past kMaxIntDotDim
      return plain_int_scores(prepared, keys, num_rows, num_tokens, head_dim, scale, scores);
  }
}

// ---- p . v in integers ------------------------------------------------------------------------
// Each row's weights of one block (16 tokens, >= 0) become 16-bit integers relative to that
// row's largest weight m: u = round(p * 65535 / m), split into a high and a low byte. V stays
// int8; four tokens' bytes are interleaved so that one VPDPBUSD adds four tokens' u8 x s8
// products into each dim's int32 lane: sum(high * v) << 8 + sum(low * v) is exact
// (16 x 255 x 127 x 257 < 2^31), then one conversion and FMA per 16 dims per row. The weight's
// relative rounding error is at most 2^-17 of m. The interleave leaves each 64-dim chunk of the
// float accumulator in a permuted order (a 4 x 4 transpose of 4-dim units), undone once per task
// by vnni_finish_acc.
constexpr int kMaxPvChunks = 4;  // head dims up to 256, multiples of 64; others: float p . v

inline bool int_pv(int head_dim) {
  return head_dim % kChunkBytes == 0 && head_dim / kChunkBytes <= kMaxPvChunks;
}

// Four tokens' 64-byte chunks -> o[k], whose dword (L, s) holds the four tokens' bytes of dim
// 16L + 4k + s of the chunk.
APEX_TARGET inline void interleave_bytes(const __m512i (&a)[4], __m512i (&o)[4]) {
  const __m512i low01 = _mm512_unpacklo_epi8(a[0], a[1]);
  const __m512i high01 = _mm512_unpackhi_epi8(a[0], a[1]);
  const __m512i low23 = _mm512_unpacklo_epi8(a[2], a[3]);
  const __m512i high23 = _mm512_unpackhi_epi8(a[2], a[3]);
  o[0] = _mm512_unpacklo_epi16(low01, low23);
  o[1] = _mm512_unpackhi_epi16(low01, low23);
  o[2] = _mm512_unpacklo_epi16(high01, high23);
  o[3] = _mm512_unpackhi_epi16(high01, high23);
}

template <int kChunks>
APEX_TARGET void vnni_accumulate_tiles(const float* p, const int8_t* values, int num_rows,
                                       int num_tokens, const float* alpha, float* acc) {
  constexpr int kDim = kChunks * kChunkBytes;
  constexpr int kRegs = kChunks * 4;
  for (int token = 0; token < num_tokens; token += kTileTokens) {
    const int count = num_tokens - token < kTileTokens ? num_tokens - token : kTileTokens;
    // The tile's values, interleaved once for all rows: [group][chunk * 4 + k] registers.
    alignas(64) __m512i tile[4][kRegs];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
      for (int h = 0; h < kChunks; ++h) {
        __m512i rows[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int t = 4 * i + j;  // missing tokens load as zero (their weight is 0 too)
          rows[j] = _mm512_maskz_loadu_epi8(t < count ? ~__mmask64(0) : 0,
                                            values + int64_t(token + t) * kDim + h * kChunkBytes);
        }
        __m512i interleaved[4];
        interleave_bytes(rows, interleaved);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) tile[i][h * 4 + k] = interleaved[k];
      }
    for (int g = 0; g < num_rows; ++g) {
      float* acc_row = acc + int64_t(g) * kDim;
      // alpha applies once per block: at the block's first tile.
      const __m512 rescale = _mm512_set1_ps(token == 0 ? alpha[g] : 1.0f);
      const __m512 weights = _mm512_maskz_loadu_ps(lanes(count), p + g * num_tokens + token);
      const float largest = _mm512_reduce_max_ps(weights);
      if (!(largest > 0.0f)) {
#pragma GCC unroll 16
        for (int r = 0; r < kRegs; ++r)
          _mm512_storeu_ps(acc_row + 16 * r,
                           _mm512_mul_ps(_mm512_loadu_ps(acc_row + 16 * r), rescale));
        continue;
      }
      const __m512i units = _mm512_min_epu32(
          _mm512_cvtps_epu32(_mm512_mul_ps(weights, _mm512_set1_ps(65535.0f / largest))),
          _mm512_set1_epi32(65535));
      // Four tokens' bytes per int32 lane, in token order.
      const __m128i high = _mm512_cvtepi32_epi8(_mm512_srli_epi32(units, 8));
      const __m128i low = _mm512_cvtepi32_epi8(_mm512_and_si512(units, _mm512_set1_epi32(255)));
      const __m512i high_lanes = _mm512_broadcast_i32x4(high);
      const __m512i low_lanes = _mm512_broadcast_i32x4(low);
      __m512i sums[kRegs];
#pragma GCC unroll 16
      for (int r = 0; r < kRegs; ++r) sums[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512i weight = _mm512_permutexvar_epi32(_mm512_set1_epi32(i), high_lanes);
#pragma GCC unroll 16
        for (int r = 0; r < kRegs; ++r) sums[r] = _mm512_dpbusd_epi32(sums[r], weight, tile[i][r]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < kRegs; ++r) sums[r] = _mm512_slli_epi32(sums[r], 8);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512i weight = _mm512_permutexvar_epi32(_mm512_set1_epi32(i), low_lanes);
#pragma GCC unroll 16
        for (int r = 0; r < kRegs; ++r) sums[r] = _mm512_dpbusd_epi32(sums[r], weight, tile[i][r]);
      }
      const __m512 unit = _mm512_set1_ps(largest / 65535.0f);
#pragma GCC unroll 16
      for (int r = 0; r < kRegs; ++r) {
        float* out = acc_row + 16 * r;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), unit,
                                              _mm512_mul_ps(_mm512_loadu_ps(out), rescale)));
      }
    }
  }
}

APEX_TARGET void vnni_accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                                 int head_dim, const float* alpha, float* acc) {
  const int8_t* values = static_cast<const int8_t*>(v);
  switch (int_pv(head_dim) ? head_dim / kChunkBytes : 0) {
    case 1:
      return vnni_accumulate_tiles<1>(p, values, num_rows, num_tokens, alpha, acc);
    case 2:
      return vnni_accumulate_tiles<2>(p, values, num_rows, num_tokens, alpha, acc);
    case 3:
      return vnni_accumulate_tiles<3>(p, values, num_rows, num_tokens, alpha, acc);
    case 4:
      return vnni_accumulate_tiles<4>(p, values, num_rows, num_tokens, alpha, acc);
    default:
      return avx512_kernel_ops(DType::kInt8, false)
          ->accumulate(p, v, num_rows, num_tokens, head_dim, alpha, acc);
  }
}

// vnni_accumulate's order -> natural: within each 64-dim chunk, 4-dim unit (k, L) <-> (L, k).
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
  static const KernelOps ops = [] {
    KernelOps vnni = *avx512_kernel_ops(DType::kInt8, false);  // its softmax and p . v
    vnni.prepare_q = vnni_prepare_q;
    vnni.scores = vnni_scores;
    vnni.accumulate = vnni_accumulate;
    vnni.finish_acc = vnni_finish_acc;
    vnni.name = "avx512vnni";
    return vnni;
  }();
  return &ops;
}

}  // namespace apex
#endif  // __x86_64__
