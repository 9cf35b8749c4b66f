"""GPU_ONLY: every row attends on the device; the model's own layer loop runs the step."""

from __future__ import annotations

import torch

from apex_grpc.runner.executors.common import StepExecutor
from apex_grpc.runner.input_batch import InputBatch


class GpuOnlyExecutor(StepExecutor):
    def run(self, batch: InputBatch) -> torch.Tensor:
        layout = batch.layout
        if layout.host_decode is not None:
            raise ValueError("a GPU_ONLY step cannot have host-resident decode rows")
        out = self._out.rows(layout.num_tokens)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
            self.attend_on_device(layer_idx, q, k, v, layout, out)
            return out

        return self.model(batch.input_ids, batch.positions, attend)
