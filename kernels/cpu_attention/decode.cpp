// Decode attention job. Work is planned in units of KV blocks: a task is a run of one
// sequence's blocks for all its kv heads (or, when sequences are too few to fill the pool, for
// a share of them); a context longer than part_blocks is split into parts that run in parallel
// and are merged by log-sum-exp (flash-decoding), so one long request and many short ones both
// fill the pool. Within a task the walk is block by block, kv head by kv head: each block's K
// (and V) rows for all heads are one contiguous run of memory.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace apex {
namespace {

constexpr int kTasksPerThread = 4;      // enough tasks that uneven parts still balance
constexpr int kMinPartTokens = 256;     // below this a split costs more in merging than it saves
constexpr int kSeqsPerAppendTask = 32;  // appends are tiny copies; batch them
// Least work per task, in kv-head tokens: waking a worker costs microseconds, so a tiny job
// (a short context) runs as one task on the worker that found it rather than waking the pool.
constexpr int64_t kMinTaskHeadTokens = 512;
// Prefetch distance, in bytes of K and V rows: one head's compute (a few hundred ns) is too
// short to hide a DRAM fetch of its rows at one thread's bandwidth. 16 KiB is two bf16 heads
// (head_dim 128) or four 8-bit ones; 8-bit KV ran 10-20% faster four heads ahead than two,
// bf16 the same at two to four (batch 32 x 2048, 2026-12-07).
constexpr int64_t kPrefetchBytes = 16 * 1024;
// Steps (kv heads of blocks) per fused 8-bit kernel call: the VNNI call pipelines its steps,
// and the pipeline starts empty at each call.
constexpr int kInt8StepsPerCall = 8;

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Copies (or, into an 8-bit cache, quantizes) one row per kv head of token `row` into cache
// slot `slot`.
void write_slot(const DecodeProblem& p, const void* k, const void* v, int64_t row,
                int64_t row_stride, int64_t slot) {
  const int64_t num_slots = int64_t(p.num_blocks) * p.block_size;
  if (slot < 0 || slot >= num_slots) {
    throw std::invalid_argument("slot_mapping[" + std::to_string(row) + "] = " +
                                std::to_string(slot) + " is outside the KV cache (" +
                                std::to_string(num_slots) + " slots)");
  }
  const int64_t element = element_size(p.dtype);
  const int64_t cache_element = element_size(p.kv_dtype);
  const int64_t row_bytes = int64_t(p.head_dim) * element;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot % p.block_size;
  for (int head = 0; head < p.num_kv_heads; ++head) {
    const int64_t cache_row = (block * p.num_kv_heads + head) * p.block_size + offset;
    const int64_t source = (row * row_stride + int64_t(head) * p.head_dim) * element;
    char* k_row = static_cast<char*>(p.k_cache) + cache_row * p.head_dim * cache_element;
    char* v_row = static_cast<char*>(p.v_cache) + cache_row * p.head_dim * cache_element;
    if (p.kv_dtype == DType::kInt8) {
      p.k_scales[cache_row] = quantize_row(static_cast<const char*>(k) + source, p.dtype,
                                           p.head_dim, reinterpret_cast<int8_t*>(k_row));
      p.v_scales[cache_row] = quantize_row(static_cast<const char*>(v) + source, p.dtype,
                                           p.head_dim, reinterpret_cast<int8_t*>(v_row));
    } else {
      std::memcpy(k_row, static_cast<const char*>(k) + source, row_bytes);
      std::memcpy(v_row, static_cast<const char*>(v) + source, row_bytes);
    }
  }
}

// rows[g * num_tokens + t] *= token_scales[t] for each of num_rows rows. Kept out of line so
// the restrict qualifiers survive and the loop is vectorized.
__attribute__((noinline)) void scale_rows(float* __restrict rows, int num_rows, int num_tokens,
                                          const float* __restrict token_scales) {
  for (int g = 0; g < num_rows; ++g) {
    float* __restrict row = rows + int64_t(g) * num_tokens;
    for (int t = 0; t < num_tokens; ++t) row[t] *= token_scales[t];
  }
}

}  // namespace

void append_kv(void* k_cache, void* v_cache, float* k_scales, float* v_scales,
               const int64_t* slot_mapping, const void* k, const void* v, int num_tokens,
               int num_kv_heads, int head_dim, int block_size, int num_blocks, DType dtype,
               DType kv_dtype) {
  DecodeProblem p;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.k_scales = k_scales;
  p.v_scales = v_scales;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.dtype = dtype;
  p.kv_dtype = kv_dtype;
  for (int row = 0; row < num_tokens; ++row) {
    write_slot(p, k, v, row, int64_t(num_kv_heads) * head_dim, slot_mapping[row]);
  }
}

