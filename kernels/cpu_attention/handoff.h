// The per-layer hand-off of the hybrid runtime, native so that no Python runs between a GPU
// layer and its CPU attention job: one call stages a layer's host rows (q/k/v) into pinned
// staging buffers and raises the layer's ready flag behind them; one call brings the job's
// output back into the caller's buffer once the layer's done flag is raised.
//
// On CUDA the copies are enqueued through the CUDA runtime that torch loaded (its function
// addresses are passed in; this extension does not link CUDA): staging runs on a copy stream
// ordered after the compute stream's work by an event, and the ready flag is copied from device
// memory behind the data, so the pool's watcher sees the data land by itself. The CPU -> GPU
// wait is either the engine thread waiting natively (kEngineThread) or a CUDA host function
// holding the compute stream (kHostFunc), so the engine thread never blocks inside a step.
// Without CUDA the same calls copy with memcpy and raise the flags directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace apex {

// CUDA runtime entry points (cudaMemcpyAsync etc.), resolved by the caller; all null on a CPU.
struct CudaRuntime {
  using MemcpyAsync = int (*)(void*, const void*, size_t, int, void*);
  using Memcpy2DAsync = int (*)(void*, size_t, const void*, size_t, size_t, size_t, int, void*);
  using EventCreateWithFlags = int (*)(void**, unsigned int);
  using EventDestroy = int (*)(void*);
  using EventRecord = int (*)(void*, void*);
  using StreamWaitEvent = int (*)(void*, void*, unsigned int);
  using LaunchHostFunc = int (*)(void*, void (*)(void*), void*);

  MemcpyAsync memcpy_async = nullptr;
  Memcpy2DAsync memcpy2d_async = nullptr;
  EventCreateWithFlags event_create_with_flags = nullptr;
  EventDestroy event_destroy = nullptr;
  EventRecord event_record = nullptr;
  StreamWaitEvent stream_wait_event = nullptr;
  LaunchHostFunc launch_host_func = nullptr;
};

// Pinned staging of one parity (layers alternate between two sets).
struct StagingBuffers {
  void* q = nullptr;    // [max_rows, num_heads, head_dim]
  void* k = nullptr;    // [max_rows, num_kv_heads, head_dim]
  void* v = nullptr;
  void* out = nullptr;  // [max_rows, num_heads, head_dim]
};

enum class LayerWait { kEngineThread = 0, kHostFunc = 1 };

class LayerHandoff {
 public:
  // flags: [2][num_layers] int64 (ready, then done), host memory (pinned on CUDA).
  // seq_on_device: an int64 in device memory holding this step's sequence number (CUDA only).
  LayerHandoff(int num_layers, int max_rows, size_t q_row_bytes, size_t kv_row_bytes,
               StagingBuffers even, StagingBuffers odd, int64_t* flags,
               const int64_t* seq_on_device, void* copy_stream, const CudaRuntime& cuda,
               LayerWait wait, double timeout_s);
  ~LayerHandoff();
  LayerHandoff(const LayerHandoff&) = delete;
  LayerHandoff& operator=(const LayerHandoff&) = delete;

  // A step with num_rows host rows, its sequence number, and (CUDA) the compute stream.
  void begin_step(int64_t seq, int num_rows, void* compute_stream);
  // Copy rows [row_start, row_start + num_rows) of q/k/v (row strides in bytes; each row's
  // heads x head_dim contiguous) to the layer's staging buffers, then raise its ready flag.
  void stage(int layer, const char* q, size_t q_stride, const char* k, size_t k_stride,
             const char* v, size_t v_stride, int row_start);
  // After the layer's done flag: copy its output rows to dst (row stride in bytes), on CUDA
  // queued on the compute stream behind the wait. Throws on timeout (engine-thread wait).
  void fetch(int layer, char* dst, size_t dst_stride);

 private:
  const StagingBuffers& staging(int layer) const { return staging_[layer % 2]; }
  void check(int status, const char* what) const;

  int num_layers_;
  int max_rows_;
  size_t q_row_bytes_;
  size_t kv_row_bytes_;
  StagingBuffers staging_[2];
  int64_t* ready_flags_;
  int64_t* done_flags_;
  const int64_t* seq_on_device_;
  void* copy_stream_;
  CudaRuntime cuda_;
  LayerWait wait_;
  double timeout_s_;
  void* staged_event_ = nullptr;  // compute stream -> copy stream ordering (CUDA)
  // Host-function records {done flag address, value}, per step parity and layer: a record is
  // read when the stream reaches it, so the next step writes the other parity.
  std::vector<int64_t> wait_records_;
  int64_t seq_ = 0;
  int num_rows_ = 0;
  void* compute_stream_ = nullptr;
};

// The cudaHostFn_t that holds a stream until *record[0] >= record[1] (bounded by a timeout).
void host_func_wait(void* record);

}  // namespace apex
