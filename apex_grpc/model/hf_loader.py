"""Hugging Face checkpoint directories: config.json (+ generation_config.json) and safetensors.

Tensors are read one at a time straight from the safetensors files (no memory map, whose
resident file pages would count as a second copy of the checkpoint) into the preallocated
model, so peak host memory stays near one model copy plus the largest tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterator

import torch

from apex_grpc.config import ConfigError, ModelConfig
from apex_grpc.model.layers import rope_inv_freq
from apex_grpc.model.weights import CheckpointError, CheckpointFileNotFoundError, WeightSink

SINGLE_FILE = "model.safetensors"
# safetensors dtype names -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 << 20
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def normalize_hf_config(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes rope settings as `rope_parameters` (theta inside); older
    versions use top-level `rope_theta` and `rope_scaling`. Map the new form onto the old one,
    which ModelConfig.from_hf_dict reads."""
    cfg = dict(raw)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in cfg:
            cfg["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


def read_hf_model_config(model_dir: str, name: str | None = None) -> ModelConfig:
    """ModelConfig from config.json, with EOS ids from generation_config.json when present."""
    config_path = os.path.join(model_dir, "config.json")
    cfg = normalize_hf_config(read_json(config_path))
    check_supported_features(cfg, config_path)
    generation_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation_path):
        eos = read_json(generation_path).get("eos_token_id")
        if eos is not None:
            cfg["eos_token_id"] = eos
    return config_from_dict(cfg, name or os.path.basename(os.path.normpath(model_dir)),
                            source=model_dir)


def check_supported_features(cfg: dict[str, Any], source: str) -> None:
    """Reject settings the decoder would otherwise silently compute wrong."""
    activation = cfg.get("hidden_act", "silu")
    if activation != "silu":
        raise CheckpointError(f"{source}: hidden_act {activation!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial rotary embeddings (partial_rotary_factor "
                              f"{cfg['partial_rotary_factor']}) are not supported")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{source}: quantized safetensors checkpoints ({method}) are not "
                              "supported; use an unquantized checkpoint or a GGUF file")


def config_from_dict(cfg: dict[str, Any], name: str, source: str) -> ModelConfig:
    try:
        config = ModelConfig.from_hf_dict(cfg, name=name)
        # An unsupported rope type: refused now, not when the model is built.
        rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        return config
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files, single-file or sharded (via the index)."""
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(index_path):
        raise CheckpointFileNotFoundError(
            f"{model_dir}: no {SINGLE_FILE} and no {INDEX_FILE} (only safetensors checkpoints "
            "are supported)")
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map")
    shards = sorted(set(weight_map.values()))
    paths = [os.path.join(model_dir, shard) for shard in shards]
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointFileNotFoundError(f"missing shard {path} (listed in {INDEX_FILE})")
    return paths


def load_hf_weights(model_dir: str, sink: WeightSink) -> None:
    """Stream every safetensors tensor the model needs into it, then check none is missing."""
    for path in safetensors_files(model_dir):
        for name, tensor in read_safetensors(path, sink.wants):
            sink.put(name, tensor)
    sink.finish(model_dir)


def _safetensors_header(path: str, file, size: int) -> tuple[dict[str, Any], int]:
    """(tensor entries, offset of the data section), validated against the file size."""
    head = file.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (no header)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of "
                              f"{header_len} bytes in a {size}-byte file)")
    try:
        header = json.loads(file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if end is None or data_start + end > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (tensor "
                                  f"{name} ends past the file's {size} bytes)")
    return header, data_start


def read_safetensors(path: str, wanted: Callable[[str], bool],
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the wanted tensors of a safetensors file, in file order, each
    read into its own buffer (the caller copies it into the model and drops it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        header, data_start = _safetensors_header(path, file, size)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if not wanted(name):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype "
                                      f"{info.get('dtype')!r}")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - start:
                raise CheckpointError(f"{path}: tensor {name} holds {end - start} bytes, its "
                                      f"shape {info['shape']} and dtype need "
                                      f"{tensor.numel() * tensor.element_size()}")
            file.seek(data_start + start)
            if tensor.numel() and file.readinto(memoryview(tensor.view(-1).view(torch.uint8)
                                                           .numpy())) != end - start:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file")
            yield name, tensor