"""ASYNC_OVERLAP (APEX): one batch; per layer the host decode rows go to the CPU right after
the QKV projection, the device attends its rows meanwhile, and the two meet just before the O
projection."""

from __future__ import annotations

import torch

from apex_grpc.runner.executors.common import StepExecutor
from apex_grpc.runner.input_batch import InputBatch


class AsyncOverlapExecutor(StepExecutor):
    def run(self, batch: InputBatch) -> torch.Tensor:
        layout = batch.layout
        host_start = layout.host_decode.row_start
        out = self._out.rows(layout.num_tokens)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
            self.host.stage(layer_idx, q, k, v, host_start)
            if host_start > 0:
                self.attend_on_device(layer_idx, q, k, v, layout, out)
            self.host.fetch(layer_idx, out, host_start)
            return out

        return self.model(batch.input_ids, batch.positions, attend)
