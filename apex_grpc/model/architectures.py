"""What differs between the decoder architectures we serve, in one table.

Every architecture runs the same decoder (llama.py); a row of ARCHITECTURES says which optional
parts it has (biases, per-head q/k norms), the defaults its transformers config class assumes
when config.json leaves a field out, how its GGUF files name and lay out things, and when its
config asks for sliding-window attention. ModelConfig.from_hf_dict and the GGUF loader read
checkpoints through it. The paged attention kernels attend to the whole context, so a checkpoint
whose window would ever cut the context is refused at load rather than served with different
tokens.

A leaf module (nothing from the project): config.py reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# transformers' default for every architecture here when config.json has no rms_norm_eps.
DEFAULT_RMS_NORM_EPS = 1e-6


@dataclass(frozen=True)
class SlidingWindowRule:
    """How a config.json asks for sliding-window attention (transformers' semantics)."""

    default_window: int | None  # the window when config.json has no sliding_window key
    switch: str | None = None  # a config key that must be true for the window to apply
    # Layers from this index on slide (Qwen2's max_window_layers and its default); None: all.
    first_layer_key: str | None = None
    first_layer_default: int = 0


@dataclass(frozen=True)
class Architecture:
    hf_class: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    gguf_name: str | None  # general.architecture of its GGUF files; None: they use another row's
    # (q|k|v bias, o bias) whatever config.json says; None: both follow its attention_bias.
    fixed_bias: tuple[bool, bool] | None
    qk_norm: bool  # RMSNorm over each q and k head (weights [head_dim]) before RoPE
    default_head_dim: int | None  # head_dim when config.json has none; None: hidden / heads
    # llama.cpp permutes q/k rows for GGML's interleaved ("normal") RoPE; NEOX-RoPE
    # architectures keep the rotate-half layout.
    gguf_interleaved_rope: bool
    sliding_window: SlidingWindowRule | None  # None: the architecture has no sliding window


_QWEN_WINDOW = SlidingWindowRule(default_window=4096, switch="use_sliding_window",
                                 first_layer_key="max_window_layers", first_layer_default=28)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("LlamaForCausalLM", "llama", "llama", fixed_bias=None, qk_norm=False,
                 default_head_dim=None, gguf_interleaved_rope=True, sliding_window=None),
    # Mistral GGUFs are written with the llama architecture.
    Architecture("MistralForCausalLM", "mistral", None, fixed_bias=(False, False),
                 qk_norm=False, default_head_dim=None, gguf_interleaved_rope=True,
                 sliding_window=SlidingWindowRule(default_window=4096)),
    Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", fixed_bias=(True, False), qk_norm=False,
                 default_head_dim=None, gguf_interleaved_rope=False,
                 sliding_window=_QWEN_WINDOW),
    Architecture("Qwen3ForCausalLM", "qwen3", "qwen3", fixed_bias=None, qk_norm=True,
                 default_head_dim=128, gguf_interleaved_rope=False,
                 sliding_window=_QWEN_WINDOW),
)
_BY_HF_CLASS = {arch.hf_class: arch for arch in ARCHITECTURES}
_BY_MODEL_TYPE = {arch.model_type: arch for arch in ARCHITECTURES}
_BY_GGUF_NAME = {arch.gguf_name: arch for arch in ARCHITECTURES if arch.gguf_name}


def hf_architecture(cfg: dict[str, Any]) -> Architecture | None:
    """The row of a config.json dict (by its architectures, else its model_type); None if
    there is none."""
    classes = cfg.get("architectures")
    if classes:
        return _BY_HF_CLASS.get(classes[0])
    return _BY_MODEL_TYPE.get(cfg.get("model_type"))


def by_hf_class(hf_class: str) -> Architecture:
    return _BY_HF_CLASS[hf_class]


def by_gguf_name(name: Any) -> Architecture | None:
    return _BY_GGUF_NAME.get(name)


def gguf_names() -> tuple[str, ...]:
    return tuple(_BY_GGUF_NAME)


def sliding_window_in_use(cfg: dict[str, Any], rule: SlidingWindowRule | None) -> int | None:
    """The window some layer attends within, as transformers reads config.json; None if none."""
    if rule is None or (rule.switch is not None and not cfg.get(rule.switch, False)):
        return None
    window = cfg.get("sliding_window", rule.default_window)
    if window is None:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        slides = "sliding_attention" in layer_types
    elif rule.first_layer_key is not None:
        first = cfg.get(rule.first_layer_key, rule.first_layer_default)
        slides = int(cfg["num_hidden_layers"]) > int(first)
    else:
        slides = True
    return int(window) if slides else None


def window_refusal(window: int | None, max_positions: int, what: str) -> str | None:
    """Why a window would change the output, or None: one no shorter than the longest context
    never cuts anything (full attention)."""
    if window is None or window >= max_positions:
        return None
    return (f"{what} asks for sliding-window attention (window {window} < {max_positions} "
            "positions); the attention kernels attend to the whole context, so tokens past the "
            "window would differ. Sliding windows are not supported yet")
