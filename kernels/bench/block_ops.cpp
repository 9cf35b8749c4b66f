// Compute cost of the native kernel's inner steps for one KV block of one kv head (4 query
// rows, 16 tokens, head_dim 128: Llama-3.1-8B's GQA group), KV resident in L1, one thread,
// per kernel set this CPU runs: q . k, softmax and p . v separately, or the fused 8-bit step.
// Thread CPU time, best of 5 repeats, so other processes on the machine do not inflate it.
// Build and run from the repository root (the sources are the extension's own):
//   g++ -std=c++17 -O3 -pthread -Ikernels/cpu_attention kernels/bench/block_ops.cpp \
//       kernels/cpu_attention/ops_*.cpp -o /tmp/block_ops && /tmp/block_ops
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <random>
#include <vector>

#include "common.h"

using namespace apex;

namespace {

constexpr int kRows = 4, kTokens = 16, kHeadDim = 128, kBlocks = 8, kCalls = 100000;

double thread_seconds() {
  timespec now;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return now.tv_sec + 1e-9 * now.tv_nsec;
}

// Nanoseconds per call of step(i), best of 5 repeats of kCalls calls.
template <class Step>
double ns_per_call(Step step) {
  double best = 1e30;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const double start = thread_seconds();
    for (int i = 0; i < kCalls; ++i) step(i);
    const double seconds = thread_seconds() - start;
    best = seconds < best ? seconds : best;
  }
  return best / kCalls * 1e9;
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int elements = kBlocks * kTokens * kHeadDim;
  std::vector<float> q(kRows * kHeadDim);
  for (float& x : q) x = normal(rng);
  std::vector<uint16_t> q_bf16(q.size()), k_bf16(elements), v_bf16(elements);
  std::vector<int8_t> k_int8(elements), v_int8(elements);
  for (size_t i = 0; i < q.size(); ++i) q_bf16[i] = float_to_bf16(q[i]);
  for (int i = 0; i < elements; ++i) {
    const float k = normal(rng), v = normal(rng);
    k_bf16[i] = float_to_bf16(k);
    v_bf16[i] = float_to_bf16(v);
    k_int8[i] = int8_t(std::max(-127.0f, std::min(127.0f, std::nearbyint(k * 40))));
    v_int8[i] = int8_t(std::max(-127.0f, std::min(127.0f, std::nearbyint(v * 40))));
  }
  const std::vector<float> token_scales(kBlocks * kTokens, 0.025f);
  struct Set {
    const char* isa;
    DType kv;
  };
  const Set sets[] = {{"avx512bf16", DType::kBFloat16}, {"avx512", DType::kBFloat16},
                      {"avx2", DType::kBFloat16},       {"avx512vnni", DType::kInt8},
                      {"avx512", DType::kInt8},         {"avx2", DType::kInt8}};
  std::printf("%-12s %-5s %10s %10s %10s %10s\n", "kernel set", "KV", "q.k ns", "softmax ns",
              "p.v ns", "total ns");
  for (const Set& set : sets) {
    const KernelOps* ops = select_kernel_ops(set.kv, set.isa);
    if (ops == nullptr) continue;
    const bool int8 = set.kv == DType::kInt8;
    std::vector<float> prepared(prepared_q_floats(kRows, kHeadDim)), scores(kRows * kTokens),
        acc(kRows * kHeadDim, 0.0f), running_max(kRows, -1e30f), running_sum(kRows, 0.0f),
        alpha(kRows);
    ops->prepare_q(int8 ? static_cast<const void*>(q.data()) : q_bf16.data(), kRows, kHeadDim,
                   prepared.data());
    const int block_elements = kTokens * kHeadDim;
    auto k_block = [&](int i) -> const void* {
      return int8 ? static_cast<const void*>(k_int8.data() + (i % kBlocks) * block_elements)
                  : k_bf16.data() + (i % kBlocks) * block_elements;
    };
    auto v_block = [&](int i) -> const void* {
      return int8 ? static_cast<const void*>(v_int8.data() + (i % kBlocks) * block_elements)
                  : v_bf16.data() + (i % kBlocks) * block_elements;
    };
    // Each call steps through the next block's rows as decode does (resident here, so only
    // the cost of issuing the prefetches counts).
    const int64_t head_bytes = block_elements * (int8 ? 1 : 2);
    auto next_rows = [&](int i) {
      return int8 ? RowPrefetch(k_block(i + 2), v_block(i + 2), nullptr, nullptr, head_bytes)
                  : RowPrefetch(k_block(i + 2), v_block(i + 2), k_block(i + 1), v_block(i + 1),
                                head_bytes);
    };
    if (ops->attend_int8 != nullptr && int8) {
      // Eight steps per call, one per kv head of a block, as decode batches them: the time
      // per step.
      constexpr int kSteps = 8;
      std::vector<float> head_acc(kSteps * kRows * kHeadDim, 0.0f),
          head_max(kSteps * kRows, -1e30f), head_sum(kSteps * kRows, 0.0f);
      const double fused = ns_per_call([&](int i) {
        Int8Step steps[kSteps];
        RowPrefetch aheads[kSteps];
        for (int s = 0; s < kSteps; ++s) {
          const int block = i * kSteps + s;
          aheads[s] = next_rows(block);
          steps[s] = Int8Step{prepared.data(), static_cast<const int8_t*>(k_block(block)),
                              static_cast<const int8_t*>(v_block(block)),
                              token_scales.data() + (block % kBlocks) * kTokens,
                              token_scales.data() + (block % kBlocks) * kTokens, kTokens,
                              head_max.data() + s * kRows, head_sum.data() + s * kRows,
                              head_acc.data() + s * kRows * kHeadDim, &aheads[s]};
        }
        ops->attend_int8(steps, kSteps, kRows, kHeadDim, 0.088f);
      }) / kSteps;
      std::printf("%-12s %-5s %10s %10s %10s %10.1f (fused, per block)\n", ops->name, "int8", "",
                  "", "", fused);
      continue;
    }
    const double qk = ns_per_call([&](int i) {
      RowPrefetch ahead = next_rows(i);
      ops->scores(prepared.data(), k_block(i), kRows, kTokens, kHeadDim, 0.088f, scores.data(),
                  ahead);
      ahead.finish();
    });
    // The same scores each call (one step on them would leave weights that no longer move).
    std::vector<float> fixed_scores(kRows * kTokens);
    for (size_t i = 0; i < fixed_scores.size(); ++i) fixed_scores[i] = 0.01f * float(i % 7);
    const double softmax = ns_per_call([&](int) {
      std::copy(fixed_scores.begin(), fixed_scores.end(), scores.begin());
      ops->softmax(scores.data(), kRows, kTokens, running_max.data(), running_sum.data(),
                   alpha.data());
    });
    const double pv = ns_per_call([&](int i) {
      ops->accumulate(scores.data(), v_block(i), kRows, kTokens, kHeadDim, alpha.data(),
                      acc.data());
    });
    std::printf("%-12s %-5s %10.1f %10.1f %10.1f %10.1f\n", ops->name, int8 ? "int8" : "bf16", qk,
                softmax, pv, qk + softmax + pv);
  }
  return 0;
}
