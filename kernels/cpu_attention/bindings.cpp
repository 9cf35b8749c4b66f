// pybind11 module apex_grpc._cpu_attention. No libtorch: Python passes raw data pointers of
// contiguous CPU tensors (tensor.data_ptr()), their sizes and an element-type code, and keeps
// the tensors alive until the job is waited on (apex_grpc/attention/cpu_kernel.py validates).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "decode.h"
#include "handoff.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace apex {
namespace {

DType dtype_from_code(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

template <class T>
T* pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

const KernelOps* ops_for(DType dtype, const std::string& isa) {
  const KernelOps* ops = select_kernel_ops(dtype, isa.empty() ? nullptr : isa.c_str());
  if (ops == nullptr) throw std::invalid_argument("ISA '" + isa + "' is not available on this CPU");
  return ops;
}

// The pool plus the kernel set it uses for each dtype (fixed at construction).
class PoolBinding {
 public:
  PoolBinding(int num_threads, std::vector<int> pin_cores, const std::string& isa)
      : pool_(num_threads, std::move(pin_cores)) {
    for (int code = 0; code < 4; ++code) {
      const DType dtype = static_cast<DType>(code);
      // bfloat16 dot products only exist for bfloat16 KV and integer ones for int8 KV; other
      // dtypes fall back to plain avx512.
      const bool other_dtype = (isa == "avx512bf16" && dtype != DType::kBFloat16) ||
                               (isa == "avx512vnni" && dtype != DType::kInt8);
      ops_[code] = ops_for(dtype, other_dtype ? std::string("avx512") : isa);
    }
  }

  int num_threads() const { return pool_.num_threads(); }
  std::string isa(int dtype_code) const { return ops_[int(dtype_from_code(dtype_code))]->name; }

  std::shared_ptr<Job> submit_decode(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
                                     uintptr_t block_tables, uintptr_t seq_lens, uintptr_t out,
                                     uintptr_t lse, uintptr_t new_k, uintptr_t new_v,
                                     uintptr_t slot_mapping, const std::vector<int64_t>& sizes,
                                     int dtype_code, int kv_dtype_code, uintptr_t k_scales,
                                     uintptr_t v_scales, float scale, uintptr_t ready_flag,
                                     int64_t ready_value, uintptr_t done_flag,
                                     int64_t done_value) {
    auto job = make_decode_job(q, k_cache, v_cache, block_tables, seq_lens, out, lse, new_k,
                               new_v, slot_mapping, sizes, dtype_code, kv_dtype_code, k_scales,
                               v_scales, scale, ready_flag, ready_value, done_flag, done_value);
    pool_.submit(job);
    return job;
  }

  // One step's jobs for every layer at once (the hybrid runtime's begin_step): layer l reads
  // the staging of parity l % 2 (q, new_k, new_v, out, lse: 2 addresses each) and the KV
  // cache at kv_cache + l * layer_bytes (v at + v_offset_bytes), waits for flags[l] >= value
  // and raises flags[num_layers + l] to value. An 8-bit cache's scales follow the same
  // pattern (kv_scales, scales_layer_bytes, scales_v_offset_bytes; kv_scales 0 otherwise).
  // The caller validated layer 0's problem. Every job is built (and checked) before any is
  // queued, so a refused step queues nothing.
  std::vector<std::shared_ptr<Job>> submit_decode_layers(
      int num_layers, const std::vector<uintptr_t>& staging, uintptr_t kv_cache,
      size_t layer_bytes, size_t v_offset_bytes, uintptr_t kv_scales, size_t scales_layer_bytes,
      size_t scales_v_offset_bytes, uintptr_t block_tables, uintptr_t seq_lens,
      uintptr_t slot_mapping, const std::vector<int64_t>& sizes, int dtype_code,
      int kv_dtype_code, float scale, uintptr_t flags, int64_t value) {
    if (staging.size() != 10) throw std::invalid_argument("staging must hold 10 addresses");
    std::vector<std::shared_ptr<Job>> jobs;
    jobs.reserve(num_layers);
    int64_t* flag = pointer<int64_t>(flags);
    for (int layer = 0; layer < num_layers; ++layer) {
      const uintptr_t* parity = staging.data() + (layer % 2) * 5;
      const uintptr_t k_cache = kv_cache + layer * layer_bytes;
      const uintptr_t k_scales = kv_scales != 0 ? kv_scales + layer * scales_layer_bytes : 0;
      const uintptr_t v_scales = kv_scales != 0 ? k_scales + scales_v_offset_bytes : 0;
      jobs.push_back(make_decode_job(parity[0], k_cache, k_cache + v_offset_bytes,
                                     block_tables, seq_lens, parity[3], parity[4], parity[1],
                                     parity[2], slot_mapping, sizes, dtype_code, kv_dtype_code,
                                     k_scales, v_scales, scale,
                                     reinterpret_cast<uintptr_t>(flag + layer), value,
                                     reinterpret_cast<uintptr_t>(flag + num_layers + layer),
                                     value));
    }
    pool_.submit_all(jobs);
    return jobs;
  }

  void close() { pool_.close(); }

 private:
  std::shared_ptr<Job> make_decode_job(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
                                       uintptr_t block_tables, uintptr_t seq_lens,
                                       uintptr_t out, uintptr_t lse, uintptr_t new_k,
                                       uintptr_t new_v, uintptr_t slot_mapping,
                                       const std::vector<int64_t>& sizes, int dtype_code,
                                       int kv_dtype_code, uintptr_t k_scales,
                                       uintptr_t v_scales, float scale, uintptr_t ready_flag,
                                       int64_t ready_value, uintptr_t done_flag,
                                       int64_t done_value) {
    if (sizes.size() != 9) throw std::invalid_argument("sizes must hold 9 integers");
    DecodeProblem problem;
    problem.q = pointer<const void>(q);
    problem.k_cache = pointer<void>(k_cache);
    problem.v_cache = pointer<void>(v_cache);
    problem.k_scales = pointer<float>(k_scales);
    problem.v_scales = pointer<float>(v_scales);
    problem.block_tables = pointer<const int32_t>(block_tables);
    problem.seq_lens = pointer<const int32_t>(seq_lens);
    problem.out = pointer<void>(out);
    problem.lse = pointer<float>(lse);
    problem.new_k = pointer<const void>(new_k);
    problem.new_v = pointer<const void>(new_v);
    problem.slot_mapping = pointer<const int64_t>(slot_mapping);
    problem.num_seqs = int(sizes[0]);
    problem.num_heads = int(sizes[1]);
    problem.num_kv_heads = int(sizes[2]);
    problem.head_dim = int(sizes[3]);
    problem.block_size = int(sizes[4]);
    problem.num_blocks = int(sizes[5]);
    problem.max_blocks_per_seq = int(sizes[6]);
    problem.q_row_stride = sizes[7];
    problem.new_kv_row_stride = sizes[8];
    problem.dtype = dtype_from_code(dtype_code);
    problem.kv_dtype = dtype_from_code(kv_dtype_code);
    problem.scale = scale;
    FlagGate gate{pointer<const int64_t>(ready_flag), ready_value, pointer<int64_t>(done_flag),
                  done_value};
    return std::make_shared<DecodeJob>(problem, ops_[kv_dtype_code], pool_.num_threads(), gate);
  }

  ThreadPool pool_;
  const KernelOps* ops_[4];  // per KV dtype code
};

// cuda: the addresses of cudaMemcpyAsync, cudaMemcpy2DAsync, cudaLaunchHostFunc,
// cuStreamWaitValue64 and cuStreamWriteValue64 (the last two 0 without stream memory
// operations), in that order (empty without CUDA); wait: a LayerWait code. staging:
// qkv and out of the even parity, then of the odd one.
std::unique_ptr<LayerHandoff> make_handoff(int num_layers, int max_rows, size_t qkv_row_bytes,
                                           size_t out_row_bytes,
                                           const std::vector<uintptr_t>& staging,
                                           uintptr_t flags, uintptr_t seq_on_device,
                                           uint64_t flags_on_device,
                                           const std::vector<uintptr_t>& cuda, int wait,
                                           double timeout_s) {
  if (staging.size() != 4) throw std::invalid_argument("staging must hold 4 addresses");
  if (!cuda.empty() && cuda.size() != 5)
    throw std::invalid_argument("cuda must hold 5 function addresses");
  if (wait < int(LayerWait::kEngineThread) || wait > int(LayerWait::kStreamWait))
    throw std::invalid_argument("unknown layer wait " + std::to_string(wait));
  CudaRuntime runtime;
  if (!cuda.empty()) {
    runtime.memcpy_async = reinterpret_cast<CudaRuntime::MemcpyAsync>(cuda[0]);
    runtime.memcpy2d_async = reinterpret_cast<CudaRuntime::Memcpy2DAsync>(cuda[1]);
    runtime.launch_host_func = reinterpret_cast<CudaRuntime::LaunchHostFunc>(cuda[2]);
    runtime.stream_wait_value64 = reinterpret_cast<CudaRuntime::StreamValue64>(cuda[3]);
    runtime.stream_write_value64 = reinterpret_cast<CudaRuntime::StreamValue64>(cuda[4]);
  }
  auto buffers = [&](int first) {
    return StagingBuffers{pointer<void>(staging[first]), pointer<void>(staging[first + 1])};
  };
  return std::make_unique<LayerHandoff>(num_layers, max_rows, qkv_row_bytes, out_row_bytes,
                                        buffers(0), buffers(2), pointer<int64_t>(flags),
                                        pointer<const int64_t>(seq_on_device),
                                        flags_on_device, runtime, LayerWait(wait),
                                        timeout_s);
}

}  // namespace
}  // namespace apex

