"""Hybrid attention: GPU-tier rows on the GPU backend, host-resident decode rows on the native
CPU pool, overlapped.

Per layer (ASYNC_OVERLAP): the host rows' q/k/v go to preallocated staging buffers, a CPU job
appends the new k/v to the host cache and attends over it while the GPU backend handles the
other rows; the result comes back just before the O projection. The NEO pipeline drives the same
submit_host / wait_host pair with a skewed layer schedule (runner/model_runner.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from apex_grpc.attention.base import AttentionBackend, AttentionMetadata, PagedSeqBatch
from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.platform import Event, Stream, pinned_empty


@dataclass
class HostJob:
    handle: object  # the pool's job handle
    out: torch.Tensor  # [num_host_rows, num_heads, head_dim] host staging slice


class HybridAttention:
    def __init__(self, gpu_backend: AttentionBackend, host_kv: torch.Tensor,
                 pool: CpuAttentionPool, scale: float, max_host_rows: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.gpu_backend = gpu_backend
        self.host_kv = host_kv  # [layers, 2, blocks, kv_heads, block_size, head_dim]
        self.pool = pool
        self.scale = scale
        self.device = device
        dtype = host_kv.dtype
        # Staging sized once (max_num_seqs rows); nothing is allocated per layer.
        self._q = pinned_empty((max_host_rows, num_heads, head_dim), dtype, device)
        self._k = pinned_empty((max_host_rows, num_kv_heads, head_dim), dtype, device)
        self._v = pinned_empty((max_host_rows, num_kv_heads, head_dim), dtype, device)
        # Two output buffers, alternated per job: the device may still be reading the previous
        # job's output (asynchronous upload) while the next job writes its own.
        self._outs = [pinned_empty((max_host_rows, num_heads, head_dim), dtype, device)
                      for _ in range(2)]
        self._num_jobs = 0
        self._lse = torch.empty((max_host_rows, num_heads), dtype=torch.float32)
        self._copy_stream = Stream(device)
        self._copied = Event(device)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        host = meta.host_decode
        if host is None:
            return self.gpu_backend.forward(layer_idx, q, k, v, meta)
        rows = slice(host.row_start, host.row_end)
        job = self.submit_host(layer_idx, q[rows], k[rows], v[rows], host)
        out = torch.empty_like(q)
        if host.row_start > 0:
            gpu_meta = dataclasses.replace(meta, num_tokens=host.row_start, host_decode=None)
            head = slice(0, host.row_start)
            out[head] = self.gpu_backend.forward(layer_idx, q[head], k[head], v[head], gpu_meta)
        out[rows] = self.wait_host(job)
        return out

    def submit_host(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    host: PagedSeqBatch) -> HostJob:
        """Start CPU attention for host rows q/k/v ([n, heads, head_dim], on the device)."""
        n = q.shape[0]
        if n > self._q.shape[0]:
            raise ValueError(f"{n} host rows exceed the staging capacity {self._q.shape[0]}")
        q_h, k_h, v_h = self._q[:n], self._k[:n], self._v[:n]
        if self.device.type == "cuda":
            self._copy_stream.wait_current()
            with self._copy_stream.use():
                q_h.copy_(q, non_blocking=True)
                k_h.copy_(k, non_blocking=True)
                v_h.copy_(v, non_blocking=True)
            self._copied.record(self._copy_stream)
            self._copied.synchronize()
        else:
            q_h.copy_(q)
            k_h.copy_(k)
            v_h.copy_(v)
        out = self._outs[self._num_jobs % 2][:n]
        self._num_jobs += 1
        handle = self.pool.submit_decode(
            q_h, self.host_kv[layer_idx, 0], self.host_kv[layer_idx, 1], host.block_tables,
            host.seq_lens_tensor, out, self._lse[:n], scale=self.scale, new_k=k_h, new_v=v_h,
            slot_mapping=host.slot_mapping)
        return HostJob(handle, out)

    def wait_host(self, job: HostJob) -> torch.Tensor:
        """The job's output on the compute device; on the CPU it aliases a staging buffer that
        stays valid until the job after next."""
        self.pool.wait(job.handle)
        return job.out.to(self.device, non_blocking=True)
