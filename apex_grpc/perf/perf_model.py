"""The performance model: measured tables (Profile, JSON on disk) and step-time predictions.

Owns the Profile format (keyed by model shape, dtype, device name and CPU thread count), the
interpolated per-layer costs of ARCHITECTURE.md ("Performance model"), the step-time formula of
each Strategy, and the online correction (an EWMA scale per strategy fed with measured steps).
Predictions are a handful of bisections over small tables: cheap enough to call per candidate
inside the chooser.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from apex_grpc.config import ModelConfig
from apex_grpc.request import Tier
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy

PROFILE_FORMAT_VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ProfileMismatchError(ValueError):
    """A profile was measured for another model shape, dtype, device or thread count."""


def _segment(xs: Sequence[float], x: float) -> tuple[int, float]:
    """Index i and weight t with x = xs[i] + t * (xs[i+1] - xs[i]); t < 0 clamps to the first
    point, t > 1 extrapolates the last segment (costs keep growing past the measured range)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0.0
    i = min(bisect.bisect_right(xs, x) - 1, len(xs) - 2)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _check_axis(name: str, xs: Sequence[float]) -> None:
    if not xs:
        raise ValueError(f"{name}: empty axis")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"{name}: axis must be strictly increasing, got {list(xs)}")


@dataclass(frozen=True)
class Table1D:
    """Milliseconds vs one size (tokens, bytes, rows); zero size costs nothing."""

    xs: tuple[float, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_axis("Table1D", self.xs)
        if len(self.ms) != len(self.xs):
            raise ValueError(f"Table1D: {len(self.xs)} sizes but {len(self.ms)} times")

    def at(self, x: float) -> float:
        if x <= 0:
            return 0.0
        if len(self.xs) == 1:
            return self.ms[0]
        i, t = _segment(self.xs, x)
        return max(0.0, self.ms[i] + t * (self.ms[i + 1] - self.ms[i]))


@dataclass(frozen=True)
class Table2D:
    """Milliseconds vs (rows, cols), bilinear; ms[i][j] is at (row_xs[i], col_xs[j])."""

    row_xs: tuple[float, ...]
    col_xs: tuple[float, ...]
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        _check_axis("Table2D rows", self.row_xs)
        _check_axis("Table2D cols", self.col_xs)
        if len(self.ms) != len(self.row_xs) or any(len(r) != len(self.col_xs) for r in self.ms):
            raise ValueError("Table2D: ms must be len(row_xs) x len(col_xs)")

    def at(self, row: float, col: float) -> float:
        if row <= 0 or col <= 0:
            return 0.0
        i, ti = _segment(self.row_xs, row)
        j, tj = _segment(self.col_xs, col)
        i1 = min(i + 1, len(self.row_xs) - 1)
        j1 = min(j + 1, len(self.col_xs) - 1)
        top = self.ms[i][j] + tj * (self.ms[i][j1] - self.ms[i][j])
        bottom = self.ms[i1][j] + tj * (self.ms[i1][j1] - self.ms[i1][j])
        return max(0.0, top + ti * (bottom - top))


@dataclass(frozen=True)
class Link:
    """One copy direction: fixed latency plus bytes over bandwidth."""

    latency_ms: float
    gb_per_s: float

    def ms(self, num_bytes: float) -> float:
        return 0.0 if num_bytes <= 0 else self.latency_ms + num_bytes / (self.gb_per_s * 1e6)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig) -> ModelShape:
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, config.head_dim, config.intermediate_size,
                   config.vocab_size)


