// The hybrid runtime's per-layer hand-off (see handoff.h).
#include "handoff.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace apex {
namespace {

// cudaMemcpyKind values of the CUDA runtime API.
constexpr int kHostToDevice = 1;
constexpr int kDeviceToHost = 2;
// Driver API flags: CU_STREAM_WAIT_VALUE_GEQ (wait until (int64_t)(*flag - value) >= 0) and
// CU_STREAM_WRITE_VALUE_DEFAULT (the write is preceded by a system-wide memory fence).
constexpr unsigned int kWaitValueGeq = 0x0;
constexpr unsigned int kWriteValueDefault = 0x0;

uint64_t flag_offset(int layer) { return uint64_t(layer) * sizeof(int64_t); }

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

LayerHandoff::LayerHandoff(int num_layers, int max_rows, size_t qkv_row_bytes,
                           size_t out_row_bytes, StagingBuffers even, StagingBuffers odd,
                           int64_t* flags, const int64_t* seq_on_device,
                           uint64_t flags_on_device, const CudaRuntime& cuda,
                           LayerWait wait, double timeout_s)
    : num_layers_(num_layers),
      max_rows_(max_rows),
      qkv_row_bytes_(qkv_row_bytes),
      out_row_bytes_(out_row_bytes),
      staging_{even, odd},
      ready_flags_(flags),
      done_flags_(flags + num_layers),
      seq_on_device_(seq_on_device),
      ready_flags_on_device_(flags_on_device),
      done_flags_on_device_(flags_on_device + uint64_t(num_layers) * sizeof(int64_t)),
      cuda_(cuda),
      on_cuda_(cuda.memcpy2d_async != nullptr),
      wait_(wait),
      timeout_s_(timeout_s),
      wait_records_(size_t(2) * num_layers * kWaitRecordWords, 0),
      graph_wait_records_(size_t(num_layers) * kWaitRecordWords, 0) {
  if (num_layers < 1 || max_rows < 1) throw std::invalid_argument("empty hand-off");
  if (on_cuda_) {
    const bool memory_ops = cuda_.stream_wait_value64 != nullptr &&
                            cuda_.stream_write_value64 != nullptr && flags_on_device != 0;
    if (cuda_.memcpy_async == nullptr || cuda_.launch_host_func == nullptr ||
        (!memory_ops && seq_on_device_ == nullptr))
      throw std::invalid_argument("a CUDA hand-off needs the CUDA runtime's entry points and "
                                  "either stream memory operations or the device sequence "
                                  "number");
    if (!memory_ops) cuda_.stream_wait_value64 = cuda_.stream_write_value64 = nullptr;
    if (wait_ == LayerWait::kStreamWait && !memory_ops)
      throw std::invalid_argument("the stream wait needs stream memory operations");
  } else if (wait_ != LayerWait::kEngineThread) {
    throw std::invalid_argument("the host-function and stream waits need CUDA");
  }
  for (int layer = 0; layer < num_layers; ++layer) {
    int64_t* record = graph_wait_records_.data() + size_t(layer) * kWaitRecordWords;
    record[0] = int64_t(reinterpret_cast<uintptr_t>(done_flags_ + layer));
    record[1] = 1;
  }
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
  int64_t* records = wait_records_.data() + size_t(seq % 2) * num_layers_ * kWaitRecordWords;
  for (int layer = 0; layer < num_layers_; ++layer, records += kWaitRecordWords) {
    records[0] = int64_t(reinterpret_cast<uintptr_t>(done_flags_ + layer));
    records[1] = seq;
  }
}

void LayerHandoff::begin_capture(int num_rows, void* capture_stream) {
  if (!on_cuda_ || seq_on_device_ == nullptr || wait_ == LayerWait::kEngineThread)
    throw std::invalid_argument("capturing the hand-off needs CUDA, the device-side sequence "
                                "number and a device-side wait (host-func or stream-wait)");
  if (num_rows < 1 || num_rows > max_rows_)
    throw std::invalid_argument(std::to_string(num_rows) + " captured host rows: outside 1.." +
                                std::to_string(max_rows_));
  num_rows_ = num_rows;
  compute_stream_ = capture_stream;
  capturing_ = true;
}

void LayerHandoff::stage(int layer, const char* qkv, size_t qkv_stride, int row_start) {
  if (layer < 0 || layer >= num_layers_) throw std::out_of_range("layer out of range");
  char* to = static_cast<char*>(staging(layer).qkv);
  qkv += size_t(row_start) * qkv_stride;
  if (!on_cuda_) {
    copy_rows(to, qkv_row_bytes_, qkv, qkv_stride, qkv_row_bytes_, num_rows_);
    set_flag(ready_flags_ + layer, seq_);
    return;
  }
  check(cuda_.memcpy2d_async(to, qkv_row_bytes_, qkv, qkv_stride, qkv_row_bytes_, num_rows_,
                             kDeviceToHost, compute_stream_), "cudaMemcpy2DAsync(qkv)");
  // In stream order, so the flag lands only after the data (the memory write is also preceded
  // by a system-wide fence).
  if (cuda_.stream_write_value64 != nullptr && !capturing_) {
    check(cuda_.stream_write_value64(compute_stream_, ready_flags_on_device_ + flag_offset(layer),
                                     uint64_t(seq_), kWriteValueDefault),
          "cuStreamWriteValue64(ready flag)");
  } else {
    check(cuda_.memcpy_async(ready_flags_ + layer, seq_on_device_, sizeof(int64_t),
                             kDeviceToHost, compute_stream_), "cudaMemcpyAsync(ready flag)");
  }
}

void LayerHandoff::fetch(int layer, char* dst, size_t dst_stride) {
  if (layer < 0 || layer >= num_layers_) throw std::out_of_range("layer out of range");
  const char* out = static_cast<const char*>(staging(layer).out);
  if (wait_ == LayerWait::kStreamWait) {
    // A captured wait cannot name the step: it waits for any raise (flags zeroed per replay).
    check(cuda_.stream_wait_value64(compute_stream_, done_flags_on_device_ + flag_offset(layer),
                                    capturing_ ? 1 : uint64_t(seq_), kWaitValueGeq),
          "cuStreamWaitValue64(done flag)");
  } else if (wait_ == LayerWait::kHostFunc) {
    int64_t* record = capturing_
        ? graph_wait_records_.data() + size_t(layer) * kWaitRecordWords
        : wait_records_.data() + (size_t(seq_ % 2) * num_layers_ + layer) * kWaitRecordWords;
    check(cuda_.launch_host_func(compute_stream_, &host_func_wait, record), "cudaLaunchHostFunc");
  } else if (!wait_flag(done_flags_ + layer, seq_, timeout_s_)) {
    throw std::runtime_error("CPU attention for layer " + std::to_string(layer) +
                             " did not finish within " + std::to_string(int(timeout_s_)) + " s");
  }
  if (!on_cuda_) {
    copy_rows(dst, dst_stride, out, out_row_bytes_, out_row_bytes_, num_rows_);
    return;
  }
  check(cuda_.memcpy2d_async(dst, dst_stride, out, out_row_bytes_, out_row_bytes_, num_rows_,
                             kHostToDevice, compute_stream_), "cudaMemcpy2DAsync(out)");
}

}  // namespace apex
