"""Test helpers that write GGUF files the way llama.cpp's converter does, from a tiny
transformers model: q/k rows permuted for GGML's interleaved RoPE, matrices quantized, and for
llama3 rope scaling a `rope_freqs` tensor of per-frequency divisors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

_LAYER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (rotate-half -> interleaved pairs)."""
    rows, cols = weight.shape
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope_theta and the scaling settings in config.rope_parameters."""
    return dict(getattr(config, "rope_parameters", None)
                or {"rope_theta": config.rope_theta, **(config.rope_scaling or {})})


def llama3_rope_freqs(head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors as llama.cpp's converter derives them from llama3 rope_scaling:
    1 for short wavelengths, `factor` for long ones, and between them the divisor that gives
    the smoothed frequency."""
    factor = float(rope["factor"])
    low_freq_factor = float(rope["low_freq_factor"])
    high_freq_factor = float(rope["high_freq_factor"])
    original_len = float(rope["original_max_position_embeddings"])
    divisors = []
    for pair in range(head_dim // 2):
        frequency = 1.0 / float(rope["rope_theta"]) ** (2 * pair / head_dim)
        wavelength = 2 * math.pi / frequency
        if wavelength < original_len / high_freq_factor:
            divisors.append(1.0)
        elif wavelength > original_len / low_freq_factor:
            divisors.append(factor)
        else:
            smooth = ((original_len / wavelength - low_freq_factor)
                      / (high_freq_factor - low_freq_factor))
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def write_llama_gguf(path, hf_model, tensor_type: GGMLQuantizationType,
                     rope_freqs: np.ndarray | None = None,
                     add_tokenizer: Callable[[GGUFWriter], None] | None = None) -> None:
    """A llama-architecture GGUF holding hf_model's weights; add_tokenizer(writer), when given,
    writes the tokenizer.ggml.* metadata."""
    config = hf_model.config
    writer = GGUFWriter(str(path), "llama")
    if add_tokenizer is not None:
        add_tokenizer(writer)
    for key, value in (("vocab_size", config.vocab_size), ("context_length", 512),
                       ("embedding_length", config.hidden_size),
                       ("feed_forward_length", config.intermediate_size),
                       ("block_count", config.num_hidden_layers),
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads),
                       ("attention.key_length", config.head_dim),
                       ("rope.dimension_count", config.head_dim)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32("llama.rope.freq_base", float(rope_parameters(config)["rope_theta"]))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, tensor in hf_model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permute_rows(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_rows(array, config.num_key_value_heads)
        if array.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array)
        else:
            writer.add_tensor(gguf_name(name), quants.quantize(array, tensor_type),
                              raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
