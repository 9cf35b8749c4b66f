"""GPU_ONLY: every row attends on the device; the model's own layer loop runs the step."""

from __future__ import annotations

import torch

from apex_grpc.attention.base import DeviceAttention, HostSide
from apex_grpc.model.llama import LlamaForCausalLM
from apex_grpc.runner.executors.common import AttentionOutput, attend_on_device
from apex_grpc.runner.input_batch import InputBatch


class GpuOnlyExecutor:
    def __init__(self, model: LlamaForCausalLM, device_attention: DeviceAttention,
                 host: HostSide) -> None:
        self.model = model
        self.device_attention = device_attention
        self.host = host
        self._out = AttentionOutput(model)

    def run(self, batch: InputBatch) -> torch.Tensor:
        layout = batch.layout
        if layout.host_decode is not None:
            raise ValueError("a GPU_ONLY step cannot have host-resident decode rows")
        out = self._out.rows(layout.num_tokens)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
            attend_on_device(self.device_attention, self.host, layer_idx, q, k, v, layout, out)
            return out

        return self.model(batch.input_ids, batch.positions, attend)
