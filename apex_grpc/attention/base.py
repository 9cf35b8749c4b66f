"""The seams between the step executors and attention: the device side and the host side.

Each layer's pre-attention part of the model yields rotated q/k/v for every row of the step's
flat batch; the rows' roles are named by the step's BatchLayout (attention/layout.py).

- DeviceAttention attends every row the compute device handles: GPU-tier prefill and decode
  rows (storing their k/v in the GPU tier first) and host-bound prefill rows (over their own
  k/v). It never reads or writes the host tier. Implementations: TorchPagedAttention
  (reference, any device), TritonPagedAttention (CUDA), NativeCpuPagedAttention (the device is
  the CPU).
- HostSide owns the host tier's traffic within a step: host-bound prefill k/v writes, and the
  host decode rows' attention on the native CPU pool with its per-layer hand-off
  (attention/host.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from apex_grpc.attention.layout import BatchLayout


class DeviceAttention(Protocol):
    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        layout: BatchLayout,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place
    ) -> None:
        """Store the GPU-tier rows' k/v and write attention for gpu_prefill, gpu_decode and
        host_prefill rows into out; host_decode rows of out are left as they were."""
        ...


class HostSide(Protocol):
    def begin_step(self, layout: BatchLayout) -> None:
        """Prepare the step's host work: queue every layer's CPU job for host_decode rows."""
        ...

    def write_prefill(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Send the layer's host_prefill rows of k/v (all rows given) to the host tier."""
        ...

    def stage(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              row_start: int) -> None:
        """Hand the layer's host_decode rows, rows [row_start, ...) of q/k/v, to its CPU job."""
        ...

    def fetch(self, layer_idx: int, out: torch.Tensor, row_start: int) -> None:
        """The layer's CPU attention output into rows [row_start, ...) of out."""
        ...

    def end_step(self) -> None:
        """Complete the step's host work (also after a failed forward); raise a worker error."""
        ...