DecodeJob::DecodeJob(const DecodeProblem& problem, const KernelOps* ops, int num_threads,
                     const FlagGate& gate)
    : Job(gate), problem_(problem), ops_(ops), group_size_(1) {
  check_problem();
  group_size_ = problem.num_heads / problem.num_kv_heads;
  plan(num_threads);
}

void DecodeJob::check_problem() const {
  const DecodeProblem& p = problem_;
  if (p.num_seqs < 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.block_size <= 0 || p.num_blocks <= 0 || p.max_blocks_per_seq < 0) {
    throw std::invalid_argument("decode attention: every size must be positive");
  }
  if (p.kv_dtype != p.dtype &&
      (p.kv_dtype != DType::kInt8 || p.k_scales == nullptr || p.v_scales == nullptr)) {
    throw std::invalid_argument(
        "decode attention: the KV cache must have q's dtype, or be 8-bit with scales");
  }
  if (p.num_heads % p.num_kv_heads != 0) {
    throw std::invalid_argument("decode attention: num_heads must be a multiple of num_kv_heads");
  }
  if (p.q_row_stride < int64_t(p.num_heads) * p.head_dim ||
      (p.new_k != nullptr && p.new_kv_row_stride < int64_t(p.num_kv_heads) * p.head_dim)) {
    throw std::invalid_argument("decode attention: a row stride is shorter than its row");
  }
  const int64_t capacity = int64_t(p.max_blocks_per_seq) * p.block_size;
  for (int seq = 0; seq < p.num_seqs; ++seq) {
    const int32_t seq_len = p.seq_lens[seq];
    if (seq_len <= 0 || seq_len > capacity) {
      throw std::invalid_argument("seq_lens[" + std::to_string(seq) + "] = " +
                                  std::to_string(seq_len) + " is outside 1.." +
                                  std::to_string(capacity) + " (the block table's capacity)");
    }
  }
}

void DecodeJob::plan(int num_threads) {
  const DecodeProblem& p = problem_;
  int64_t total_blocks = 0;
  for (int seq = 0; seq < p.num_seqs; ++seq) {
    total_blocks += ceil_div(p.seq_lens[seq], p.block_size);
  }
  const int64_t head_tokens = total_blocks * p.block_size * p.num_kv_heads;
  const int64_t target_tasks = std::max<int64_t>(
      1, std::min(int64_t(std::max(num_threads, 1)) * kTasksPerThread,
                  head_tokens / kMinTaskHeadTokens));
  part_blocks_ = std::max(ceil_div(kMinPartTokens, p.block_size),
                          ceil_div(total_blocks, target_tasks));
  int64_t num_parts_total = 0;
  for (int seq = 0; seq < p.num_seqs; ++seq)
    num_parts_total += ceil_div(ceil_div(p.seq_lens[seq], p.block_size), part_blocks_);
  // A task reads every kv head of its blocks (one block's K, then its V, are contiguous: far
  // fewer page walks than 4 KiB pieces at random places). Too few tasks for the threads (a
  // few short sequences): split the kv heads across tasks instead.
  const int64_t head_groups = std::min<int64_t>(
      p.num_kv_heads, ceil_div(target_tasks, std::max<int64_t>(num_parts_total, 1)));
  heads_per_task_ = ceil_div(p.num_kv_heads, std::max<int64_t>(head_groups, 1));
  num_append_tasks_ = p.slot_mapping != nullptr ? ceil_div(p.num_seqs, kSeqsPerAppendTask) : 0;

  num_parts_.resize(p.num_seqs);
  partial_index_.assign(p.num_seqs, -1);
  parts_left_.reset(new std::atomic<int>[size_t(p.num_seqs) * p.num_kv_heads]);
  int num_partials = 0;
  for (int seq = 0; seq < p.num_seqs; ++seq) {
    const int parts = ceil_div(ceil_div(p.seq_lens[seq], p.block_size), part_blocks_);
    num_parts_[seq] = parts;
    if (parts > 1) {
      partial_index_[seq] = num_partials;
      num_partials += parts;
    }
    for (int head = 0; head < p.num_kv_heads; ++head) {
      parts_left_[size_t(seq) * p.num_kv_heads + head].store(parts, std::memory_order_relaxed);
    }
    for (int part = 0; part < parts; ++part)
      for (int head = 0; head < p.num_kv_heads; head += heads_per_task_)
        tasks_.push_back({seq, head, part});
  }
  partial_out_.resize(size_t(num_partials) * p.num_heads * p.head_dim);
  partial_lse_.resize(size_t(num_partials) * p.num_heads);
  // An empty batch still runs one (empty) task, so gating and the done flag behave the same.
  // A small job wakes no more workers than it has tasks worth a wake-up.
  set_num_tasks(std::max(1, num_append_tasks_ + int(tasks_.size())), int(target_tasks));
}

