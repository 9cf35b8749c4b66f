"""Hybrid attention: GPU-tier rows on the device backend, host-resident decode rows on the
native CPU pool, overlapped, with no per-layer Python hand-off to the pool.

A step begins with begin_step(meta): one flag-gated CPU job per layer is queued at once (each
appends its layer's new k/v to the host cache and attends over it). Per layer, one native call
(stage_host) copies the host rows' q/k/v into preallocated pinned staging buffers and raises the
layer's ready flag behind them: on CUDA the copies run on the copy stream after an event of the
compute stream and the flag is copied from device memory behind the data, so the pool's watcher
sees the data land with no Python in between. A second native call (wait_host) brings the
layer's output back just before the O projection: the engine thread waits natively (GIL
released) on the layer's done flag, or, with device_wait on CUDA, a CUDA host function holds
the compute stream there instead, so the engine thread enqueues the whole step without waiting.
The hand-off itself is kernels/cpu_attention/handoff.cpp. end_step() collects the jobs and
surfaces any worker error. ASYNC_OVERLAP calls these from forward(); the NEO pipeline
(runner/model_runner.py) drives stage/wait with a skewed layer schedule.

Buffers alternate by layer parity: a job for layer l+2 cannot start before stage_host(l+2),
which the compute stream orders after layer l's output was consumed.
"""

from __future__ import annotations

import dataclasses

import torch

from apex_grpc import _cpu_attention
from apex_grpc.attention.base import AttentionBackend, AttentionMetadata, PagedSeqBatch
from apex_grpc.attention.cpu_kernel import (CpuAttentionPool, JobHandle, LayerStaging,
                                            set_flag)
from apex_grpc.attention.cuda_runtime import cuda_runtime_addresses
from apex_grpc.platform import Stream, pinned_empty

# A host job this late means a hung worker: fail the step (INTERNAL) rather than the server.
_HOST_JOB_TIMEOUT_S = 60.0