PYBIND11_MODULE(_cpu_attention, module) {
  using apex::PoolBinding;
  module.doc() = "Native paged decode attention over a host KV cache, with its own thread pool";

  py::class_<apex::Job, std::shared_ptr<apex::Job>>(module, "Job")
      .def("wait", &apex::Job::wait, py::call_guard<py::gil_scoped_release>(),
           py::arg("timeout_s") = -1.0,
           "Block until the job finishes (False if timeout_s >= 0 passes first); raise "
           "RuntimeError with the first task error")
      .def("done", &apex::Job::is_done);

  py::class_<PoolBinding>(module, "Pool")
      .def(py::init<int, std::vector<int>, const std::string&>(), py::arg("num_threads"),
           py::arg("pin_cores"), py::arg("isa"))
      .def_property_readonly("num_threads", &PoolBinding::num_threads)
      .def("isa", &PoolBinding::isa, py::arg("dtype_code"))
      .def("submit_decode", &PoolBinding::submit_decode)
      .def("submit_decode_layers", &PoolBinding::submit_decode_layers)
      .def("close", &PoolBinding::close, py::call_guard<py::gil_scoped_release>());

  // Every method releases the GIL: the engine thread may wait here while Python runs.
  py::class_<apex::LayerHandoff>(module, "LayerHandoff")
      .def(py::init(&apex::make_handoff), py::arg("num_layers"), py::arg("max_rows"),
           py::arg("qkv_row_bytes"), py::arg("out_row_bytes"), py::arg("staging"),
           py::arg("flags"), py::arg("seq_on_device"), py::arg("flags_on_device"),
           py::arg("cuda"), py::arg("wait"),
           py::arg("timeout_s"))
      .def("begin_step",
           [](apex::LayerHandoff& self, int64_t seq, int num_rows, uintptr_t stream) {
             self.begin_step(seq, num_rows, apex::pointer<void>(stream));
           },
           py::call_guard<py::gil_scoped_release>())
      .def("begin_capture",
           [](apex::LayerHandoff& self, int num_rows, uintptr_t stream) {
             self.begin_capture(num_rows, apex::pointer<void>(stream));
           },
           py::call_guard<py::gil_scoped_release>())
      .def("end_capture", &apex::LayerHandoff::end_capture)
      .def("stage",
           [](apex::LayerHandoff& self, int layer, uintptr_t qkv, size_t qkv_stride,
              int row_start) {
             self.stage(layer, apex::pointer<const char>(qkv), qkv_stride, row_start);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("fetch",
           [](apex::LayerHandoff& self, int layer, uintptr_t dst, size_t dst_stride) {
             self.fetch(layer, apex::pointer<char>(dst), dst_stride);
           },
           py::call_guard<py::gil_scoped_release>());

  module.def(
      "wait_flag",
      [](uintptr_t flag, int64_t value, double timeout_s) {
        return apex::wait_flag(apex::pointer<const int64_t>(flag), value, timeout_s);
      },
      py::arg("flag"), py::arg("value"), py::arg("timeout_s"),
      py::call_guard<py::gil_scoped_release>());
  module.def(
      "host_func_wait_address",
      [] { return reinterpret_cast<uintptr_t>(&apex::host_func_wait); },
      "Address of a cudaHostFn_t that waits until *record[0] >= record[1] (record: 2 int64)");
  module.def(
      "set_flag",
      [](uintptr_t flag, int64_t value) { apex::set_flag(apex::pointer<int64_t>(flag), value); },
      py::arg("flag"), py::arg("value"));
  module.def(
      "append_kv",
      [](uintptr_t k_cache, uintptr_t v_cache, uintptr_t k_scales, uintptr_t v_scales,
         uintptr_t slot_mapping, uintptr_t k, uintptr_t v, int num_tokens, int num_kv_heads,
         int head_dim, int block_size, int num_blocks, int dtype_code, int kv_dtype_code) {
        apex::append_kv(apex::pointer<void>(k_cache), apex::pointer<void>(v_cache),
                        apex::pointer<float>(k_scales), apex::pointer<float>(v_scales),
                        apex::pointer<const int64_t>(slot_mapping), apex::pointer<const void>(k),
                        apex::pointer<const void>(v), num_tokens, num_kv_heads, head_dim,
                        block_size, num_blocks, apex::dtype_from_code(dtype_code),
                        apex::dtype_from_code(kv_dtype_code));
      },
      py::call_guard<py::gil_scoped_release>());
  module.def(
      "best_isa",
      [](int dtype_code) {
        return std::string(apex::select_kernel_ops(apex::dtype_from_code(dtype_code))->name);
      },
      py::arg("dtype_code"));
}
