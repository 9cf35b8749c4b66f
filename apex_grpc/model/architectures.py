"""What differs between the decoder architectures we serve, in one table, and the reading of a
Hugging Face config.json into a ModelConfig through it.

Every architecture runs the same decoder (llama.py); a row of ARCHITECTURES says which optional
parts it has (biases, per-head q/k norms), the defaults its transformers config class assumes
when config.json leaves a field out, how its GGUF files name and lay out things, and when its
config asks for sliding-window attention. The paged attention kernels attend to the whole
context, so a checkpoint whose window would ever cut the context is refused here, at load,
rather than served with different tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apex_grpc.config import ConfigError, ModelConfig
from apex_grpc.model.layers import rope_inv_freq

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


def architecture(hf_class: str) -> Architecture:
    if hf_class not in _BY_HF_CLASS:
        raise ConfigError(f"unsupported architecture {hf_class!r}; supported: "
                          f"{', '.join(_BY_HF_CLASS)}")
    return _BY_HF_CLASS[hf_class]


def gguf_architecture(name: Any) -> Architecture:
    if name not in _BY_GGUF_NAME:
        raise ConfigError(f"unsupported GGUF architecture {name!r}; supported: "
                          f"{', '.join(repr(n) for n in _BY_GGUF_NAME)}")
    return _BY_GGUF_NAME[name]


def _hf_architecture(cfg: dict[str, Any]) -> Architecture:
    classes = cfg.get("architectures")
    if classes:
        return architecture(classes[0])
    model_type = cfg.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ConfigError(f"config.json has no architectures and model_type {model_type!r} is "
                          f"not supported; supported: {', '.join(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


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


def check_window_covers_context(window: int | None, max_positions: int, what: str) -> None:
    """A window no shorter than the longest context never cuts anything: full attention."""
    if window is not None and window < max_positions:
        raise ConfigError(
            f"{what} asks for sliding-window attention (window {window} < "
            f"{max_positions} positions); the attention kernels attend to the whole context, "
            "so tokens past the window would differ. Sliding windows are not supported yet")


def check_supported_features(cfg: dict[str, Any]) -> None:
    """Reject config.json settings the decoder would otherwise silently compute differently."""
    activation = cfg.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"hidden_act {activation!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial rotary embeddings (partial_rotary_factor "
                          f"{cfg['partial_rotary_factor']}) are not supported")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantized safetensors checkpoints ({method}) are not supported; use "
                          "an unquantized checkpoint or a GGUF file")


def model_config_from_hf(cfg: dict[str, Any], name: str) -> ModelConfig:
    """ModelConfig from a config.json dict (rope settings already in the rope_theta /
    rope_scaling form). Raises ConfigError for anything unsupported."""
    arch = _hf_architecture(cfg)
    check_supported_features(cfg)
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        vocab_size = int(cfg["vocab_size"])
        intermediate = int(cfg["intermediate_size"])
    except KeyError as exc:
        raise ConfigError(f"config.json lacks required field {exc.args[0]!r}") from None
    max_positions = int(cfg.get("max_position_embeddings", 4096))
    check_window_covers_context(sliding_window_in_use(cfg, arch.sliding_window), max_positions,
                                f"this {arch.hf_class} config")
    head_dim = int(cfg.get("head_dim") or arch.default_head_dim or hidden // num_heads)
    rope_theta = float(cfg.get("rope_theta", 10000.0))
    rope_inv_freq(head_dim, rope_theta, cfg.get("rope_scaling"))  # unsupported rope: refuse now
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias, o_bias = arch.fixed_bias or (attention_bias, attention_bias)
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return ModelConfig(
        architecture=arch.hf_class,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
        rope_theta=rope_theta,
        rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=arch.qk_norm,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        name=name,
    )
