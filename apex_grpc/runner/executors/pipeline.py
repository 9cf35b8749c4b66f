"""ASYMMETRIC_PIPELINE (NEO): two sub-batches with a skewed layer schedule. Sub-batch A is the
rows the device attends, B the host decode rows: while the CPU attends B at layer i, the device
runs A's layer i; then B finishes layer i and starts layer i + 1."""

from __future__ import annotations

import torch

from apex_grpc.runner.executors.common import StepExecutor
from apex_grpc.runner.input_batch import InputBatch


class AsymmetricPipelineExecutor(StepExecutor):
    def run(self, batch: InputBatch) -> torch.Tensor:
        model, host = self.model, self.host
        layout = batch.layout
        split = layout.host_decode.row_start
        layout_a = layout.device_part()
        out = self._out.rows(layout.num_tokens)  # A's rows [0, split), B's [split, ...)
        out_a, out_b = out[:split], out[split:]
        rope = model.rope(batch.positions)
        rope_a, rope_b = rope.rows(slice(0, split)), rope.rows(slice(split, None))
        hidden_a, residual_a = model.embed(batch.input_ids[:split]), None
        hidden_b, residual_b = model.embed(batch.input_ids[split:]), None

        layers = model.layers
        q, k, v, residual_b = layers[0].pre_attention(hidden_b, residual_b, rope_b)
        host.stage(0, q, k, v, 0)
        for i, layer in enumerate(layers):
            if split > 0:  # device work for A at layer i overlaps B's CPU attention at layer i
                q, k, v, residual_a = layer.pre_attention(hidden_a, residual_a, rope_a)
                self.attend_on_device(i, q, k, v, layout_a, out_a)
                hidden_a, residual_a = layer.post_attention(out_a, residual_a)
            host.fetch(i, out, split)
            hidden_b, residual_b = layer.post_attention(out_b, residual_b)
            if i + 1 < len(layers):
                q, k, v, residual_b = layers[i + 1].pre_attention(hidden_b, residual_b, rope_b)
                host.stage(i + 1, q, k, v, 0)
        final_b = model.final_norm(hidden_b, residual_b)
        if split == 0:
            return final_b
        return torch.cat([model.final_norm(hidden_a, residual_a), final_b])