@dataclass(frozen=True)
class Profile:
    """Measured (or derived) costs. Per-layer tables unless noted; times in milliseconds."""

    shape: ModelShape
    dtype: str
    device_name: str
    cpu_threads: int
    linear: Table1D  # GPU linear work of one layer vs tokens in the batch
    prefill_attention: Table1D  # GPU causal attention of one layer vs one prompt's length
    gpu_attention: Table1D  # GPU paged decode attention of one layer vs total context tokens
    cpu_attention: Table2D  # CPU decode attention of one layer vs (requests, context tokens)
    d2h: Link
    h2d: Link
    layer_launch_ms: float  # per layer per sub-batch (kernel launches not inside T_lin)
    layer_sync_ms: float  # per layer when the step waits on the CPU pool (wake-up, flag)
    head: Table1D  # per step: final norm + LM head + sampling vs sampled rows
    # The host KV tier's element type that cpu_attention was measured (or derived) for:
    # config.HostKVDtype values; an int8 tier reads about half the bytes per context token.
    host_kv_dtype: str = "auto"
    name: str = ""
    notes: str = ""
    format_version: int = PROFILE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"profile dtype {self.dtype!r} not in {sorted(DTYPE_BYTES)}")
        if self.cpu_threads <= 0:
            raise ValueError("profile cpu_threads must be positive")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def check_matches(self, model_config: ModelConfig, dtype: str, device_name: str,
                      threads: int) -> None:
        """Raise ProfileMismatchError naming every key that differs from the served setup."""
        wanted = {"model shape": ModelShape.of(model_config), "dtype": dtype,
                  "device": device_name, "cpu threads": threads}
        have = {"model shape": self.shape, "dtype": self.dtype, "device": self.device_name,
                "cpu threads": self.cpu_threads}
        diffs = [f"{key}: profile has {have[key]}, server has {wanted[key]}"
                 for key in wanted if have[key] != wanted[key]]
        if diffs:
            raise ProfileMismatchError(
                f"profile {self.name or '(unnamed)'} does not match this server ("
                + "; ".join(diffs) + "); run `apex-grpc profile` for this setup")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        version = data.get("format_version", PROFILE_FORMAT_VERSION)
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"profile format {version} is not {PROFILE_FORMAT_VERSION}")
        try:
            def t1(d: dict) -> Table1D:
                return Table1D(tuple(d["xs"]), tuple(d["ms"]))
            cpu = data["cpu_attention"]
            return cls(
                shape=ModelShape(**data["shape"]), dtype=data["dtype"],
                device_name=data["device_name"], cpu_threads=int(data["cpu_threads"]),
                linear=t1(data["linear"]), prefill_attention=t1(data["prefill_attention"]),
                gpu_attention=t1(data["gpu_attention"]),
                cpu_attention=Table2D(tuple(cpu["row_xs"]), tuple(cpu["col_xs"]),
                                      tuple(tuple(r) for r in cpu["ms"])),
                d2h=Link(**data["d2h"]), h2d=Link(**data["h2d"]),
                layer_launch_ms=float(data["layer_launch_ms"]),
                layer_sync_ms=float(data["layer_sync_ms"]), head=t1(data["head"]),
                host_kv_dtype=data.get("host_kv_dtype", "auto"), name=data.get("name", ""),
                notes=data.get("notes", ""), format_version=version)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed profile: {exc!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """A path to a JSON file, or the name of one shipped in apex_grpc/perf/profiles/."""
        path = Path(name_or_path)
        if not path.is_file():
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
            raise FileNotFoundError(f"no profile file {name_or_path!r}; shipped: {shipped}")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(slots=True)
class StepShape:
    """Aggregates of one step's rows: all the performance model needs (O(1) to extend)."""

    num_gpu_tokens: int = 0  # rows of GPU-tier seqs and host-bound prefills
    num_gpu_sampled: int = 0  # of those, rows that sample a token
    prefill_attention_ms: float = 0.0  # per layer, summed over prefill chunks
    gpu_ctx_tokens: int = 0  # context of GPU-tier decode rows
    host_prefill_tokens: int = 0  # prefill rows whose k/v stream to the host tier
    num_host_decodes: int = 0
    host_ctx_tokens: int = 0


@dataclass
class PerfModel:
    profile: Profile
    ewma_alpha: float = 0.2
    scale: dict[Strategy, float] = field(default_factory=lambda: {s: 1.0 for s in Strategy})
    num_observations: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be in (0, 1]")
        shape = self.profile.shape
        nbytes = self.profile.dtype_bytes
        self._qkv_row_bytes = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * nbytes
        self._out_row_bytes = shape.num_heads * shape.head_dim * nbytes
        self._kv_token_bytes = 2 * shape.num_kv_heads * shape.head_dim * nbytes  # one layer

    # -- building shapes --------------------------------------------------------------------
    def prefill_chunk_ms(self, num_computed: int, num_new: int) -> float:
        """Causal attention of a chunk over its own and earlier tokens, per layer: the
        difference of whole-prompt costs (attention work grows with the square of length)."""
        table = self.profile.prefill_attention
        return max(0.0, table.at(num_computed + num_new) - table.at(num_computed))

    def shape_of(self, prefills: Sequence[tuple[int, int]], gpu_decode_ctx: Sequence[int],
                 host_decode_ctx: Sequence[int] = (),
                 host_prefills: Sequence[tuple[int, int]] = ()) -> StepShape:
        """prefills / host_prefills: (num_computed, num_new) chunks; *_ctx: context lengths."""
        shape = StepShape()
        for num_computed, num_new in list(prefills) + list(host_prefills):
            shape.num_gpu_tokens += num_new
            shape.num_gpu_sampled += 1
            shape.prefill_attention_ms += self.prefill_chunk_ms(num_computed, num_new)
        shape.host_prefill_tokens = sum(n for _, n in host_prefills)
        shape.num_gpu_tokens += len(gpu_decode_ctx)
        shape.num_gpu_sampled += len(gpu_decode_ctx)
        shape.gpu_ctx_tokens = sum(gpu_decode_ctx)
        shape.num_host_decodes = len(host_decode_ctx)
        shape.host_ctx_tokens = sum(host_decode_ctx)
        return shape

    def shape_of_seqs(self, gpu_seqs: Sequence[ScheduledSeq],
                      host_prefill_seqs: Sequence[ScheduledSeq] = (),
                      host_decode_seqs: Sequence[ScheduledSeq] = ()) -> StepShape:
        """The shape of a plan's rows (the chooser passes the candidate host rows)."""
        prefills = [(s.num_computed_tokens, s.num_new_tokens) for s in gpu_seqs
                    if not s.is_decode]
        gpu_decode = [s.seq_len for s in gpu_seqs if s.is_decode]
        host_prefills = [(s.num_computed_tokens, s.num_new_tokens) for s in host_prefill_seqs]
        shape = self.shape_of(prefills, gpu_decode, [s.seq_len for s in host_decode_seqs],
                              host_prefills)
        # Mid-prompt chunks compute KV but sample nothing.
        shape.num_gpu_sampled = sum(1 for s in gpu_seqs if s.samples) + \
            sum(1 for s in host_prefill_seqs if s.samples)
        return shape

    def shape_of_plan(self, plan: StepPlan) -> StepShape:
        return self.shape_of_seqs(plan.gpu_seqs, plan.host_prefill_seqs, plan.host_decode_seqs)

    # -- predictions --------------------------------------------------------------------------
    def raw_step_ms(self, strategy: Strategy, shape: StepShape) -> float:
        """Uncorrected step time of `strategy` for `shape` (GPU_ONLY leaves host decodes out)."""
        return StepCosts(self, shape).raw_ms(strategy, shape.num_host_decodes,
                                             shape.host_ctx_tokens)

    def step_costs(self, shape: StepShape) -> StepCosts:
        """The GPU-side costs of shape, cached, for pricing many host-row sets of one step."""
        return StepCosts(self, shape)

    def predict_ms(self, strategy: Strategy, shape: StepShape) -> float:
        return self.raw_step_ms(strategy, shape) * self.scale[strategy]

    def predict_step_ms(self, strategy: Strategy, prefill_lens: Sequence[int],
                        gpu_decode_ctx: Sequence[int],
                        host_decode_ctx: Sequence[int] = ()) -> float:
        """Whole prompts of prefill_lens, decodes with the given context lengths."""
        shape = self.shape_of([(0, n) for n in prefill_lens], gpu_decode_ctx, host_decode_ctx)
        return self.predict_ms(strategy, shape)

    def predict_plan_ms(self, plan: StepPlan) -> float:
        return self.predict_ms(plan.strategy, self.shape_of_plan(plan))

    def pipeline_can_win(self, shape: StepShape) -> bool:
        """NEO's inequality N_G/N_C < 2*T_lin/T_gatt + 3 + T_gatt/T_lin (attention throughputs
        N in context tokens per ms): where it fails, no host set makes the pipeline pay."""
        if shape.num_host_decodes == 0 or shape.host_ctx_tokens == 0:
            return False
        prof = self.profile
        gpu_attention = prof.gpu_attention.at(shape.gpu_ctx_tokens) + shape.prefill_attention_ms
        if shape.gpu_ctx_tokens == 0 or gpu_attention <= 0:
            return True  # no GPU attention to compare with: the bound is unbounded
        linear = prof.linear.at(shape.num_gpu_tokens + shape.num_host_decodes)
        cpu_ms = prof.cpu_attention.at(shape.num_host_decodes, shape.host_ctx_tokens)
        if cpu_ms <= 0:
            return True
        gpu_rate = shape.gpu_ctx_tokens / prof.gpu_attention.at(shape.gpu_ctx_tokens)
        cpu_rate = shape.host_ctx_tokens / cpu_ms
        bound = 2 * linear / gpu_attention + 3 + gpu_attention / linear
        return gpu_rate / cpu_rate < bound

    # -- moving KV between tiers --------------------------------------------------------------
    def copy_ms(self, num_tokens: int, dst_tier: Tier) -> float:
        """One KV move of num_tokens to dst_tier (every layer is its own copy)."""
        link = self.profile.d2h if dst_tier == Tier.HOST else self.profile.h2d
        return self.profile.shape.num_layers * link.ms(num_tokens * self._kv_token_bytes)

    def park_round_trip_ms(self, num_tokens: int) -> float:
        """Evict num_tokens of KV to the host and later bring them back."""
        return self.copy_ms(num_tokens, Tier.HOST) + self.copy_ms(num_tokens, Tier.GPU)

    def recompute_ms(self, num_tokens: int, gpu_decode_ctx: Sequence[int]) -> float:
        """What preempting a request with num_tokens of KV costs when it resumes: prefilling
        them again beside the GPU decodes (T_prefill + T_lin of the extra rows)."""
        if num_tokens <= 0:
            return 0.0
        return self.predict_step_ms(Strategy.GPU_ONLY, [num_tokens], gpu_decode_ctx) - \
            self.predict_step_ms(Strategy.GPU_ONLY, [], gpu_decode_ctx)

    # -- online correction --------------------------------------------------------------------
    def observe(self, strategy: Strategy, predicted_ms: float, measured_ms: float) -> None:
        """Feed one executed step: the scale moves toward measured/raw with weight ewma_alpha,
        so a steady bias disappears after a few tens of steps."""
        if predicted_ms <= 0 or measured_ms <= 0 or not math.isfinite(measured_ms):
            return
        ratio = measured_ms / predicted_ms
        self.scale[strategy] *= (1.0 - self.ewma_alpha) + self.ewma_alpha * ratio
        self.num_observations += 1


class StepCosts:
    """One step's GPU-side costs, computed once; raw_ms prices a host-row set on top of them
    in a few table lookups (the chooser calls it per candidate prefix)."""

    __slots__ = ("model", "num_gpu_tokens", "num_gpu_sampled", "gpu_attention", "kv_stream")

    def __init__(self, model: PerfModel, shape: StepShape) -> None:
        prof = model.profile
        self.model = model
        self.num_gpu_tokens = shape.num_gpu_tokens
        self.num_gpu_sampled = shape.num_gpu_sampled
        self.gpu_attention = prof.gpu_attention.at(shape.gpu_ctx_tokens) + \
            shape.prefill_attention_ms
        # Host-bound prefill KV streams down on the copy stream, beside the compute.
        self.kv_stream = prof.d2h.ms(shape.host_prefill_tokens * model._kv_token_bytes)

    def predict_ms(self, strategy: Strategy, num_host: int, host_ctx_tokens: int) -> float:
        return self.raw_ms(strategy, num_host, host_ctx_tokens) * self.model.scale[strategy]

    def raw_ms(self, strategy: Strategy, num_host: int, host_ctx_tokens: int) -> float:
        """Uncorrected step time with num_host host decodes over host_ctx_tokens of context
        (GPU_ONLY leaves them out)."""
        model, prof = self.model, self.model.profile
        if strategy == Strategy.GPU_ONLY:
            num_host = 0
        if num_host == 0:
            layer = max(prof.linear.at(self.num_gpu_tokens) + self.gpu_attention,
                        self.kv_stream) + prof.layer_launch_ms
            return prof.shape.num_layers * layer + prof.head.at(self.num_gpu_sampled)
        cpu_path = (prof.d2h.ms(num_host * model._qkv_row_bytes)
                    + prof.cpu_attention.at(num_host, host_ctx_tokens)
                    + prof.h2d.ms(num_host * model._out_row_bytes))
        if strategy == Strategy.ASYNC_OVERLAP:
            gpu_path = max(self.gpu_attention, self.kv_stream)
            layer = prof.linear.at(self.num_gpu_tokens + num_host) + max(gpu_path, cpu_path) \
                + prof.layer_launch_ms + prof.layer_sync_ms
        else:
            # Two sub-batches, host rows split between them so each half's CPU attention
            # hides under the other half's GPU work: the period is 2*T_lin + T_gatt.
            half = num_host // 2
            gpu_period = (prof.linear.at(self.num_gpu_tokens + half)
                          + prof.linear.at(num_host - half) + self.gpu_attention)
            layer = max(gpu_period, cpu_path, self.kv_stream) + 2 * prof.layer_launch_ms \
                + prof.layer_sync_ms
        return prof.shape.num_layers * layer + prof.head.at(self.num_gpu_sampled + num_host)
