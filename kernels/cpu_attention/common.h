// Shared definitions of the native CPU decode-attention kernel: element types, scalar
// conversions, the per-ISA kernel table and the description of one decode problem.
//
// KV layout (one layer; see apex_grpc/attention/base.py):
//   k_cache, v_cache  [num_blocks, num_kv_heads, block_size, head_dim], contiguous
//   token slot        block_id * block_size + offset_in_block
//   8-bit KV (kInt8)  one float32 scale per token and kv head beside each cache:
//                     k_scales, v_scales [num_blocks, num_kv_heads, block_size]; the
//                     element is round(x / scale), scale = max|row| / 127 (kv_cache/quantized.py)
// GQA: query head (kv_head * group_size + g) attends kv head kv_head.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace apex {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

inline int element_size(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : (dtype == DType::kInt8 ? 1 : 2);
}

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_float(uint16_t bits) { return bits_to_float(uint32_t(bits) << 16); }

inline uint16_t float_to_bf16(float value) {
  uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // keep NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return uint16_t(bits >> 16);
}

inline float fp16_to_float(uint16_t half) {
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504: infinity
  if (magnitude < 0x38800000u) {
    // Half subnormal: scale by 2^24 and round to the nearest even integer.
    const float scaled = bits_to_float(magnitude) * 16777216.0f;
    const float rounded = __builtin_rintf(scaled);
    return sign | uint16_t(rounded);
  }
  magnitude += 0xc8000fffu + ((magnitude >> 13) & 1u);  // rebias exponent, round to nearest even
  return sign | uint16_t(magnitude >> 13);
}

inline float load_as_float(const void* base, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[index];
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::kInt8:
      return float(static_cast<const int8_t*>(base)[index]);
    default:
      return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

inline void store_from_float(void* base, int64_t index, DType dtype, float value) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(base)[index] = value;
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[index] = float_to_bf16(value);
      break;
    default:
      static_cast<uint16_t*>(base)[index] = float_to_fp16(value);
  }
}

// The three inner loops of one KV block, specialised per ISA and element type. Rows of q, p
// and acc belong to the query heads of one GQA group; k and v point at one block of one kv head.
// q rows [num_rows, head_dim] in the KV element type -> float32 (most kernels' q layout).
// 8-bit KV kernels take q already in float32 (kFloat32 here): q keeps the model's dtype.
template <DType kType>
void rows_to_float(const void* q, int num_rows, int head_dim, float* prepared) {
  for (int64_t i = 0; i < int64_t(num_rows) * head_dim; ++i) {
    prepared[i] = load_as_float(q, i, kType);
  }
}

// The dtype of the q rows that prepare_q reads, for KV of kv_dtype.
constexpr DType prepare_q_dtype(DType kv_dtype) {
  return kv_dtype == DType::kInt8 ? DType::kFloat32 : kv_dtype;
}

// One row of an 8-bit cache: scale = max|x| / 127 and x / scale rounded half to even (the
// current rounding mode), exactly as kv_cache/quantized.py computes it, so rows written by
// either side are bit-identical. An all-zero row gets scale 0 and zeros.
inline float quantize_row(const void* row, DType dtype, int head_dim, int8_t* out) {
  float absmax = 0.0f;
  for (int d = 0; d < head_dim; ++d) {
    const float x = load_as_float(row, d, dtype);
    absmax = std::fabs(x) > absmax ? std::fabs(x) : absmax;
  }
  const float scale = absmax / 127.0f;
  const float divisor = scale > 0.0f ? scale : 1.0f;
  for (int d = 0; d < head_dim; ++d) {
    const float value = std::nearbyint(load_as_float(row, d, dtype) / divisor);
    out[d] = int8_t(value > 127.0f ? 127.0f : (value < -127.0f ? -127.0f : value));
  }
  return scale;
}

// Visits rows [0, num_rows) in groups of kRows, then kRows / 2, ..., 1 rows, largest first:
// visit(std::integral_constant<int, n>(), first_row). Kernels specialise their loops on the
// group's row count so that its accumulators stay in registers.
template <int kRows, class Visit>
inline void for_row_groups(int num_rows, Visit&& visit) {
  static_assert(kRows == 1 || kRows == 2 || kRows == 4 || kRows == 8, "groups of 1, 2, 4, 8");
  int g = 0;
  for (; num_rows - g >= kRows; g += kRows) visit(std::integral_constant<int, kRows>(), g);
  if constexpr (kRows > 1) {
    for_row_groups<kRows / 2>(num_rows - g, [&](auto rows, int first) { visit(rows, g + first); });
  }
}

// Floats a prepared q of num_rows rows may take (room for padded, interleaved layouts: the
// avx512vnni rows take 4 bytes per dim rounded up to 64 dims, plus 64 bytes).
inline int64_t prepared_q_floats(int num_rows, int head_dim) {
  return int64_t(num_rows) * (head_dim + 96);
}

