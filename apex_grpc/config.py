"""Every setting of the server but the transport's: frozen dataclasses validated on construction,
each setting defined (name, default, help) once.

ModelConfig describes a Llama-family decoder (what a checkpoint's config.json or GGUF metadata
says). ServeOptions is what `apex-grpc serve` is told: ModelOptions (what to load, where) plus
SchedulingOptions (batch limits, policy) plus KV sizing and the performance model; its fields
are the command-line flags (apex_grpc.flags). EngineConfig is how the engine runs: the
SchedulingOptions as given plus what start-up derives from the rest.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from apex_grpc.flags import flag

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",  # the rows of model/architectures.py (a test keeps the two equal)
)


class ConfigError(ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


# On CUDA, who waits for a layer's CPU attention before its O projection, default first:
# "auto": stream-wait where the device has 64-bit stream memory operations, else host-func;
# "stream-wait": the compute stream waits on the pinned done flag (a stream memory wait);
# "host-func": a CUDA host function holds the compute stream; "engine-thread": the engine
# thread waits natively, then enqueues the rest of the layer. Measurements: docs/benchmarks.md.
CUDA_LAYER_WAITS = ("auto", "stream-wait", "host-func", "engine-thread")
LOAD_FORMATS = ("auto", "dummy")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before RoPE
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
        """Build from a Hugging Face config.json dict (rope settings as rope_theta /
        rope_scaling). What differs per architecture (biases, q/k norms, transformers' defaults,
        sliding windows) comes from the table in model/architectures.py."""
        # At call time: the table is a leaf, but importing it runs apex_grpc.model's __init__,
        # which needs this module complete.
        from apex_grpc.model import architectures as table

        arch = table.hf_architecture(cfg)
        if arch is None:
            named = (cfg.get("architectures") or [f"model_type {cfg.get('model_type')!r}"])[0]
            raise ConfigError(f"unsupported architecture {named!r}; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            max_positions = int(cfg.get("max_position_embeddings", 4096))
            refusal = table.window_refusal(table.sliding_window_in_use(cfg, arch.sliding_window),
                                           max_positions, f"this {arch.hf_class} config")
            if refusal:
                raise ConfigError(refusal)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            attention_bias = bool(cfg.get("attention_bias", False))
            qkv_bias, o_bias = arch.fixed_bias or (attention_bias, attention_bias)
            return cls(
                architecture=arch.hf_class,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or arch.default_head_dim
                             or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", table.DEFAULT_RMS_NORM_EPS)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
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
        except KeyError as exc:
            raise ConfigError(f"config.json lacks required field {exc.args[0]!r}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


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


# Start-up sizes where no size flag is given. Without a GPU the "GPU tier" is ordinary memory,
# so both tiers stay modest there.
DEFAULT_KV_GB_ON_CPU = 0.5  # each tier
DEFAULT_HOST_KV_GB_ON_CUDA = 8.0
# Share of the device memory still free (after the weights and the start-up profile) that the
# GPU KV tier takes.
CUDA_KV_MEMORY_FRACTION = 0.85


class HostKVDtype(str, enum.Enum):
    """The host KV tier's element type (kv_cache/quantized.py)."""

    AUTO = "auto"  # the model's dtype: host blocks are plain copies of GPU blocks
    INT8 = "int8"  # 8-bit rows with a float32 scale per token and kv head: half the bytes


@dataclass(frozen=True)
class ModelOptions:
    """What to load and where to run it: the flags `apex-grpc serve` and `apex-grpc profile`
    share (a performance profile holds for exactly these)."""

    model: str | None = flag(
        None, "HF directory (config.json + safetensors + tokenizer) or a .gguf file; "
              "default: the embedded SmolLM2-135M-Instruct")
    load_format: str = flag("auto", "dummy = random weights of the given config (benchmarks)",
                            choices=LOAD_FORMATS)
    dummy_config: str | None = flag(
        None, "with --load-format dummy: a shipped config name or a config.json path")
    device: str = flag("auto", "auto = CUDA where available, else the CPU",
                       choices=DEVICES)
    dtype: str = flag("auto", "weights, activations and KV; auto = bfloat16 on CUDA, float32 "
                              "on the CPU", choices=DTYPES)
    cpu_attention_threads: int | None = flag(
        None, "native CPU attention pool size; default: the usable cores - 2")
    seed: int = flag(0, "torch's random seed at start-up (dummy weights)")


