"""Hugging Face checkpoint directories: config.json (+ generation_config.json) and safetensors.

Tensors are streamed one at a time from memory-mapped safetensors files into the preallocated
model, so peak host memory stays near one model copy (plus the largest tensor).
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import SafetensorError, safe_open

from apex_grpc.config import ConfigError, ModelConfig
from apex_grpc.model.weights import CheckpointError, CheckpointFileNotFoundError, WeightSink

SINGLE_FILE = "model.safetensors"
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


def config_from_dict(cfg: dict[str, Any], name: str, source: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(cfg, name=name)
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
        try:
            with safe_open(path, framework="pt", device="cpu") as file:
                for name in file.keys():
                    if sink.wants(name):
                        sink.put(name, file.get_tensor(name))
        except SafetensorError as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") \
                from exc
    sink.finish(model_dir)