void DecodeJob::run_task(int index, WorkerScratch& scratch) {
  const DecodeProblem& p = problem_;
  if (index < num_append_tasks_) {
    // Count the task even if it throws: attention tasks wait for every append task.
    struct CountOnExit {
      std::atomic<int>& counter;
      ~CountOnExit() { counter.fetch_add(1, std::memory_order_release); }
    } count_on_exit{appended_tasks_};
    const int end_seq = std::min(p.num_seqs, (index + 1) * kSeqsPerAppendTask);
    for (int seq = index * kSeqsPerAppendTask; seq < end_seq; ++seq) {
      write_slot(p, p.new_k, p.new_v, seq, p.new_kv_row_stride, p.slot_mapping[seq]);
    }
    return;
  }
  const int attention_index = index - num_append_tasks_;
  if (attention_index >= int(tasks_.size())) return;
  // Append tasks have lower indices, so they are already claimed and running: a short wait.
  while (appended_tasks_.load(std::memory_order_acquire) < num_append_tasks_) {
    std::this_thread::yield();
  }
  run_attention(tasks_[attention_index], scratch);
}

DecodeJob::TaskState DecodeJob::start_task(const Task& task, int num_kv_heads,
                                           WorkerScratch& scratch) const {
  const DecodeProblem& p = problem_;
  const int group = group_size_;
  const int rows = num_kv_heads * group;  // query rows of this task
  const int dim = p.head_dim;
  const int64_t element = element_size(p.dtype);
  const bool widen_q = p.kv_dtype == DType::kInt8;  // 8-bit kernels read q in float32
  TaskState state;
  state.prepared_floats = prepared_q_floats(group, dim);
  // One buffer per task, sized up front: the merge area must not move the others.
  const size_t merge_floats = size_t(num_parts_[task.seq]) + dim;
  float* buffer = scratch.floats(size_t(num_kv_heads * state.prepared_floats) +
                                 size_t(rows) * (dim + 3) + size_t(group) * p.block_size +
                                 merge_floats + (widen_q ? size_t(group) * dim : 0));
  state.prepared_q = buffer;  // [num_kv_heads, prepared_floats]
  state.acc = state.prepared_q + num_kv_heads * state.prepared_floats;  // [rows, head_dim]
  state.running_max = state.acc + size_t(rows) * dim;                   // [rows]
  state.running_sum = state.running_max + rows;                          // [rows]
  state.alpha = state.running_sum + rows;                                // [rows]
  state.scores = state.alpha + rows;  // [group, block_size], one kv head at a time
  state.merge_scratch = state.scores + size_t(group) * p.block_size;
  state.q_f32 = state.merge_scratch + merge_floats;

  const int64_t q_offset =
      int64_t(task.seq) * p.q_row_stride + int64_t(task.first_kv_head) * group * dim;
  const char* q_raw = static_cast<const char*>(p.q) + q_offset * element;
  for (int head = 0; head < num_kv_heads; ++head) {
    const char* q_rows = q_raw + int64_t(head) * group * dim * element;
    if (widen_q) {
      for (int64_t i = 0; i < int64_t(group) * dim; ++i)
        state.q_f32[i] = load_as_float(q_rows, i, p.dtype);
      q_rows = reinterpret_cast<const char*>(state.q_f32);
    }
    ops_->prepare_q(q_rows, group, dim, state.prepared_q + head * state.prepared_floats);
  }
  std::fill(state.acc, state.acc + size_t(rows) * dim, 0.0f);
  std::fill(state.running_max, state.running_max + rows,
            -std::numeric_limits<float>::infinity());
  std::fill(state.running_sum, state.running_sum + rows, 0.0f);
  return state;
}