// Rows to pull toward the cache while a kernel computes on others, in two streams of a kv
// head's K rows then V rows: `far`, further along the walk, into L2 (into L1 it would evict
// the rows being computed on), and optionally `near`, the next head, from L2 into L1. A
// kernel's q . k loop calls step() between its own loads, so both go out early and a few lines
// at a time; decode calls finish() after the kernel for what is left of `far` (kernels that
// never step: a burst). Bursts of whole halves of a head queued behind the miss buffers and ran
// 1.2-1.5x slower cold than steps of 8 lines; the near stream made bf16 KV 8-25% faster, and
// 8-bit KV 5-9% once its kernel's compute had shrunk (batch 32 x 2048, AVX2 and AVX-512,
// 2026-12-07). Issued faster than memory delivers, PREFETCHT2s to random pages completed at
// 2.5x one thread's memory speed on this AMD CPU (so some were dropped), PREFETCHT0s at
// memory speed: `near` is what makes sure the rows arrive.
class RowPrefetch {
 public:
  static constexpr int kLinesPerStep = 8;
  RowPrefetch() = default;  // nothing to fetch
  RowPrefetch(const void* far_k, const void* far_v, const void* near_k, const void* near_v,
              int64_t bytes)
      : far_(far_k, far_v, bytes), near_(near_k, near_v, bytes) {}
  void step(int lines = kLinesPerStep) {
    far_.issue<1>(lines);
    near_.issue<3>(lines);
  }
  void finish() { far_.issue<1>(far_.remaining()); }

 private:
  struct Rows {
    Rows() = default;
    Rows(const void* k, const void* v, int64_t bytes)
        : k(static_cast<const char*>(k)), v(static_cast<const char*>(v)),
          lines(k == nullptr ? 0 : int((bytes + 63) / 64)) {}
    int remaining() const { return 2 * lines - next; }
    template <int kLocality>
    void issue(int count) {
      while (count > 0 && next < 2 * lines) {  // a run inside K's rows or V's
        const bool in_k = next < lines;
        const char* row = in_k ? k + int64_t(next) * 64 : v + int64_t(next - lines) * 64;
        const int left = (in_k ? lines : 2 * lines) - next;
        const int run = count < left ? count : left;
        for (int i = 0; i < run; ++i) __builtin_prefetch(row + int64_t(i) * 64, 0, kLocality);
        next += run;
        count -= run;
      }
    }
    const char* k = nullptr;
    const char* v = nullptr;
    int lines = 0;  // per cache
    int next = 0;   // lines issued, K's first
  };
  Rows far_, near_;
};

// One kv head of one KV block for KernelOps::attend_int8: its K and V rows [num_tokens,
// head_dim] and their token scales [num_tokens], its GQA group's prepared q and the group's
// running softmax state and acc rows, and the rows to prefetch meanwhile (stepped during its
// q . k, finished after it).
struct Int8Step {
  const float* prepared_q;
  const int8_t* k;
  const int8_t* v;
  const float* k_scales;
  const float* v_scales;
  int num_tokens;
  float* running_max;
  float* running_sum;
  float* acc;
  RowPrefetch* ahead;
};

struct KernelOps {
  // Writes one GQA group's q rows [num_rows, head_dim] (KV element type) in the layout that
  // `scores` reads, once per task: at most prepared_q_floats(num_rows, head_dim) floats.
  void (*prepare_q)(const void* q, int num_rows, int head_dim, float* prepared);
  // scores[g * num_tokens + t] = scale * dot(q[g], k[t]) for a prepared q; steps `ahead`
  // along the way (or leaves it to the caller's finish()).
  void (*scores)(const float* prepared_q, const void* k, int num_rows, int num_tokens,
                 int head_dim, float scale, float* scores, RowPrefetch& ahead);
  // One online-softmax step on each row g of scores [num_rows, num_tokens]: x <- exp(x - new_max),
  // running_max[g] and running_sum[g] updated, alpha[g] = exp(old_max - new_max), the factor
  // that rescales what was accumulated before. One call for the whole GQA group, so the rows'
  // reduction latencies overlap.
  void (*softmax)(float* scores, int num_rows, int num_tokens, float* running_max,
                  float* running_sum, float* alpha);
  // acc[g][:] = acc[g][:] * alpha[g] + sum_t p[g * num_tokens + t] * v[t][:].
  void (*accumulate)(const float* p, const void* v, int num_rows, int num_tokens, int head_dim,
                     const float* alpha, float* acc);
  const char* name;
  // Puts a task's acc rows [num_rows, head_dim] in the natural order before they are read,
  // for kernels whose accumulate keeps another order; nullptr: already natural.
  void (*finish_acc)(float* acc, int num_rows, int head_dim) = nullptr;
  // 8-bit KV, when set: scores, softmax and accumulate for a run of steps (Int8Step: one kv
  // head of one KV block each) in one call, the token scales applied between them; the steps of
  // one kv head come in walk order. A table that sets it leaves the three steps above null.
  // nullptr: the three steps, with the scales applied in between by the caller.
  void (*attend_int8)(const Int8Step* steps, int num_steps, int num_rows, int head_dim,
                      float scale) = nullptr;
};

// Returns the kernels for dtype on the best ISA this CPU supports (or the named one, for tests:
// "avx512bf16" (bfloat16 KV only), "avx512vnni" (int8 KV only), "avx512", "avx2", "scalar";
// nullptr where that ISA is not available).
const KernelOps* select_kernel_ops(DType dtype, const char* isa = nullptr);

const KernelOps* scalar_kernel_ops(DType dtype);
#if defined(__x86_64__)
// 16- and 32-bit KV.
const KernelOps* avx2_kernel_ops(DType dtype);
// int8 KV with AVX2 integer q . k and p . v, one fused call per run of steps (attend_int8).
const KernelOps* avx2_int8_kernel_ops();
const KernelOps* avx512_kernel_ops(DType dtype, bool use_bf16_dot);
// bfloat16 KV with AVX512-BF16 dot products (its softmax is the plain AVX-512 one).
const KernelOps* avx512_bf16_kernel_ops();
// int8 KV with AVX512-VNNI integer q . k and p . v, one fused call per run of steps.
const KernelOps* avx512_vnni_kernel_ops();
#endif

}  // namespace apex
