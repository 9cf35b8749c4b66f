"""The Llama-family decoder (Llama-2/3/3.1/3.2, SmolLM2, Mistral without sliding window, Qwen2).

The model never touches the KV cache. It exposes one layer-stack API that every step executor
(runner/executors/) drives: embed(), rope(), layers[i].pre_attention() (rotated q/k/v),
layers[i].post_attention(), final_norm() and compute_logits(). forward() runs the stack in
order, calling the executor's `attend(layer_idx, q, k, v) -> out` between the two halves of
each layer; the NEO pipeline drives the halves itself in a skewed order.

Inputs are flattened over the batch: every row is one token, `positions` gives its position in
its own sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from apex_grpc.config import ModelConfig
from apex_grpc.model.layers import GatedMLP, Linear, RMSNorm, RopeAngles, RotaryEmbedding

# attend(layer_idx, q, k, v) -> attention output [n, num_heads, head_dim]: the executor's part
# of each layer (KV storage and attention wherever the rows' KV lives).
LayerAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype, device)
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, config.qkv_bias,
                               dtype, device)
        self.o_proj = Linear(self.q_size, hidden, config.o_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(hidden, config.intermediate_size, dtype, device)

    def pre_attention(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeAngles,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [n, hidden_size] (residual None on the first layer), rope of the rows'
        positions -> q [n, num_heads, head_dim], k/v [n, num_kv_heads, head_dim] (RoPE applied),
        residual. q, k and v are views of one buffer: each row holds q|k|v contiguously.
        Per-head q/k norms (Qwen3) run here, before RoPE, so every execution strategy gets
        them."""
        normed, residual = self.input_layernorm(hidden, residual)
        qkv = self.qkv_proj(normed)
        num_tokens = hidden.shape[0]
        heads = qkv.view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k are adjacent in the projection: one norm and one rotation cover both.
        qk = heads[:, :self.num_heads + self.num_kv_heads]
        if self.q_norm is not None:
            RMSNorm.normalize_heads_(qk, self.num_heads, self.q_norm, self.k_norm)
        RotaryEmbedding.rotate_(qk, rope)
        q, k, v = heads.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        return q, k, v, residual

    def post_attention(self, attn_out: torch.Tensor,
                       residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_out [n, num_heads, head_dim] -> (mlp output, residual) for the next layer."""
        hidden = self.o_proj(attn_out.reshape(attn_out.shape[0], self.q_size))
        normed, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module):
    """One decoder for every row of model/architectures.py (Llama, Mistral, Qwen2, Qwen3): the
    optional parts (q/k/v/o biases, per-head q/k norms, tied embeddings) are switched on by the
    ModelConfig the table produced, never by a per-model copy of this code."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        hidden = config.hidden_size
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, hidden, dtype=dtype, device=self.device),
            requires_grad=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling, self.device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, self.device)
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype, self.device)
        # Tied models reuse the embedding matrix as the LM head (no separate parameter).
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(hidden, config.vocab_size, False, dtype, self.device))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [n] int64 -> hidden [n, hidden_size]."""
        return self.embed_tokens[input_ids]

    def rope(self, positions: torch.Tensor) -> RopeAngles:
        """positions [n] int64 -> the RoPE angles every layer's pre_attention takes."""
        return self.rotary.angles(positions)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden, residual)[0]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attend: LayerAttention) -> torch.Tensor:
        """input_ids, positions [num_tokens] int64 -> hidden [num_tokens, hidden_size]."""
        hidden = self.embed(input_ids)
        rope = self.rope(positions)
        residual: torch.Tensor | None = None
        for layer_idx, layer in enumerate(self.layers):
            q, k, v, residual = layer.pre_attention(hidden, residual, rope)
            hidden, residual = layer.post_attention(attend(layer_idx, q, k, v), residual)
        assert residual is not None, "a model has at least one layer"
        return self.final_norm(hidden, residual)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> float32 logits [n, vocab_size]."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()
