"""Frozen configuration dataclasses, validated on construction.

ModelConfig describes a Llama-family decoder (what a checkpoint's config.json or GGUF metadata
says); EngineConfig describes how the server runs it (KV tiers, batch limits, policy).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)


class ConfigError(ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


# On CUDA, who waits for a layer's CPU attention before its O projection, default first:
# "auto": stream-wait where the device has 64-bit stream memory operations, else host-func;
# "stream-wait": the compute stream waits on the pinned done flag (a stream memory wait);
# "host-func": a CUDA host function holds the compute stream; "engine-thread": the engine
# thread waits natively, then enqueues the rest of the layer. Measurements: docs/benchmarks.md.
CUDA_LAYER_WAITS = ("auto", "stream-wait", "host-func", "engine-thread")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict ({"rope_type": "llama3", ...}); GGUF loads may add
    # "frequency_factors" (per-frequency divisors from a rope_freqs tensor).
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # Qwen2 puts biases on q/k/v; Llama may set attention_bias for all of q/k/v/o.
    qkv_bias: bool = False
    o_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "unnamed"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K plus V for one token over all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], name: str = "unnamed") -> ModelConfig:
        """Build from a Hugging Face config.json dict."""
        archs = cfg.get("architectures") or [_arch_from_model_type(cfg.get("model_type"))]
        arch = archs[0]
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            is_qwen2 = arch == "Qwen2ForCausalLM"
            attention_bias = bool(cfg.get("attention_bias", False))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if is_qwen2 else 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=cfg.get("rope_scaling"),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=is_qwen2 or attention_bias,
                o_bias=attention_bias and not is_qwen2,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                name=name,
            )
        except KeyError as exc:
            raise ConfigError(f"config.json lacks required field {exc.args[0]!r}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(model_type or "", f"unknown model_type {model_type!r}")


class Policy(str, enum.Enum):
    """Which execution strategies the scheduler may choose from."""

    GPU_ONLY = "gpu-only"
    NEO = "neo"
    APEX = "apex"


class KVPlacement(str, enum.Enum):
    """Where a newly admitted request's KV goes (forcing is for tests and benchmarks)."""

    AUTO = "auto"
    GPU = "gpu"
    HOST = "host"
    ALTERNATE = "alternate"


class HostKVDtype(str, enum.Enum):
    """The host KV tier's element type (kv_cache/quantized.py)."""

    AUTO = "auto"  # the model's dtype: host blocks are plain copies of GPU blocks
    INT8 = "int8"  # 8-bit rows with a float32 scale per token and kv head: half the bytes


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_gpu_blocks: int = 256
    num_host_blocks: int = 0
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: Policy = Policy.APEX
    kv_placement: KVPlacement = KVPlacement.AUTO
    cpu_attention_threads: int = 1
    max_waiting: int = 1024
    # Hysteresis for restoring host-resident requests to the GPU tier.
    restore_below_fraction: float = 0.95
    # How much longer than GPU_ONLY's a hybrid step may be predicted to take (TPOT guard).
    max_step_stretch: float = 1.25
    max_stop_strings: int = 16
    host_kv_dtype: HostKVDtype = HostKVDtype.AUTO

    def __post_init__(self) -> None:
        if not isinstance(self.host_kv_dtype, HostKVDtype):
            raise ConfigError(f"host_kv_dtype must be a HostKVDtype (one of "
                              f"{', '.join(d.value for d in HostKVDtype)}), got "
                              f"{self.host_kv_dtype!r}")
        positives = ("block_size", "num_gpu_blocks", "max_num_seqs", "max_batched_tokens",
                     "max_model_len", "cpu_attention_threads", "max_waiting")
        for name in positives:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_host_blocks < 0:
            raise ConfigError("num_host_blocks must be >= 0")
        if self.policy != Policy.GPU_ONLY and self.kv_placement in (KVPlacement.HOST,
                                                                    KVPlacement.ALTERNATE):
            if self.num_host_blocks == 0:
                raise ConfigError(f"--kv-placement {self.kv_placement.value} needs a host KV tier")
        if self.max_step_stretch < 1.0:
            raise ConfigError("max_step_stretch must be >= 1.0")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ServeOptions:
    """Everything `apex-grpc serve` needs to build an engine (the CLI flags of API.md)."""

    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    load_format: str = "auto"  # auto | dummy
    # For --load-format dummy: a config name shipped in apex_grpc/configs or a config.json path.
    dummy_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    policy: Policy = Policy.APEX
    kv_placement: KVPlacement = KVPlacement.AUTO
    gpu_kv_blocks: int | None = None
    gpu_kv_gb: float | None = None
    host_kv_gb: float | None = None  # None: a default sized for the device
    host_kv_dtype: HostKVDtype = HostKVDtype.AUTO
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_model_len: int | None = None
    cpu_attention_threads: int | None = None
    max_waiting: int = 1024
    max_step_stretch: float = 1.25
    # Performance model: a profile path or name, "auto" (measure at start-up), "none" (fixed
    # per-policy rules), or None for the device's default (auto on CUDA, none on the CPU).
    profile: str | None = None
    tpot_slo_ms: float | None = None
    # How a layer waits for its host rows' CPU attention on CUDA (CUDA_LAYER_WAITS; the choice
    # and its measurements: docs/architecture.md, docs/benchmarks.md).
    cuda_layer_wait: str = CUDA_LAYER_WAITS[0]
    seed: int = 0
