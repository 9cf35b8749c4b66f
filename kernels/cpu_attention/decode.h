// Paged decode attention as a pool job: planning (work split in KV blocks), the per-task
// online-softmax loop, the log-sum-exp merge of split contexts, and the KV append.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "thread_pool.h"

namespace apex {

// One layer's decode problem; every pointer is borrowed from tensors the caller keeps alive.
struct DecodeProblem {
  const void* q = nullptr;           // [num_seqs, num_heads, head_dim], rows q_row_stride apart
  void* k_cache = nullptr;           // [num_blocks, num_kv_heads, block_size, head_dim]
  void* v_cache = nullptr;           // same as k_cache
  float* k_scales = nullptr;         // 8-bit KV only: [num_blocks, num_kv_heads, block_size]
  float* v_scales = nullptr;         // 8-bit KV only, like k_scales
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  const int32_t* seq_lens = nullptr;      // [num_seqs], context length including the new token
  void* out = nullptr;               // [num_seqs, num_heads, head_dim], q's dtype
  float* lse = nullptr;              // [num_seqs, num_heads]
  const void* new_k = nullptr;       // optional [num_seqs, num_kv_heads, head_dim], rows
                                     // new_kv_row_stride apart
  const void* new_v = nullptr;       // optional, like new_k
  const int64_t* slot_mapping = nullptr;  // optional [num_seqs] cache slot of each new token
  int num_seqs = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  int num_blocks = 0;
  int max_blocks_per_seq = 0;
  // Elements between consecutive rows (>= the row's heads x head_dim): q, k and v may be
  // views into one wider buffer, as a fused projection leaves them.
  int64_t q_row_stride = 0;
  int64_t new_kv_row_stride = 0;
  DType dtype = DType::kFloat32;     // q, out, new_k, new_v
  DType kv_dtype = DType::kFloat32;  // the caches: dtype, or kInt8 (appends quantize)
  float scale = 1.0f;
};

class DecodeJob final : public Job {
 public:
  // Throws std::invalid_argument for shapes or lengths that would make the plan unsafe.
  DecodeJob(const DecodeProblem& problem, const KernelOps* ops, int num_threads,
            const FlagGate& gate);

 protected:
  void run_task(int index, WorkerScratch& scratch) override;

 private:
  // Blocks [part * part_blocks_, +part_blocks_) of one sequence, for kv heads
  // [first_kv_head, first_kv_head + heads_per_task_).
  struct Task {
    int32_t seq;
    int32_t first_kv_head;
    int32_t part;
  };
  // A task's scratch (one buffer from the worker's WorkerScratch), q prepared per kv head.
  struct TaskState {
    int64_t prepared_floats;  // per kv head
    float* prepared_q;        // [num_kv_heads, prepared_floats]
    float* acc;               // [rows, head_dim], rows = num_kv_heads * group
    float* running_max;       // [rows]
    float* running_sum;       // [rows]
    float* alpha;             // [rows]
    float* scores;            // [group, block_size]
    float* merge_scratch;     // [num_parts + head_dim]
    float* q_f32;             // [group, head_dim]: q widened for 8-bit KV kernels
  };
  void check_problem() const;
  void plan(int num_threads);
  TaskState start_task(const Task& task, int num_kv_heads, WorkerScratch& scratch) const;
  void run_attention(const Task& task, WorkerScratch& scratch);
  void finish_rows(const Task& task, int kv_head, const float* acc, const float* running_max,
                   const float* running_sum, float* merge_scratch);
  // merge_scratch holds num_parts + head_dim floats.
  void merge_parts(int seq, int kv_head, float* merge_scratch);

  DecodeProblem problem_;
  const KernelOps* ops_;
  int group_size_;
  int part_blocks_ = 1;
  int heads_per_task_ = 1;
  int num_append_tasks_ = 0;
  std::atomic<int> appended_tasks_{0};
  std::vector<Task> tasks_;
  std::vector<int> num_parts_;  // [num_seqs] context partitions per sequence
  // Sequences split into several parts keep each part's normalised output and lse here, and
  // the last part to finish for a (seq, kv_head) merges them.
  std::vector<int> partial_index_;  // [num_seqs] first partial row of a split seq, else -1
  std::vector<float> partial_out_;  // [num_partials, num_heads, head_dim]
  std::vector<float> partial_lse_;  // [num_partials, num_heads]
  std::unique_ptr<std::atomic<int>[]> parts_left_;  // [num_seqs * num_kv_heads]
};

// Writes k, v [num_tokens, num_kv_heads, head_dim] (dtype) into cache slots
// slot_mapping[num_tokens] (kv_dtype; kInt8 quantizes each row and writes its scale).
// Throws std::invalid_argument for a slot outside the cache.
void append_kv(void* k_cache, void* v_cache, float* k_scales, float* v_scales,
               const int64_t* slot_mapping, const void* k, const void* v, int num_tokens,
               int num_kv_heads, int head_dim, int block_size, int num_blocks, DType dtype,
               DType kv_dtype);

}  // namespace apex