@dataclass(frozen=True)
class SchedulingOptions:
    """Batch limits and scheduling policy: serve flags that EngineConfig keeps as given."""

    block_size: int = flag(16, "tokens per KV block")
    max_num_seqs: int = flag(64, "most requests in one step")
    max_batched_tokens: int = flag(2048, "token budget of one step")
    policy: Policy = flag(Policy.APEX, "which strategies the scheduler may choose from")
    kv_placement: KVPlacement = flag(
        KVPlacement.AUTO, "force where new requests' KV goes (tests and benchmarks)")
    max_waiting: int = flag(
        1024, "waiting-queue bound; past it requests get RESOURCE_EXHAUSTED")
    max_step_stretch: float = flag(
        1.25, "how much longer than gpu-only's a hybrid step may be predicted to take "
              "(TPOT guard)")
    host_kv_dtype: HostKVDtype = flag(
        HostKVDtype.AUTO, "host KV tier element type: auto (the model's dtype) or int8 (8-bit "
                          "rows + a scale per token and kv head: half the bytes)")

    def __post_init__(self) -> None:
        if not isinstance(self.host_kv_dtype, HostKVDtype):
            raise ConfigError(f"host_kv_dtype must be a HostKVDtype (one of "
                              f"{', '.join(d.value for d in HostKVDtype)}), got "
                              f"{self.host_kv_dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_batched_tokens", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_step_stretch < 1.0:
            raise ConfigError("max_step_stretch must be >= 1.0")


@dataclass(frozen=True)
class EngineConfig(SchedulingOptions):
    """How the engine runs: the scheduling options plus what start-up derives (KV tier sizes,
    context limit, CPU attention threads; engine.builder.engine_config)."""

    num_gpu_blocks: int = 256
    num_host_blocks: int = 0
    max_model_len: int = 2048
    cpu_attention_threads: int = 1
    # Hysteresis for restoring host-resident requests to the GPU tier.
    restore_below_fraction: float = 0.95
    # Share of GPU blocks kept free at admission so running decodes can grow without preempting.
    gpu_admission_watermark: float = 0.01
    # A host decode job this late means a hung worker: the step fails (INTERNAL), not the server.
    host_job_timeout_s: float = 60.0
    max_stop_strings: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_gpu_blocks", "max_model_len", "cpu_attention_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_host_blocks < 0:
            raise ConfigError("num_host_blocks must be >= 0")
        if self.policy != Policy.GPU_ONLY and self.kv_placement in (KVPlacement.HOST,
                                                                    KVPlacement.ALTERNATE):
            if self.num_host_blocks == 0:
                raise ConfigError(f"--kv-placement {self.kv_placement.value} needs a host KV tier")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ServeOptions(ModelOptions, SchedulingOptions):
    """Everything `apex-grpc serve` needs to build an engine (the engine flags of API.md)."""

    gpu_kv_blocks: int | None = flag(None, "GPU KV tier size in blocks")
    gpu_kv_gb: float | None = flag(  # argparse prints %% as %
        None, f"GPU KV tier size in GiB; default: {CUDA_KV_MEMORY_FRACTION * 100:.0f}%% of the "
              f"free memory on CUDA, {DEFAULT_KV_GB_ON_CPU} on the CPU")
    host_kv_gb: float | None = flag(
        None, f"host KV tier size in GiB; default: {DEFAULT_HOST_KV_GB_ON_CUDA} with CUDA, "
              f"{DEFAULT_KV_GB_ON_CPU} without")
    max_model_len: int | None = flag(
        None, "context limit; default: the model's, capped to what the GPU KV tier holds")
    # Performance model: a profile path or name, "auto" (measure at start-up), "none" (fixed
    # per-policy rules), or None for the device's default (auto on CUDA, none on the CPU).
    profile: str | None = flag(
        None, "performance-model profile: a JSON path or shipped name, 'auto' (measure at "
              "start-up, the default on CUDA) or 'none' (fixed per-policy rules, the default "
              "on the CPU)")
    tpot_slo_ms: float | None = flag(
        None, "TPOT target the apex chooser keeps decode steps under")
    # How a layer waits for its host rows' CPU attention on CUDA (CUDA_LAYER_WAITS; the choice
    # and its measurements: docs/architecture.md, docs/benchmarks.md).
    cuda_layer_wait: str = flag(
        CUDA_LAYER_WAITS[0], "CUDA: who waits for each layer's CPU attention (stream-wait: the "
        "compute stream itself, on a pinned flag; host-func: a CUDA host function on the "
        "compute stream; engine-thread: the engine thread, natively; auto: stream-wait where "
        "the GPU supports it, else host-func)", choices=CUDA_LAYER_WAITS)
    # Decode steps as CUDA graphs (runner/decode_graphs.py; the buckets and what stays eager:
    # docs/architecture.md).
    enforce_eager: bool = flag(
        False, "CUDA: capture no CUDA graph, launch every step eagerly (vLLM's name)")
    cuda_graph_max_batch: int = flag(
        64, "CUDA: the most GPU rows (and host rows) of a decode step captured as a CUDA "
            "graph; larger steps run eagerly")
