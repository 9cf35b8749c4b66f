// The hybrid runtime's per-layer hand-off (see handoff.h).
#include "handoff.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace apex {
namespace {

// cudaMemcpyKind and cudaEventDisableTiming values of the CUDA runtime API.
constexpr int kHostToDevice = 1;
constexpr int kDeviceToHost = 2;
constexpr unsigned int kEventDisableTiming = 0x02;

// Same bound as the engine thread's wait, so a lost job cannot hold the stream forever.
constexpr double kHostFuncWaitTimeoutS = 60.0;

// Copies `rows` rows of `width` bytes between two row-strided buffers on the host.
void copy_rows(char* dst, size_t dst_stride, const char* src, size_t src_stride, size_t width,
               int rows) {
  for (int row = 0; row < rows; ++row)
    std::memcpy(dst + size_t(row) * dst_stride, src + size_t(row) * src_stride, width);
}

}  // namespace

void host_func_wait(void* data) {
  const int64_t* record = static_cast<const int64_t*>(data);
  wait_flag(reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(record[0])), record[1],
            kHostFuncWaitTimeoutS);
}

LayerHandoff::LayerHandoff(int num_layers, int max_rows, size_t q_row_bytes,
                           size_t kv_row_bytes, StagingBuffers even, StagingBuffers odd,
                           int64_t* flags, const int64_t* seq_on_device, void* copy_stream,
                           const CudaRuntime& cuda, LayerWait wait, double timeout_s)
    : num_layers_(num_layers),
      max_rows_(max_rows),
      q_row_bytes_(q_row_bytes),
      kv_row_bytes_(kv_row_bytes),
      staging_{even, odd},
      ready_flags_(flags),
      done_flags_(flags + num_layers),
      seq_on_device_(seq_on_device),
      copy_stream_(copy_stream),
      cuda_(cuda),
      wait_(wait),
      timeout_s_(timeout_s),
      wait_records_(size_t(2) * num_layers * 2, 0) {
  if (num_layers < 1 || max_rows < 1) throw std::invalid_argument("empty hand-off");
  if (copy_stream_ != nullptr) {
    if (cuda_.memcpy_async == nullptr || cuda_.memcpy2d_async == nullptr ||
        cuda_.event_create_with_flags == nullptr || cuda_.event_destroy == nullptr ||
        cuda_.event_record == nullptr || cuda_.stream_wait_event == nullptr ||
        cuda_.launch_host_func == nullptr || seq_on_device_ == nullptr)
      throw std::invalid_argument("a CUDA hand-off needs every CUDA runtime entry point");
    check(cuda_.event_create_with_flags(&staged_event_, kEventDisableTiming),
          "cudaEventCreateWithFlags");
  } else if (wait_ == LayerWait::kHostFunc) {
    throw std::invalid_argument("the host-function wait needs CUDA");
  }
}

LayerHandoff::~LayerHandoff() {
  if (staged_event_ != nullptr) cuda_.event_destroy(staged_event_);
}

void LayerHandoff::check(int status, const char* what) const {
  if (status != 0)
    throw std::runtime_error(std::string(what) + " failed with CUDA error " +
                             std::to_string(status));
}

void LayerHandoff::begin_step(int64_t seq, int num_rows, void* compute_stream) {
  if (num_rows < 0 || num_rows > max_rows_)
    throw std::invalid_argument(std::to_string(num_rows) + " host rows exceed the staging "
                                "capacity " + std::to_string(max_rows_) + " (max_num_seqs)");
  seq_ = seq;
  num_rows_ = num_rows;
  compute_stream_ = compute_stream;
  int64_t* records = wait_records_.data() + size_t(seq % 2) * num_layers_ * 2;
  for (int layer = 0; layer < num_layers_; ++layer) {
    records[2 * layer] = int64_t(reinterpret_cast<uintptr_t>(done_flags_ + layer));
    records[2 * layer + 1] = seq;
  }
}

void LayerHandoff::stage(int layer, const char* q, size_t q_stride, const char* k,
                         size_t k_stride, const char* v, size_t v_stride, int row_start) {
  if (layer < 0 || layer >= num_layers_) throw std::out_of_range("layer out of range");
  const StagingBuffers& to = staging(layer);
  const size_t start = size_t(row_start);
  q += start * q_stride;
  k += start * k_stride;
  v += start * v_stride;
  if (copy_stream_ == nullptr) {
    copy_rows(static_cast<char*>(to.q), q_row_bytes_, q, q_stride, q_row_bytes_, num_rows_);
    copy_rows(static_cast<char*>(to.k), kv_row_bytes_, k, k_stride, kv_row_bytes_, num_rows_);
    copy_rows(static_cast<char*>(to.v), kv_row_bytes_, v, v_stride, kv_row_bytes_, num_rows_);
    set_flag(ready_flags_ + layer, seq_);
    return;
  }
  // The copy stream starts once the compute stream has produced this layer's q/k/v.
  check(cuda_.event_record(staged_event_, compute_stream_), "cudaEventRecord");
  check(cuda_.stream_wait_event(copy_stream_, staged_event_, 0), "cudaStreamWaitEvent");
  check(cuda_.memcpy2d_async(to.q, q_row_bytes_, q, q_stride, q_row_bytes_, num_rows_,
                             kDeviceToHost, copy_stream_), "cudaMemcpy2DAsync(q)");
  check(cuda_.memcpy2d_async(to.k, kv_row_bytes_, k, k_stride, kv_row_bytes_, num_rows_,
                             kDeviceToHost, copy_stream_), "cudaMemcpy2DAsync(k)");
  check(cuda_.memcpy2d_async(to.v, kv_row_bytes_, v, v_stride, kv_row_bytes_, num_rows_,
                             kDeviceToHost, copy_stream_), "cudaMemcpy2DAsync(v)");
  // In stream order, so the flag lands only after the data.
  check(cuda_.memcpy_async(ready_flags_ + layer, seq_on_device_, sizeof(int64_t),
                           kDeviceToHost, copy_stream_), "cudaMemcpyAsync(ready flag)");
}

void LayerHandoff::fetch(int layer, char* dst, size_t dst_stride) {
  if (layer < 0 || layer >= num_layers_) throw std::out_of_range("layer out of range");
  const char* out = static_cast<const char*>(staging(layer).out);
  if (wait_ == LayerWait::kHostFunc) {
    int64_t* record = wait_records_.data() + (size_t(seq_ % 2) * num_layers_ + layer) * 2;
    check(cuda_.launch_host_func(compute_stream_, &host_func_wait, record), "cudaLaunchHostFunc");
  } else if (!wait_flag(done_flags_ + layer, seq_, timeout_s_)) {
    throw std::runtime_error("CPU attention for layer " + std::to_string(layer) +
                             " did not finish within " + std::to_string(int(timeout_s_)) + " s");
  }
  if (copy_stream_ == nullptr) {
    copy_rows(dst, dst_stride, out, q_row_bytes_, q_row_bytes_, num_rows_);
    return;
  }
  check(cuda_.memcpy2d_async(dst, dst_stride, out, q_row_bytes_, q_row_bytes_, num_rows_,
                             kHostToDevice, compute_stream_), "cudaMemcpy2DAsync(out)");
}

}  // namespace apex
