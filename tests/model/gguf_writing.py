"""Test helpers that write GGUF files the way llama.cpp's converter does, from a tiny
transformers model: tensor names from gguf-py's own name map (not the loader's), q/k rows
permuted for GGML's interleaved RoPE (llama architecture only: qwen2/qwen3 use NEOX RoPE, which
keeps the rotate-half rows), matrices quantized, for llama3 rope scaling a `rope_freqs` tensor
of per-frequency divisors, and a byte-level BPE tokenizer's metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import (MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, TokenType,
                  get_tensor_name_map, quants)


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (rotate-half -> interleaved pairs)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *rest).swapaxes(1, 2)
            .reshape(rows, *rest))


def head_dim(config: Any) -> int:
    """Qwen2's config has no head_dim attribute (it is always hidden / heads there)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def quantize_round_trip(array: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """The values a matrix holds after being written as tensor_type and read back."""
    if array.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
        return array
    return quants.dequantize(quants.quantize(array, tensor_type), tensor_type)


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


def write_gguf(path, hf_model, tensor_type: GGMLQuantizationType, arch: str = "llama",
               rope_freqs: np.ndarray | None = None,
               add_tokenizer: Callable[[GGUFWriter], None] | None = None) -> None:
    """A GGUF of architecture `arch` holding hf_model's weights; add_tokenizer(writer), when
    given, writes the tokenizer.* metadata. Matrices are stored as tensor_type, vectors (norms,
    biases) as F32, as llama.cpp does; a tied model gets no output.weight."""
    config = hf_model.config
    writer = GGUFWriter(str(path), arch)
    if add_tokenizer is not None:
        add_tokenizer(writer)
    if arch == "llama":  # the qwen files leave it to the embedding's rows (loader fallback)
        writer.add_uint32("llama.vocab_size", config.vocab_size)
    for key, value in (("context_length", 512),
                       ("embedding_length", config.hidden_size),
                       ("feed_forward_length", config.intermediate_size),
                       ("block_count", config.num_hidden_layers),
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads),
                       ("attention.key_length", head_dim(config)),
                       ("attention.value_length", head_dim(config)),
                       ("rope.dimension_count", head_dim(config))):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", float(rope_parameters(config)["rope_theta"]))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    model_arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = get_tensor_name_map(model_arch, config.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            array = permute_rows(array, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = permute_rows(array, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"gguf-py has no {arch} name for {name}"
        if array.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, quants.quantize(array, tensor_type),
                              raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_gguf(path, hf_model, tensor_type: GGMLQuantizationType,
                     rope_freqs: np.ndarray | None = None,
                     add_tokenizer: Callable[[GGUFWriter], None] | None = None) -> None:
    write_gguf(path, hf_model, tensor_type, "llama", rope_freqs, add_tokenizer)


def byte_level_bpe_metadata(hf_tokenizer, vocab_size: int,
                            pre: str) -> Callable[[GGUFWriter], None]:
    """What llama.cpp's converter writes for a byte-level BPE tokenizer (transformers fast
    tokenizer): every id up to the model's vocab_size (unused ids as [PADn]), added special
    tokens as control and other added tokens as user-defined, the merges, the pre-tokenizer
    name, special ids and the chat template."""
    by_id = {token_id: token for token, token_id in hf_tokenizer.get_vocab().items()}
    added = hf_tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            tokens.append(added[token_id].content)
            types.append(TokenType.CONTROL if added[token_id].special
                         else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(TokenType.NORMAL)
    merges = json.loads(hf_tokenizer.backend_tokenizer.to_str())["model"]["merges"]

    def add(writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_eos_token_id(hf_tokenizer.eos_token_id)
        writer.add_pad_token_id(hf_tokenizer.pad_token_id)
        if hf_tokenizer.bos_token_id is not None:
            writer.add_bos_token_id(hf_tokenizer.bos_token_id)
        writer.add_add_bos_token(False)
        writer.add_chat_template(hf_tokenizer.chat_template)
    return add
