// Portable kernels (any CPU, any compiler) and the run-time choice of the fastest kernel set.
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"

namespace apex {
namespace {

template <DType kType>
void scalar_scores(const float* q_f32, const void* k, int num_rows, int num_tokens,
                   int head_dim, float scale, float* scores, RowPrefetch& /*ahead*/) {
  for (int t = 0; t < num_tokens; ++t) {
    const int64_t row = int64_t(t) * head_dim;
    for (int g = 0; g < num_rows; ++g) {
      const float* q_row = q_f32 + int64_t(g) * head_dim;
      float sum = 0.0f;
      for (int d = 0; d < head_dim; ++d) sum += q_row[d] * load_as_float(k, row + d, kType);
      scores[g * num_tokens + t] = sum * scale;
    }
  }
}

float softmax_row(float* x, int num_tokens, float* running_max, float* running_sum) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < num_tokens; ++t) block_max = std::fmax(block_max, x[t]);
  const float new_max = std::fmax(*running_max, block_max);
  // The maximum rarely moves once a few blocks are in: skip the scalar exp then.
  const float alpha = new_max == *running_max ? 1.0f : std::exp(*running_max - new_max);
  float block_sum = 0.0f;
  for (int t = 0; t < num_tokens; ++t) {
    x[t] = std::exp(x[t] - new_max);
    block_sum += x[t];
  }
  *running_sum = *running_sum * alpha + block_sum;
  *running_max = new_max;
  return alpha;
}

void scalar_softmax(float* scores, int num_rows, int num_tokens, float* running_max,
                    float* running_sum, float* alpha) {
  for (int g = 0; g < num_rows; ++g)
    alpha[g] = softmax_row(scores + g * num_tokens, num_tokens, running_max + g, running_sum + g);
}

template <DType kType>
void scalar_accumulate(const float* p, const void* v, int num_rows, int num_tokens,
                       int head_dim, const float* alpha, float* acc) {
  for (int g = 0; g < num_rows; ++g) {
    float* acc_row = acc + int64_t(g) * head_dim;
    for (int d = 0; d < head_dim; ++d) acc_row[d] *= alpha[g];
    for (int t = 0; t < num_tokens; ++t) {
      const float weight = p[g * num_tokens + t];
      const int64_t row = int64_t(t) * head_dim;
      for (int d = 0; d < head_dim; ++d) acc_row[d] += weight * load_as_float(v, row + d, kType);
    }
  }
}

template <DType kType>
const KernelOps* scalar_table(const char* name) {
  static const KernelOps ops{rows_to_float<prepare_q_dtype(kType)>, scalar_scores<kType>,
                             scalar_softmax,
                             scalar_accumulate<kType>, name};
  return &ops;
}

}  // namespace

const KernelOps* scalar_kernel_ops(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return scalar_table<DType::kFloat32>("scalar");
    case DType::kBFloat16:
      return scalar_table<DType::kBFloat16>("scalar");
    case DType::kInt8:
      return scalar_table<DType::kInt8>("scalar");
    default:
      return scalar_table<DType::kFloat16>("scalar");
  }
}

const KernelOps* select_kernel_ops(DType dtype, const char* isa) {
  const bool any = isa == nullptr;
  auto wants = [&](const char* name) { return any || std::strcmp(isa, name) == 0; };
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  const bool has_bf16_dot = has_avx512 && __builtin_cpu_supports("avx512bf16");
  const bool has_vnni = has_avx512 && __builtin_cpu_supports("avx512vnni");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  if (wants("avx512bf16") && has_bf16_dot && dtype == DType::kBFloat16)
    return avx512_kernel_ops(dtype, true);
  if (wants("avx512vnni") && has_vnni && dtype == DType::kInt8) return avx512_vnni_kernel_ops();
  // int8 KV without VNNI: the AVX2 set's integer dot products cost less than plain AVX-512's
  // widening to float32 (kernels/bench/block_ops.cpp: ~280 against ~530 ns per block and kv
  // head on Zen 4), so the best pick passes over plain AVX-512 for int8.
  if (any && has_avx2 && dtype == DType::kInt8) return avx2_int8_kernel_ops();
  if (wants("avx512") && has_avx512) return avx512_kernel_ops(dtype, false);
  if (wants("avx2") && has_avx2)
    return dtype == DType::kInt8 ? avx2_int8_kernel_ops() : avx2_kernel_ops(dtype);
#endif
  if (wants("scalar")) return scalar_kernel_ops(dtype);
  return nullptr;
}

}  // namespace apex
