// The per-layer hand-off of the hybrid runtime, native so that no Python runs between a GPU
// layer and its CPU attention job: one call stages a layer's host rows (q|k|v, one row each)
// into a pinned staging buffer and raises the layer's ready flag behind them; one call brings
// the job's output back into the caller's buffer once the layer's done flag is raised.
//
// On CUDA everything is enqueued on the compute stream through the CUDA runtime (and, for
// stream memory operations, driver) that torch loaded (their function addresses are passed in;
// this extension does not link CUDA): one staging copy of the rows, then the ready flag, in
// stream order behind the data, so the pool's watcher sees the data land by itself. The flag is
// a stream memory write where the device has stream memory operations, else a copy of the
// step's sequence number from device memory. The CPU -> GPU wait is one of: a CUDA host
// function holding the stream, a stream memory wait on the done flag (the GPU polls the pinned
// flag), or the engine thread waiting natively. Without CUDA the same calls copy with memcpy
// and raise the flags directly.
//
// Between begin_capture and end_capture the calls are recorded into a CUDA graph that is
// replayed step after step, so nothing recorded may hold a step's sequence number: each ready
// flag is then copied from the device-side sequence number (set before every replay), and the
// compute stream waits for a done flag to be raised at all (>= 1); the caller zeroes the done
// flags before each replay's jobs are queued.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace apex {

// CUDA entry points, resolved by the caller; all null on a CPU.
struct CudaRuntime {
  using MemcpyAsync = int (*)(void*, const void*, size_t, int, void*);
  using Memcpy2DAsync = int (*)(void*, size_t, const void*, size_t, size_t, size_t, int, void*);
  using LaunchHostFunc = int (*)(void*, void (*)(void*), void*);
  // cuStreamWaitValue64 / cuStreamWriteValue64 (driver API, v2): stream, device address,
  // value, flags.
  using StreamValue64 = int (*)(void*, uint64_t, uint64_t, unsigned int);

  MemcpyAsync memcpy_async = nullptr;
  Memcpy2DAsync memcpy2d_async = nullptr;
  LaunchHostFunc launch_host_func = nullptr;
  // Both null unless the device has 64-bit stream memory operations.
  StreamValue64 stream_wait_value64 = nullptr;
  StreamValue64 stream_write_value64 = nullptr;
};

// Pinned staging of one parity (layers alternate between two sets).
struct StagingBuffers {
  void* qkv = nullptr;  // [max_rows, num_heads + 2 * num_kv_heads, head_dim]
  void* out = nullptr;  // [max_rows, num_heads, head_dim]
};

// How the compute stream (or, without CUDA, the engine thread) waits for a layer's CPU output.
enum class LayerWait { kEngineThread = 0, kHostFunc = 1, kStreamWait = 2 };

class LayerHandoff {
 public:
  // flags: [2][num_layers] int64 (ready, then done) in host memory (pinned on CUDA).
  // seq_on_device (CUDA without stream memory operations): an int64 in device memory holding
  // the step's sequence number. flags_on_device (CUDA with them): the flags' device address.
  LayerHandoff(int num_layers, int max_rows, size_t qkv_row_bytes, size_t out_row_bytes,
               StagingBuffers even, StagingBuffers odd, int64_t* flags,
               const int64_t* seq_on_device, uint64_t flags_on_device,
               const CudaRuntime& cuda, LayerWait wait, double timeout_s);
  LayerHandoff(const LayerHandoff&) = delete;
  LayerHandoff& operator=(const LayerHandoff&) = delete;

  // A step with num_rows host rows, its sequence number, and (CUDA) the compute stream.
  // num_rows may exceed the rows the jobs attend (a graphed step's padding): every staged
  // and fetched row is copied, only the jobs' rows are read.
  void begin_step(int64_t seq, int num_rows, void* compute_stream);
  // Record stage/fetch into the CUDA graph being captured on `capture_stream` (see above);
  // needs the device-side sequence number and a device-side wait (host function or stream).
  void begin_capture(int num_rows, void* capture_stream);
  void end_capture() { capturing_ = false; }
  // Copy rows [row_start, row_start + num_rows) of qkv (each row q|k|v, qkv_row_bytes
  // contiguous; rows qkv_stride bytes apart) to the layer's staging, then raise its ready flag.
  void stage(int layer, const char* qkv, size_t qkv_stride, int row_start);
  // After the layer's done flag: copy its output rows to dst (row stride in bytes), on CUDA
  // queued on the compute stream behind the wait. Throws on timeout (engine-thread wait).
  void fetch(int layer, char* dst, size_t dst_stride);

 private:
  const StagingBuffers& staging(int layer) const { return staging_[layer % 2]; }
  void check(int status, const char* what) const;

  int num_layers_;
  int max_rows_;
  size_t qkv_row_bytes_;
  size_t out_row_bytes_;
  StagingBuffers staging_[2];
  int64_t* ready_flags_;
  int64_t* done_flags_;
  const int64_t* seq_on_device_;
  uint64_t ready_flags_on_device_;
  uint64_t done_flags_on_device_;
  CudaRuntime cuda_;
  bool on_cuda_;
  LayerWait wait_;
  double timeout_s_;
  // Host-function records {done flag address, value}, per step parity and layer: a record is
  // read when the stream reaches it, so the next step writes the other parity.
  std::vector<int64_t> wait_records_;
  // The records captured graphs hold: {done flag address, 1}, never rewritten.
  std::vector<int64_t> graph_wait_records_;
  bool capturing_ = false;
  int64_t seq_ = 0;
  int num_rows_ = 0;
  void* compute_stream_ = nullptr;
};

// The cudaHostFn_t that holds a stream until *record[0] >= record[1] (bounded by a timeout).
void host_func_wait(void* record);

// Words per host-function record.
constexpr int kWaitRecordWords = 2;

}  // namespace apex
