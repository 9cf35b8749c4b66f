"""Where each checkpoint tensor goes in LlamaForCausalLM, and the checked copy into it.

Names are Hugging Face's (model.layers.N.self_attn.q_proj.weight, ...); the GGUF loader maps
its names to these first. Fused parameters (q|k|v, gate|up) receive several checkpoint tensors,
each into its own row range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_grpc.model.llama import LlamaForCausalLM


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, inconsistent with its config, or unsupported."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs does not exist."""


@dataclass(frozen=True)
class WeightTarget:
    param: torch.Tensor  # the model parameter (or a whole fused parameter)
    row_start: int  # first row of the slice this checkpoint tensor fills
    num_rows: int


def weight_targets(model: LlamaForCausalLM) -> dict[str, WeightTarget]:
    """Checkpoint tensor name -> destination, for every tensor the model needs."""
    config = model.config
    targets = {
        "model.embed_tokens.weight": _whole(model.embed_tokens),
        "model.norm.weight": _whole(model.norm.weight),
    }
    if model.lm_head is not None:
        targets["lm_head.weight"] = _whole(model.lm_head.weight)
    q_size, kv_size = config.q_size, config.kv_size
    for layer_idx, layer in enumerate(model.layers):
        prefix = f"model.layers.{layer_idx}."
        qkv_ranges = {"q_proj": (0, q_size), "k_proj": (q_size, kv_size),
                      "v_proj": (q_size + kv_size, kv_size)}
        for proj, (start, rows) in qkv_ranges.items():
            name = f"{prefix}self_attn.{proj}"
            targets[f"{name}.weight"] = WeightTarget(layer.qkv_proj.weight, start, rows)
            if layer.qkv_proj.bias is not None:
                targets[f"{name}.bias"] = WeightTarget(layer.qkv_proj.bias, start, rows)
        if layer.q_norm is not None:
            targets[f"{prefix}self_attn.q_norm.weight"] = _whole(layer.q_norm.weight)
            targets[f"{prefix}self_attn.k_norm.weight"] = _whole(layer.k_norm.weight)
        targets[f"{prefix}self_attn.o_proj.weight"] = _whole(layer.o_proj.weight)
        if layer.o_proj.bias is not None:
            targets[f"{prefix}self_attn.o_proj.bias"] = _whole(layer.o_proj.bias)
        inter = config.intermediate_size
        targets[f"{prefix}mlp.gate_proj.weight"] = WeightTarget(layer.mlp.gate_up_proj.weight,
                                                                0, inter)
        targets[f"{prefix}mlp.up_proj.weight"] = WeightTarget(layer.mlp.gate_up_proj.weight,
                                                              inter, inter)
        targets[f"{prefix}mlp.down_proj.weight"] = _whole(layer.mlp.down_proj.weight)
        targets[f"{prefix}input_layernorm.weight"] = _whole(layer.input_layernorm.weight)
        targets[f"{prefix}post_attention_layernorm.weight"] = _whole(
            layer.post_attention_layernorm.weight)
    return targets


def _whole(param: torch.Tensor) -> WeightTarget:
    return WeightTarget(param, 0, param.shape[0])


def copy_weight(target: WeightTarget, name: str, tensor: torch.Tensor) -> None:
    """Copy one checkpoint tensor into its slice, converting dtype and device."""
    destination = target.param.narrow(0, target.row_start, target.num_rows)
    if tuple(tensor.shape) != tuple(destination.shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                              f"expects {tuple(destination.shape)}")
    with torch.no_grad():
        destination.copy_(tensor)


class WeightSink:
    """Receives checkpoint tensors one at a time and checks that none is missing at the end."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.targets = weight_targets(model)
        self.loaded: set[str] = set()

    def wants(self, name: str) -> bool:
        return name in self.targets

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Tensors the model does not use (rotary inv_freq, a tied lm_head) are skipped."""
        if name in self.targets:
            copy_weight(self.targets[name], name, tensor)
            self.loaded.add(name)

    def finish(self, source: str) -> None:
        missing = sorted(set(self.targets) - self.loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)"
                                              if len(missing) > 5 else "")
            raise CheckpointError(f"{source}: missing tensor(s) {shown}")