void DecodeJob::run_attention(const Task& task, WorkerScratch& scratch) {
  const DecodeProblem& p = problem_;
  const int group = group_size_;
  const int num_kv_heads = std::min(heads_per_task_, p.num_kv_heads - task.first_kv_head);
  const int dim = p.head_dim;
  const int64_t element = element_size(p.kv_dtype);
  const TaskState s = start_task(task, num_kv_heads, scratch);

  const int seq_len = p.seq_lens[task.seq];
  const int first_block = task.part * part_blocks_;
  const int end_block = std::min(ceil_div(seq_len, p.block_size), first_block + part_blocks_);
  const int32_t* table = p.block_tables + int64_t(task.seq) * p.max_blocks_per_seq;
  const int64_t head_bytes = int64_t(p.block_size) * dim * element;  // one kv head of a block
  const int prefetch_heads = int(std::max<int64_t>(1, kPrefetchBytes / (2 * head_bytes)));
  auto block_offset = [&](int block) -> int64_t {
    const int32_t block_id = table[block];
    if (block_id < 0 || block_id >= p.num_blocks) {
      throw std::runtime_error("block_tables[" + std::to_string(task.seq) + ", " +
                               std::to_string(block) + "] = " + std::to_string(block_id) +
                               " is outside the KV cache of " + std::to_string(p.num_blocks) +
                               " blocks");
    }
    return (int64_t(block_id) * p.num_kv_heads + task.first_kv_head) * head_bytes;
  };
  const char* k_base = static_cast<const char*>(p.k_cache);
  const char* v_base = static_cast<const char*>(p.v_cache);
  int64_t offset = block_offset(first_block);
  // Fused 8-bit kernels take the walk's steps a few at a time (on VNNI each step's softmax
  // overlaps the next one's q . k).
  Int8Step steps[kInt8StepsPerCall];
  RowPrefetch aheads[kInt8StepsPerCall];
  int pending = 0;
  auto run_steps = [&] {
    ops_->attend_int8(steps, pending, group, dim, p.scale);
    pending = 0;
  };
  for (int block = first_block; block < end_block; ++block) {
    const int64_t next_offset = block + 1 < end_block ? block_offset(block + 1) : -1;
    const int num_tokens = std::min(p.block_size, seq_len - block * p.block_size);
    for (int head = 0; head < num_kv_heads; ++head) {
      const int64_t head_offset = offset + head * head_bytes;
      // Each kv head of a block is its own 4 KiB page (head_dim 128, bf16), where the hardware
      // prefetcher starts cold, and the next block is wherever the block table says: fetch
      // the K and V rows prefetch_heads heads ahead in walk order (at most into the next
      // block) into L2, and the next head's into L1, while this one computes, a few lines
      // per step of its q . k (RowPrefetch).
      auto walk_offset = [&](int ahead_head) -> int64_t {  // -1: past the task's blocks
        if (ahead_head < num_kv_heads) return offset + ahead_head * head_bytes;
        if (next_offset < 0) return -1;
        return next_offset + std::min(ahead_head - num_kv_heads, num_kv_heads - 1) * head_bytes;
      };
      const int64_t ahead_offset = walk_offset(head + prefetch_heads);
      const int64_t near_offset = walk_offset(head + 1);
      auto rows_at = [&](const char* base, int64_t at) { return at < 0 ? nullptr : base + at; };
      RowPrefetch ahead(rows_at(k_base, ahead_offset), rows_at(v_base, ahead_offset),
                        rows_at(k_base, near_offset), rows_at(v_base, near_offset), head_bytes);
      // 8-bit rows are round(x / scale): a token's score and its weight on v carry its scale.
      const int64_t scale_offset = head_offset / (int64_t(dim) * element);
      if (p.kv_dtype == DType::kInt8 && ahead_offset >= 0) {
        // The ahead head's token scales: one more line each.
        const int64_t ahead_scales = ahead_offset / (int64_t(dim) * element);
        __builtin_prefetch(p.k_scales + ahead_scales, 0, 1);
        __builtin_prefetch(p.v_scales + ahead_scales, 0, 1);
      }
      const int row = head * group;
      if (ops_->attend_int8 != nullptr) {
        aheads[pending] = ahead;
        steps[pending] = Int8Step{s.prepared_q + head * s.prepared_floats,
                                  reinterpret_cast<const int8_t*>(k_base + head_offset),
                                  reinterpret_cast<const int8_t*>(v_base + head_offset),
                                  p.k_scales + scale_offset, p.v_scales + scale_offset,
                                  num_tokens, s.running_max + row, s.running_sum + row,
                                  s.acc + int64_t(row) * dim, &aheads[pending]};
        if (++pending == kInt8StepsPerCall) run_steps();
        continue;
      }
      ops_->scores(s.prepared_q + head * s.prepared_floats, k_base + head_offset, group,
                   num_tokens, dim, p.scale, s.scores, ahead);
      ahead.finish();
      if (p.kv_dtype == DType::kInt8) {
        scale_rows(s.scores, group, num_tokens, p.k_scales + scale_offset);
      }
      ops_->softmax(s.scores, group, num_tokens, s.running_max + row, s.running_sum + row,
                    s.alpha + row);
      if (p.kv_dtype == DType::kInt8) {
        scale_rows(s.scores, group, num_tokens, p.v_scales + scale_offset);
      }
      ops_->accumulate(s.scores, v_base + head_offset, group, num_tokens, dim, s.alpha + row,
                       s.acc + int64_t(row) * dim);
    }
    offset = next_offset;
  }
  if (pending > 0) run_steps();
  if (ops_->finish_acc != nullptr) ops_->finish_acc(s.acc, num_kv_heads * group, dim);
  for (int head = 0; head < num_kv_heads; ++head) {
    const int row = head * group;
    finish_rows(task, task.first_kv_head + head, s.acc + int64_t(row) * dim,
                s.running_max + row, s.running_sum + row, s.merge_scratch);
  }
}

