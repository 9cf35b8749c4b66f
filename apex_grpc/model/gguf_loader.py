"""GGUF files (architectures llama, qwen2, qwen3): hyperparameters, tensors and tokenizer from one
file.

The file's general.architecture picks a row of model/architectures.py's table, and its metadata
keys carry that name as prefix (qwen3.embedding_length, ...). Biases are used where the file
has them. Tensors are dequantized one at a time with the `gguf` package (the file is
memory-mapped), so peak host memory stays near one model copy. For architectures with GGML's
interleaved ("normal") RoPE (llama, hence Mistral too) the converter permutes the rows of q and
k; we undo that to get back the rotate-half layout our RoPE uses. Qwen's NEOX RoPE already is
rotate-half. A tensor the decoder would not use is refused, not skipped: ignoring it would
serve different tokens.
Llama-3.1/3.2 files carry their rope scaling as a `rope_freqs` tensor of per-frequency divisors
(llama.cpp stores no llama3 parameters); it goes into the config as rope "frequency_factors".
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize

from apex_grpc.config import ConfigError, ModelConfig
from apex_grpc.model.architectures import (Architecture, by_gguf_name, by_hf_class, gguf_names,
                                           window_refusal)
from apex_grpc.model.weights import CheckpointError, CheckpointFileNotFoundError, WeightSink

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS_TENSOR = "rope_freqs.weight"


def open_gguf(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(f"missing file {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from exc


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key -> its Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def file_architecture(metadata: dict[str, Any], path: str) -> Architecture:
    name = metadata.get("general.architecture")
    arch = by_gguf_name(name)
    if arch is None:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {name!r}; supported: "
                              f"{', '.join(repr(n) for n in gguf_names())}")
    return arch


def config_from_gguf(reader: GGUFReader, metadata: dict[str, Any], path: str) -> ModelConfig:
    arch = file_architecture(metadata, path)
    tensor_names = {tensor.name for tensor in reader.tensors}
    fields = _config_fields(arch, metadata, tensor_names, reader, path)
    frequency_factors = _rope_frequency_factors(reader, fields["head_dim"], path)
    if frequency_factors is not None:
        fields["rope_scaling"] = {**(fields["rope_scaling"] or {"rope_type": "default"}),
                                  "frequency_factors": frequency_factors}
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _config_fields(arch: Architecture, metadata: dict[str, Any], tensor_names: set[str],
                   reader: GGUFReader, path: str) -> dict[str, Any]:
    prefix = arch.gguf_name

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{prefix}.{key}", default)

    def need(key: str) -> Any:
        if f"{prefix}.{key}" not in metadata:
            raise CheckpointError(f"{path}: GGUF metadata lacks {prefix}.{key}")
        return metadata[f"{prefix}.{key}"]

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: key_length {head_dim} != value_length "
                              f"{get('attention.value_length')} is not supported")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary ({rope_dim} of {head_dim}) unsupported")
    max_positions = int(get("context_length", 4096))
    refusal = window_refusal(get("attention.sliding_window"), max_positions, "this GGUF file")
    if refusal:
        raise CheckpointError(f"{path}: {refusal}")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return dict(
        architecture=arch.hf_class,
        vocab_size=_vocab_size(get("vocab_size"), metadata, reader),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(prefix, metadata, path),
        max_position_embeddings=max_positions,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm=arch.qk_norm,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(metadata.get("general.name") or os.path.basename(path)),
    )


def _vocab_size(declared: Any, metadata: dict[str, Any], reader: GGUFReader) -> int:
    """The declared size, else the embedding's rows (converters pad the token list to it)."""
    if declared is not None:
        return int(declared)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is not None:
        return int(embedding.shape[-1])  # GGUF shapes list the fastest dimension first
    return len(metadata.get("tokenizer.ggml.tokens", ()))


def _rope_scaling(prefix: str, metadata: dict[str, Any], path: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear",
                "factor": float(metadata[f"{prefix}.rope.scaling.factor"])}
    raise CheckpointError(f"{path}: unsupported GGUF rope scaling type {kind!r}")


def _rope_frequency_factors(reader: GGUFReader, head_dim: int,
                            path: str) -> tuple[float, ...] | None:
    """The rope_freqs divisors (one per rotated pair), or None when the file has none."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS_TENSOR), None)
    if tensor is None:
        return None
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS_TENSOR!r} uses unsupported "
                              f"quantization type {tensor.tensor_type.name}")
    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).ravel()
    if values.size != head_dim // 2:
        raise CheckpointError(f"{path}: {ROPE_FREQS_TENSOR} has {values.size} values; "
                              f"head_dim {head_dim} needs {head_dim // 2}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CheckpointError(f"{path}: {ROPE_FREQS_TENSOR} holds non-positive or non-finite "
                              "factors")
    return tuple(float(value) for value in values)


def check_tensor_types(reader: GGUFReader, path: str) -> None:
    """Fail before allocating the model if any tensor uses a quantization we cannot read."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise CheckpointError(f"{path}: tensor {tensor.name!r} uses unsupported quantization "
                                  f"type {tensor.tensor_type.name}; supported: {supported}")


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo the converter's per-head row interleave: within each head, rows were reordered
    from [first half, second half] to alternating pairs; restore the halves."""
    rows = weight.shape[0]
    head_rows = rows // num_heads
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, head_rows // 2, 2, *rest).transpose(1, 2)
            .reshape(rows, *rest))


def load_gguf_weights(reader: GGUFReader, config: ModelConfig, sink: WeightSink,
                      path: str) -> None:
    interleaved = by_hf_class(config.architecture).gguf_interleaved_rope
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None or not sink.wants(name):
            if tensor.name == ROPE_FREQS_TENSOR:  # already in the config
                continue
            raise CheckpointError(f"{path}: tensor {tensor.name!r} is not used by the "
                                  f"{config.architecture} decoder; refusing to ignore it")
        array = dequantize(tensor.data, tensor.tensor_type)
        values = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        if interleaved and _is_projection(name, "q_proj"):
            values = unpermute_rows(values, config.num_attention_heads)
        elif interleaved and _is_projection(name, "k_proj"):
            values = unpermute_rows(values, config.num_key_value_heads)
        sink.put(name, values)
    sink.finish(path)


def _is_projection(name: str, proj: str) -> bool:
    return name.endswith((f"self_attn.{proj}.weight", f"self_attn.{proj}.bias"))
