"""The Llama-family model and its checkpoint loaders (entry point: loader.load_model)."""

from __future__ import annotations

from apex_grpc.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from apex_grpc.model.loader import embedded_gguf_path, load_model
from apex_grpc.model.weights import CheckpointError, CheckpointFileNotFoundError

__all__ = ["CheckpointError", "CheckpointFileNotFoundError", "LlamaDecoderLayer",
           "LlamaForCausalLM", "embedded_gguf_path", "load_model"]