void DecodeJob::finish_rows(const Task& task, int kv_head, const float* acc,
                            const float* running_max, const float* running_sum,
                            float* merge_scratch) {
  const DecodeProblem& p = problem_;
  const int dim = p.head_dim;
  const bool split = num_parts_[task.seq] > 1;
  for (int g = 0; g < group_size_; ++g) {
    const int head = kv_head * group_size_ + g;
    const float inverse_sum = 1.0f / running_sum[g];
    const float row_lse = running_max[g] + std::log(running_sum[g]);
    const float* acc_row = acc + int64_t(g) * dim;
    if (split) {
      const int64_t partial_row =
          int64_t(partial_index_[task.seq] + task.part) * p.num_heads + head;
      float* target = partial_out_.data() + partial_row * dim;
      for (int d = 0; d < dim; ++d) target[d] = acc_row[d] * inverse_sum;
      partial_lse_[partial_row] = row_lse;
    } else {
      const int64_t out_row = int64_t(task.seq) * p.num_heads + head;
      for (int d = 0; d < dim; ++d)
        store_from_float(p.out, out_row * dim + d, p.dtype, acc_row[d] * inverse_sum);
      p.lse[out_row] = row_lse;
    }
  }
  if (!split) return;
  std::atomic<int>& left = parts_left_[size_t(task.seq) * p.num_kv_heads + kv_head];
  if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    merge_parts(task.seq, kv_head, merge_scratch);
  }
}

// out = sum_p w_p out_p / sum_p w_p with w_p = exp(lse_p - max lse); lse = max + log(sum w).
void DecodeJob::merge_parts(int seq, int kv_head, float* merge_scratch) {
  const DecodeProblem& p = problem_;
  const int dim = p.head_dim;
  const int parts = num_parts_[seq];
  float* weights = merge_scratch;  // [parts], then merged [head_dim]
  float* merged = weights + parts;
  for (int g = 0; g < group_size_; ++g) {
    const int head = kv_head * group_size_ + g;
    auto partial_row = [&](int part) {
      return int64_t(partial_index_[seq] + part) * p.num_heads + head;
    };
    float max_lse = -std::numeric_limits<float>::infinity();
    for (int part = 0; part < parts; ++part) {
      max_lse = std::max(max_lse, partial_lse_[partial_row(part)]);
    }
    float weight_sum = 0.0f;
    for (int part = 0; part < parts; ++part) {
      weights[part] = std::exp(partial_lse_[partial_row(part)] - max_lse);
      weight_sum += weights[part];
    }
    std::fill(merged, merged + dim, 0.0f);
    for (int part = 0; part < parts; ++part) {
      const float weight = weights[part] / weight_sum;
      const float* source = partial_out_.data() + partial_row(part) * dim;
      for (int d = 0; d < dim; ++d) merged[d] += weight * source[d];
    }
    const int64_t out_row = int64_t(seq) * p.num_heads + head;
    for (int d = 0; d < dim; ++d) store_from_float(p.out, out_row * dim + d, p.dtype, merged[d]);
    p.lse[out_row] = max_lse + std::log(weight_sum);
  }
}

}  // namespace apex