class HybridAttention:
    def __init__(self, gpu_backend: AttentionBackend, host_kv: torch.Tensor,
                 pool: CpuAttentionPool, scale: float, max_host_rows: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, device: torch.device,
                 copy_stream: Stream, device_wait: bool = False) -> None:
        self.gpu_backend = gpu_backend
        self.host_kv = host_kv  # [layers, 2, blocks, kv_heads, block_size, head_dim]
        self.pool = pool
        self.scale = scale
        self.device = device
        self.num_layers = host_kv.shape[0]
        dtype = host_kv.dtype
        # Sized once from max_num_seqs; nothing is allocated per layer or per step.
        self._q = pinned_empty((2, max_host_rows, num_heads, head_dim), dtype, device)
        self._k = pinned_empty((2, max_host_rows, num_kv_heads, head_dim), dtype, device)
        self._v = pinned_empty((2, max_host_rows, num_kv_heads, head_dim), dtype, device)
        self._out = pinned_empty((2, max_host_rows, num_heads, head_dim), dtype, device)
        self._lse = torch.empty((2, max_host_rows, num_heads), dtype=torch.float32)
        # The host rows' output on the compute device, for the NEO pipeline's wait_host.
        self._out_rows = torch.empty((max_host_rows, num_heads, head_dim), dtype=dtype,
                                     device=device)
        # Per layer: [0] ready (staged) and [1] done; values are step sequence numbers.
        self._flags = pinned_empty((2, self.num_layers, 1), torch.int64, device)
        self._flags.zero_()
        self._copy_stream = copy_stream
        self._on_cuda = device.type == "cuda"
        # This step's sequence number on the device: copied into each ready flag behind the data.
        self._seq_device = torch.zeros(1, dtype=torch.int64, device=device) \
            if self._on_cuda else None
        staging = [buffer[parity].data_ptr() for parity in range(2)
                   for buffer in (self._q, self._k, self._v, self._out)]
        element = self._q.element_size()
        self._handoff = _cpu_attention.LayerHandoff(
            num_layers=self.num_layers, max_rows=max_host_rows,
            q_row_bytes=num_heads * head_dim * element,
            kv_row_bytes=num_kv_heads * head_dim * element, staging=staging,
            flags=self._flags.data_ptr(),
            seq_on_device=self._seq_device.data_ptr() if self._on_cuda else 0,
            copy_stream=copy_stream.cuda_stream.cuda_stream if self._on_cuda else 0,
            cuda=cuda_runtime_addresses() if self._on_cuda else [],
            # The device-side wait needs a CUDA stream to hold; on a CPU it has none.
            wait_on_device=device_wait and self._on_cuda, timeout_s=_HOST_JOB_TIMEOUT_S)
        self._step_seq = 0
        self._jobs: list[JobHandle] = []
        self._num_rows = 0
        # This step's GPU-only view of the metadata, and the device tensors the copy stream
        # reads: held until end_step, when every staging copy has landed.
        self._gpu_meta: tuple[AttentionMetadata, AttentionMetadata] | None = None
        self._staged: list[torch.Tensor] = []
        self._num_staged = 0
        # Per host row count: the staging views of both parities, sliced once.
        self._staging_views: dict[int, tuple[LayerStaging, LayerStaging]] = {}

    @property
    def max_host_rows(self) -> int:
        return self._q.shape[1]

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
        stream = 0
        if self._on_cuda:
            self._seq_device.fill_(seq)  # queued before any layer's staging
            stream = torch.cuda.current_stream().cuda_stream
        self._handoff.begin_step(seq, n, stream)
        staging = self._staging_views.get(n)
        if staging is None:
            staging = self._staging_views[n] = tuple(
                LayerStaging(self._q[p, :n], self._k[p, :n], self._v[p, :n], self._out[p, :n],
                             self._lse[p, :n]) for p in range(2))
        self._num_staged = 0
        self._jobs = self.pool.submit_decode_layers(
            staging, self.host_kv, host.block_tables, host.seq_lens_tensor, host.slot_mapping,
            self._flags, seq, scale=self.scale)

    def end_step(self) -> None:
        """Collect this step's jobs. After a failure mid-forward, release the jobs that never
        got their data so no worker waits forever; wait for every job, then raise the first
        worker error."""
        jobs, self._jobs = self._jobs, []
        if not jobs:
            return
        # Layers are staged in order, so the ones never staged are the tail.
        unstaged = range(self._num_staged, len(jobs))
        if unstaged and self._on_cuda:
            self._copy_stream.cuda_stream.synchronize()  # no copy may land after release
        for layer in unstaged:
            set_flag(self._flags[0, layer], self._step_seq)
        errors = []
        for job in jobs:
            try:
                self.pool.wait(job)
            except RuntimeError as exc:
                errors.append(exc)
        # Every job has run, so every ready flag, and the staging copies ahead of it on the
        # copy stream, has landed: the copied tensors may go back to the allocator.
        self._staged.clear()
        if errors:
            raise errors[0]

    # -- per layer ----------------------------------------------------------------------------
    def stage_host(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   row_start: int = 0) -> None:
        """Hand rows [row_start, row_start + host rows) of q [n, heads, head_dim] and k/v
        [n, kv_heads, head_dim] (on the compute device; each row's heads contiguous) to the
        layer's job."""
        if layer_idx == 0:  # every layer's rows have the same layout
            for tensor in (q, k, v):
                if tensor.stride(2) != 1 or tensor.stride(1) != tensor.shape[2]:
                    raise ValueError(f"host rows need contiguous heads; got strides "
                                     f"{tuple(tensor.stride())}")
        element = q.element_size()
        self._handoff.stage(layer_idx, q.data_ptr(), q.stride(0) * element, k.data_ptr(),
                            k.stride(0) * element, v.data_ptr(), v.stride(0) * element,
                            row_start)
        self._num_staged += 1
        if self._on_cuda:
            self._staged += (q, k, v)

    def wait_host(self, layer_idx: int, out: torch.Tensor | None = None,
                  row_start: int = 0) -> torch.Tensor:
        """The layer's CPU attention output, written to rows [row_start, ...) of out (default: a
        buffer that the next layer reuses; consume it before moving on). On CUDA with
        device_wait the compute stream, not this thread, waits for it."""
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
        out = torch.empty_like(q)
        if host.row_start > 0:
            self.gpu_backend.forward(layer_idx, q, k, v, self._without_host_rows(meta), out=out)
        self.wait_host(layer_idx, out, host.row_start)
        return out

    def _without_host_rows(self, meta: AttentionMetadata) -> AttentionMetadata:
        """The step's metadata for the device backend (host rows left alone), built once."""
        if self._gpu_meta is None or self._gpu_meta[0] is not meta:
            self._gpu_meta = (meta, dataclasses.replace(meta, host_decode=None))
        return self._gpu_meta[1]
