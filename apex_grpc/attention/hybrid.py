"""Hybrid attention: GPU-tier rows on the device backend, host-resident decode rows on the
native CPU pool, overlapped, with no per-layer Python hand-off to the pool.

A step begins with begin_step(meta): one flag-gated CPU job per layer is queued at once (each
appends its layer's new k/v to the host cache and attends over it). Per layer, stage_host()
copies the host rows' q/k/v into preallocated pinned staging buffers and raises that layer's
ready flag behind the copy (on CUDA the flag itself is copied on the copy stream after the
data, so the native workers see the data land with no Python in between); wait_host() waits
natively (GIL released) on the layer's done flag just before the O projection, or, with
device_wait on CUDA, enqueues a host function that holds the compute stream there instead
(attention/cuda_host_func.py), so the engine thread never waits inside a step. end_step()
collects the jobs and surfaces any worker error. ASYNC_OVERLAP calls these from forward();
the NEO pipeline (runner/model_runner.py) drives stage/wait with a skewed layer schedule.

Buffers alternate by layer parity: a job for layer l+2 cannot start before stage_host(l+2),
which comes after layer l's output was consumed.
"""

from __future__ import annotations

import dataclasses

import torch

from apex_grpc.attention.base import AttentionBackend, AttentionMetadata, PagedSeqBatch
from apex_grpc.attention.cpu_kernel import CpuAttentionPool, JobHandle, set_flag, wait_flag
from apex_grpc.attention.cuda_host_func import HostFuncWaiter
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
        # Per layer: [0] ready (staged) and [1] done; values are step sequence numbers.
        self._flags = pinned_empty((2, self.num_layers, 1), torch.int64, device)
        self._flags.zero_()
        # Shared with the KV moves: a layer's ready flag lands after this step's evictions.
        self._copy_stream = copy_stream
        if device.type == "cuda":
            self._out_device = torch.empty((max_host_rows, num_heads, head_dim), dtype=dtype,
                                           device=device)
            self._seq_device = torch.zeros(1, dtype=torch.int64, device=device)
        # On CUDA with device_wait, the compute stream (not the engine thread) waits per layer.
        self._host_func = HostFuncWaiter(self._flags[1]) \
            if device_wait and device.type == "cuda" else None
        self._step_seq = 0
        self._jobs: list[JobHandle] = []
        self._num_rows = 0
        # This step's staging views per parity, (q, k, v, out): sliced once per step.
        self._views: list[tuple[torch.Tensor, ...]] = []

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
        self._views = [(self._q[p, :n], self._k[p, :n], self._v[p, :n], self._out[p, :n])
                       for p in range(2)]
        if self.device.type == "cuda":
            self._seq_device.fill_(seq)  # copied into ready flags behind each layer's data
        if self._host_func is not None:
            self._host_func.begin_step(seq)
        for layer in range(self.num_layers):
            q_stage, k_stage, v_stage, out_stage = self._views[layer % 2]
            self._jobs.append(self.pool.submit_decode(
                q_stage, self.host_kv[layer, 0], self.host_kv[layer, 1],
                host.block_tables, host.seq_lens_tensor, out_stage, self._lse[layer % 2, :n],
                scale=self.scale, new_k=k_stage, new_v=v_stage,
                slot_mapping=host.slot_mapping, ready_flag=self._flags[0, layer],
                ready_value=seq, done_flag=self._flags[1, layer], done_value=seq,
                check_values=layer == 0))  # the metadata is the same for every layer

    def end_step(self) -> None:
        """Collect this step's jobs. After a failure mid-forward, release the jobs that never
        got their data so no worker waits forever; wait for every job, then raise the first
        worker error."""
        jobs, self._jobs = self._jobs, []
        if not jobs:
            return
        unstaged = [layer for layer in range(len(jobs))
                    if int(self._flags[0, layer]) < self._step_seq]
        if unstaged and self.device.type == "cuda":
            self._copy_stream.cuda_stream.synchronize()  # no copy may land after release
        for layer in unstaged:
            set_flag(self._flags[0, layer], self._step_seq)
        errors = []
        for job in jobs:
            try:
                self.pool.wait(job)
            except RuntimeError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- per layer ----------------------------------------------------------------------------
    def stage_host(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> None:
        """Hand host rows' q/k/v ([n, heads, head_dim] on the device) to the layer's job."""
        q_stage, k_stage, v_stage, _ = self._views[layer_idx % 2]
        ready = self._flags[0, layer_idx]
        if self.device.type == "cuda":
            self._copy_stream.wait_current()
            with self._copy_stream.use():
                q_stage.copy_(q, non_blocking=True)
                k_stage.copy_(k, non_blocking=True)
                v_stage.copy_(v, non_blocking=True)
                ready.copy_(self._seq_device, non_blocking=True)  # lands after the data
            for tensor in (q, k, v):  # the caller may drop them before the copy has read them
                tensor.record_stream(self._copy_stream.cuda_stream)
        else:
            q_stage.copy_(q)
            k_stage.copy_(k)
            v_stage.copy_(v)
            set_flag(ready, self._step_seq)

    def wait_host(self, layer_idx: int) -> torch.Tensor:
        """The layer's CPU attention output ([n, heads, head_dim]) on the compute device. It
        aliases a buffer that the next layers reuse (on the CPU a staging buffer valid until
        stage_host(layer_idx + 2), on CUDA one device buffer): consume it before moving on."""
        out = self._views[layer_idx % 2][3]
        if self._host_func is not None:  # the stream waits; the upload is queued behind it
            self._host_func.enqueue(layer_idx, self._step_seq, torch.cuda.current_stream())
        elif not wait_flag(self._flags[1, layer_idx], self._step_seq, _HOST_JOB_TIMEOUT_S):
            raise RuntimeError(f"CPU attention for layer {layer_idx} did not finish within "
                               f"{_HOST_JOB_TIMEOUT_S:.0f} s")
        if self.device.type != "cuda":
            return out
        dst = self._out_device[:self._num_rows]
        dst.copy_(out, non_blocking=True)
        return dst

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """ASYNC_OVERLAP: host rows start on the CPU, GPU rows attend meanwhile, and the two
        meet before the O projection. begin_step(meta.host_decode) must have run."""
        host = meta.host_decode
        if host is None:
            return self.gpu_backend.forward(layer_idx, q, k, v, meta)
        rows = slice(host.row_start, host.row_end)
        self.stage_host(layer_idx, q[rows], k[rows], v[rows])
        out = torch.empty_like(q)
        if host.row_start > 0:
            gpu_meta = dataclasses.replace(meta, num_tokens=host.row_start, host_decode=None)
            head = slice(0, host.row_start)
            out[head] = self.gpu_backend.forward(layer_idx, q[head], k[head], v[head], gpu_meta)
        out[rows] = self.wait_host(layer_idx)
        return out
