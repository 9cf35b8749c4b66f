"""What every step executor shares: the StepExecutor base (model, both attention sides, the
attention output buffer) and the device-side attention of one layer (with the host-bound
prefills' KV writes)."""

from __future__ import annotations

import torch

from apex_grpc.attention.base import DeviceAttention, HostSide
from apex_grpc.attention.layout import BatchLayout
from apex_grpc.model.llama import LlamaForCausalLM
from apex_grpc.runner.input_batch import InputBatch


class AttentionOutput:
    """One attention output buffer shared by every layer and kept across steps, grown only for
    a larger step. Reuse is safe: each layer's O projection reads it, in stream order, before
    the next layer's (or step's) attention writes it."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.shape = (model.config.num_attention_heads, model.config.head_dim)
        self.dtype, self.device = model.dtype, model.device
        self._buffer: torch.Tensor | None = None

    def rows(self, num_rows: int) -> torch.Tensor:
        """[num_rows, num_heads, head_dim]."""
        if self._buffer is None or self._buffer.shape[0] < num_rows:
            self._buffer = torch.empty((num_rows, *self.shape), dtype=self.dtype,
                                       device=self.device)
        return self._buffer[:num_rows]


class StepExecutor:
    """Runs one strategy's forward pass; subclasses own the layer loop (run)."""

    def __init__(self, model: LlamaForCausalLM, device_attention: DeviceAttention,
                 host: HostSide) -> None:
        self.model = model
        self.device_attention = device_attention
        self.host = host
        self._out = AttentionOutput(model)

    def reserve_rows(self, num_rows: int) -> None:
        """Size the attention output buffer for steps of up to num_rows rows now (a CUDA
        graph capture must not allocate it)."""
        self._out.rows(num_rows)

    def run(self, batch: InputBatch) -> torch.Tensor:
        """The batch's forward pass -> final hidden states [num_tokens, hidden_size]. The
        host side's begin_step(batch.layout) has run; the caller runs end_step."""
        raise NotImplementedError

    def attend_on_device(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, layout: BatchLayout, out: torch.Tensor) -> None:
        """Every row the device attends (all but host_decode) into out; host-bound
        prefills' k/v go to the host tier."""
        self.device_attention.forward(layer_idx, q, k, v, layout, out)
        if layout.host_prefill is not None:
            self.host.write_prefill(layer_idx, k, v)
