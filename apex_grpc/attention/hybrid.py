"""Hybrid attention: GPU-tier rows on the device backend, host-resident decode rows on the
native CPU pool, overlapped, with no per-layer Python hand-off to the pool.

A step begins with begin_step(meta): one flag-gated CPU job per layer is queued at once (each
appends its layer's new k/v to the host cache and attends over it). Per layer, one native call
(stage_host) copies the host rows' q/k/v into preallocated pinned staging buffers and raises the
layer's ready flag behind them: on CUDA the copy and the flag (a stream memory write, or where
the device lacks those, a copy of the step's sequence number from device memory) are enqueued
on the compute stream, so the pool's watcher sees the data land with no Python in between. A
second native call (wait_host) brings the layer's output back just before the O projection.
On CUDA the wait is chosen by `layer_wait` (--cuda-layer-wait, config.py): "stream-wait" (the
compute stream itself waits on the pinned done flag), "host-func" (a CUDA host function holds
the stream) or "engine-thread" (the engine thread waits natively, GIL released); the first two
let the engine thread enqueue the whole step without waiting. The hand-off itself is
kernels/cpu_attention/handoff.cpp. end_step() collects the jobs and surfaces any worker error.
ASYNC_OVERLAP calls these from forward(); the NEO pipeline (runner/model_runner.py) drives
stage/wait with a skewed layer schedule.

Buffers alternate by layer parity: a job for layer l+2 cannot start before stage_host(l+2),
which the compute stream orders after layer l's output was consumed.
"""

from __future__ import annotations

import dataclasses

import torch

from apex_grpc import _cpu_attention
from apex_grpc.attention.base import AttentionBackend, AttentionMetadata, PagedSeqBatch
from apex_grpc.attention.cpu_kernel import (CpuAttentionPool, DecodeLayers, JobHandle,
                                            LayerStaging, set_flag)
from apex_grpc.attention.cuda_runtime import (cuda_runtime_addresses, device_address_of_host,
                                              stream_memory_ops_supported)
from apex_grpc.config import CUDA_LAYER_WAITS
from apex_grpc.platform import pinned_empty

# A host job this late means a hung worker: fail the step (INTERNAL) rather than the server.
_HOST_JOB_TIMEOUT_S = 60.0

# --cuda-layer-wait (after "auto" is resolved) -> the native LayerWait code
# (kernels/cpu_attention/handoff.h).
_LAYER_WAIT_CODES = {"engine-thread": 0, "host-func": 1, "stream-wait": 2}
assert set(_LAYER_WAIT_CODES) | {"auto"} == set(CUDA_LAYER_WAITS)


@dataclasses.dataclass(frozen=True, slots=True)
class _OverlapStep:
    meta: AttentionMetadata
    gpu_meta: AttentionMetadata  # meta without the host rows, for the device backend
    out: torch.Tensor  # [rows, num_heads, head_dim]: every layer's attention output
    host_rows_at: int  # address of out's first host row
    row_bytes: int


class HybridAttention:
    def __init__(self, gpu_backend: AttentionBackend, host_kv: torch.Tensor,
                 pool: CpuAttentionPool, scale: float, max_host_rows: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, device: torch.device,
                 layer_wait: str = CUDA_LAYER_WAITS[0],
                 host_scales: torch.Tensor | None = None) -> None:
        self.gpu_backend = gpu_backend
        self.host_kv = host_kv  # [layers, 2, blocks, kv_heads, block_size, head_dim]
        self.host_scales = host_scales  # an int8 host tier's scales (kv_cache/quantized.py)
        self.pool = pool
        self.scale = scale
        self.device = device
        self.num_layers = host_kv.shape[0]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # The rows' dtype: the model's, which an int8 host tier does not share.
        dtype = gpu_backend.gpu_kv.dtype if host_scales is not None else host_kv.dtype
        # Sized once from max_num_seqs; nothing is allocated per layer or per step. Each
        # staged row is q|k|v, as the fused projection leaves it: one copy per layer.
        self._qkv = pinned_empty((2, max_host_rows, num_heads + 2 * num_kv_heads, head_dim),
                                 dtype, device)
        self._out = pinned_empty((2, max_host_rows, num_heads, head_dim), dtype, device)
        self._lse = torch.empty((2, max_host_rows, num_heads), dtype=torch.float32)
        # The host rows' output on the compute device, for the NEO pipeline's wait_host.
        self._out_rows = torch.empty((max_host_rows, num_heads, head_dim), dtype=dtype,
                                     device=device)
        # Per layer: [0] ready (staged) and [1] done; values are step sequence numbers.
        self._flags = pinned_empty((2, self.num_layers, 1), torch.int64, device)
        self._flags.zero_()
        self._on_cuda = device.type == "cuda"
        if layer_wait not in CUDA_LAYER_WAITS:
            raise ValueError(f"layer_wait must be one of {CUDA_LAYER_WAITS}, got {layer_wait!r}")
        device_index = (device.index if device.index is not None
                        else torch.cuda.current_device()) if self._on_cuda else 0
        memory_ops = self._on_cuda and stream_memory_ops_supported(device_index)
        if layer_wait == "auto":
            layer_wait = "stream-wait" if memory_ops else "host-func"
        elif self._on_cuda and layer_wait == "stream-wait" and not memory_ops:
            raise RuntimeError(f"CUDA device {device_index} does not support 64-bit stream "
                               "memory operations: use --cuda-layer-wait host-func or "
                               "engine-thread")
        # Without CUDA there is no stream to hold: the engine thread waits.
        self.layer_wait = layer_wait if self._on_cuda else "engine-thread"
        # Without stream memory operations each ready flag is a copy of this step's sequence
        # number, kept on the device, behind the layer's rows.
        self._seq_device = torch.zeros(1, dtype=torch.int64, device=device) \
            if self._on_cuda and not memory_ops else None
        staging = [buffer[parity].data_ptr() for parity in range(2)
                   for buffer in (self._qkv, self._out)]
        element = self._qkv.element_size()
        # Where k and v start within a q|k|v row (stage_host checks its inputs against them).
        self._k_offset = num_heads * head_dim * element
        self._v_offset = self._k_offset + num_kv_heads * head_dim * element
        self._handoff = _cpu_attention.LayerHandoff(
            num_layers=self.num_layers, max_rows=max_host_rows,
            qkv_row_bytes=self._qkv[0, 0].numel() * element,
            out_row_bytes=num_heads * head_dim * element, staging=staging,
            flags=self._flags.data_ptr(),
            seq_on_device=self._seq_device.data_ptr() if self._seq_device is not None else 0,
            flags_on_device=device_address_of_host(self._flags.data_ptr()) if memory_ops else 0,
            cuda=cuda_runtime_addresses(memory_ops) if self._on_cuda else [],
            wait=_LAYER_WAIT_CODES[self.layer_wait],
            timeout_s=_HOST_JOB_TIMEOUT_S)
        self._step_seq = 0
        self._jobs: list[JobHandle] = []
        self._num_rows = 0
        # The current ASYNC_OVERLAP step's shared state and its output buffer (_overlap_step).
        self._step: _OverlapStep | None = None
        self._out_buffer: torch.Tensor | None = None
        self._num_staged = 0
        # Per host row count: the step submission over staging views sliced to it, built once.
        self._submissions: dict[int, DecodeLayers] = {}

    @property
    def max_host_rows(self) -> int:
        return self._qkv.shape[1]

    # -- per step -----------------------------------------------------------------------------
    def begin_step(self, host: PagedSeqBatch | None) -> None:
        """Queue every layer's CPU job for this step's host decode rows (if any)."""
        self._jobs = []
        self._num_rows = 0 if host is None else host.num_tokens
        if host is None:
            return
        if host.num_tokens > self.max_host_rows:
            raise ValueError(f"{host.num_tokens} host rows exceed the staging capacity "
                             f"{self.max_host_rows} (max_num_seqs)")
        self._step_seq += 1
        seq, n = self._step_seq, host.num_tokens
        stream = torch.cuda.current_stream().cuda_stream if self._on_cuda else 0
        if self._seq_device is not None:
            self._seq_device.fill_(seq)  # queued before any layer's staging
        self._handoff.begin_step(seq, n, stream)
        submission = self._submissions.get(n)
        if submission is None:
            heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
            staging = tuple(LayerStaging(*self._qkv[p, :n].split(heads, dim=1), self._out[p, :n],
                                         self._lse[p, :n]) for p in range(2))
            submission = self._submissions[n] = self.pool.prepare_decode_layers(
                staging, self.host_kv, self._flags, scale=self.scale, kv_scales=self.host_scales)
        self._num_staged = 0
        self._jobs = submission.submit(host.block_tables, host.seq_lens_tensor,
                                       host.slot_mapping, seq)

    def end_step(self) -> None:
        """Collect this step's jobs and let the device backend finish the step. After a failure
        mid-forward, release the jobs that never got their data so no worker waits forever;
        wait for every job, then raise the first worker error."""
        jobs, self._jobs = self._jobs, []
        self._step = None
        # Layers are staged in order, so the ones never staged are the tail.
        # (A released job may read a parity buffer that a staged layer's copy still writes:
        # the failed step's outputs are discarded, and the buffers outlive every job.)
        for layer in range(self._num_staged, len(jobs)):
            set_flag(self._flags[0, layer], self._step_seq)
        errors = []
        for job in jobs:
            try:
                self.pool.wait(job)
            except RuntimeError as exc:
                errors.append(exc)
        self.gpu_backend.finish_step()
        if errors:
            raise errors[0]

    # -- per layer ----------------------------------------------------------------------------
    def stage_host(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   row_start: int = 0) -> None:
        """Hand rows [row_start, row_start + host rows) of q [n, heads, head_dim] and k/v
        [n, kv_heads, head_dim] (on the compute device) to the layer's job. q, k and v must be
        views of one buffer whose rows hold q|k|v contiguously (LlamaDecoderLayer's
        pre_attention): one copy moves all three. Checked on layer 0: every layer of a step
        comes from the same projection layout."""
        q_at = q.data_ptr()
        if layer_idx == 0 and (
                k.data_ptr() != q_at + self._k_offset or v.data_ptr() != q_at + self._v_offset
                or not q.stride(0) == k.stride(0) == v.stride(0)
                or q.stride(1) != self.head_dim or q.stride(2) != 1):
            raise ValueError("host rows need q, k and v as views of one q|k|v buffer; got "
                             f"strides {q.stride()}, {k.stride()}, {v.stride()}")
        self._handoff.stage(layer_idx, q_at, q.stride(0) * q.element_size(), row_start)
        self._num_staged += 1

    def wait_host(self, layer_idx: int, out: torch.Tensor | None = None,
                  row_start: int = 0) -> torch.Tensor:
        """The layer's CPU attention output, written to rows [row_start, ...) of out (default: a
        buffer that the next layer reuses; consume it before moving on). On CUDA, unless
        layer_wait is "engine-thread", the compute stream, not this thread, waits for it."""
        if out is None:
            out = self._out_rows[:self._num_rows]
        self._handoff.fetch(layer_idx, out.data_ptr() + row_start * out.stride(0)
                            * out.element_size(), out.stride(0) * out.element_size())
        return out

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ASYNC_OVERLAP: host rows start on the CPU, GPU rows attend meanwhile, and the two
        meet before the O projection. begin_step(meta.host_decode) must have run."""
        host = meta.host_decode
        if host is None:
            return self.gpu_backend.forward(layer_idx, q, k, v, meta)
        self.stage_host(layer_idx, q, k, v, host.row_start)
        step = self._overlap_step(meta, q)
        if host.row_start > 0:
            self.gpu_backend.forward(layer_idx, q, k, v, step.gpu_meta, out=step.out)
        self._handoff.fetch(layer_idx, step.host_rows_at, step.row_bytes)
        return step.out

    def _overlap_step(self, meta: AttentionMetadata, q: torch.Tensor) -> _OverlapStep:
        """What every layer of an ASYNC_OVERLAP step shares, built on its first layer: the
        device backend's metadata (host rows left alone) and the output buffer, kept across
        steps and grown only when a step has more rows than any before. Reusing it is safe
        because each layer's O projection reads it, in stream order, before the next layer's
        (or step's) attention writes it."""
        step = self._step
        if step is None or step.meta is not meta:
            rows = q.shape[0]
            if self._out_buffer is None or self._out_buffer.shape[0] < rows:
                self._out_buffer = torch.empty((rows, self.num_heads, self.head_dim),
                                               dtype=q.dtype, device=q.device)
            out = self._out_buffer[:rows]
            row_bytes = out.stride(0) * out.element_size()
            step = self._step = _OverlapStep(
                meta, dataclasses.replace(meta, host_decode=None), out,
                out.data_ptr() + meta.host_decode.row_start * row_bytes, row_bytes)
        return step
