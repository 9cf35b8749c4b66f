"""Performance-model-driven strategy choosers: ApexChooser (policy apex) and NeoChooser
(policy neo), both implementing chooser.StrategyChooser.

Each iteration ApexChooser predicts tokens/s for GPU_ONLY (host rows sit out), ASYNC_OVERLAP
with the best prefix of the host rows (in the scheduler's order) and, only where NEO's
inequality can hold, ASYMMETRIC_PIPELINE with its best prefix; it picks the highest whose
predicted step stays within the step limit (max_step_stretch x GPU_ONLY's step, or a TPOT
target when one is given). A host row that sat out max_skipped_steps iterations always runs.
The cost is one pass over the rows plus O(log n) predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from apex_grpc.config import EngineConfig, Policy
from apex_grpc.scheduler.chooser import Choice, SimpleChooser, StrategyChooser
from apex_grpc.scheduler.perf_model import PerfModel, StepShape
from apex_grpc.scheduler.plan import ScheduledSeq, Strategy

# Consecutive iterations a host-resident request may sit out before it must run.
DEFAULT_MAX_SKIPPED_STEPS = 8
# Prefixes whose step is within this factor of the cheapest hybrid step count as "free":
# their CPU attention still hides under the GPU's window.
_WINDOW_TOLERANCE = 1.02


@dataclass(frozen=True, slots=True)
class _Option:
    strategy: Strategy
    num_host: int  # rows taken from the ordered host list
    step_ms: float
    tokens_per_ms: float


def _with_host(shape: StepShape, num_host: int, host_ctx_tokens: int) -> StepShape:
    return replace(shape, num_host_decodes=num_host, host_ctx_tokens=host_ctx_tokens)


def _tokens_per_ms(shape: StepShape, num_host: int, step_ms: float) -> float:
    return (shape.num_gpu_sampled + num_host) / step_ms if step_ms > 0 else 0.0


def _split_forced(host_decode_seqs: Sequence[ScheduledSeq], skipped: Mapping[str, int],
                  max_skipped: int) -> list[ScheduledSeq]:
    """Host rows ordered forced-first (sat out max_skipped steps), then the scheduler's order."""
    forced = [s for s in host_decode_seqs if skipped.get(s.request_id, 0) >= max_skipped]
    optional = [s for s in host_decode_seqs if skipped.get(s.request_id, 0) < max_skipped]
    return forced + optional


class ApexChooser:
    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS,
                 target_step_ms: float | None = None) -> None:
        if max_skipped_steps < 0:
            raise ValueError("max_skipped_steps must be >= 0")
        if target_step_ms is not None and target_step_ms <= 0:
            raise ValueError("target_step_ms must be positive")
        self.perf_model = perf_model
        self.config = config
        self.max_skipped_steps = max_skipped_steps
        # A TPOT target: steps up to it are acceptable even past the stretch over GPU_ONLY.
        self.target_step_ms = target_step_ms

    def step_limit_ms(self, gpu_only_ms: float) -> float:
        return max(self.config.max_step_stretch * gpu_only_ms, self.target_step_ms or 0.0)

    def choose(self, gpu_seqs: tuple[ScheduledSeq, ...],
               host_prefill_seqs: tuple[ScheduledSeq, ...],
               host_decode_seqs: tuple[ScheduledSeq, ...],
               num_skipped_steps: Mapping[str, int]) -> Choice:
        model = self.perf_model
        base = model.shape_of_seqs(gpu_seqs, host_prefill_seqs)
        gpu_only_ms = model.predict_ms(Strategy.GPU_ONLY, base)
        if not host_decode_seqs:
            return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)
        ordered = _split_forced(host_decode_seqs, num_skipped_steps, self.max_skipped_steps)
        num_forced = sum(1 for s in host_decode_seqs
                         if num_skipped_steps.get(s.request_id, 0) >= self.max_skipped_steps)
        ctx_prefix = [0]
        for seq in ordered:
            ctx_prefix.append(ctx_prefix[-1] + seq.seq_len)
        limit = self.step_limit_ms(gpu_only_ms)
        options = []
        if num_forced == 0 and base.num_gpu_tokens > 0:
            options.append(_Option(Strategy.GPU_ONLY, 0, gpu_only_ms,
                                   _tokens_per_ms(base, 0, gpu_only_ms)))
        strategies = [Strategy.ASYNC_OVERLAP]
        if model.pipeline_can_win(_with_host(base, len(ordered), ctx_prefix[-1])):
            strategies.append(Strategy.ASYMMETRIC_PIPELINE)
        for strategy in strategies:
            options.append(self._best_prefix(strategy, base, ctx_prefix, num_forced, limit))
        best = options[0]
        for option in options[1:]:
            if option.tokens_per_ms > best.tokens_per_ms:  # ties keep the simpler strategy
                best = option
        chosen = {s.request_id for s in ordered[:best.num_host]}
        rows = tuple(s for s in host_decode_seqs if s.request_id in chosen)
        return Choice(best.strategy, rows, best.step_ms)

    def _best_prefix(self, strategy: Strategy, base: StepShape, ctx_prefix: list[int],
                     num_forced: int, limit_ms: float) -> _Option:
        """The best number of host rows (a prefix, at least the forced ones and one row).

        Step time grows with the prefix; tokens/s first rises while CPU attention hides in
        the GPU window, then moves monotonically (each extra row costs about the same). So the
        best prefix is at the window's edge (either side) or the longest one within the
        limit."""
        model = self.perf_model

        def option(num_host: int) -> _Option:
            shape = _with_host(base, num_host, ctx_prefix[num_host])
            step_ms = model.predict_ms(strategy, shape)
            return _Option(strategy, num_host, step_ms, _tokens_per_ms(shape, num_host, step_ms))

        num_rows = len(ctx_prefix) - 1
        low = option(max(1, num_forced))
        longest = self._last_within(option, low.num_host, num_rows, limit_ms)
        window_ms = min(limit_ms, low.step_ms * _WINDOW_TOLERANCE)
        window_edge = self._last_within(option, low.num_host, longest.num_host, window_ms)
        candidates = [window_edge, longest]
        if window_edge.num_host < longest.num_host:
            # Past the kink the step grows with every row, yet the first row past it can
            # still fill the rest of the window.
            candidates.append(option(window_edge.num_host + 1))
        best = low
        for candidate in candidates:
            if candidate.tokens_per_ms > best.tokens_per_ms:
                best = candidate
        return best

    @staticmethod
    def _last_within(option, low: int, high: int, limit_ms: float) -> _Option:
        """Binary search for the largest prefix in [low, high] whose step fits limit_ms
        (option(low) when none does: forced rows run regardless)."""
        best = option(low)
        if best.step_ms > limit_ms:
            return best
        while low < high:
            mid = (low + high + 1) // 2
            candidate = option(mid)
            if candidate.step_ms <= limit_ms:
                low, best = mid, candidate
            else:
                high = mid - 1
        return best

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_decode_ctx: Sequence[int],
                       new_ctx_len: int) -> bool:
        """Bandwidth-aware admission: True while one more host-resident request of
        new_ctx_len context still lets every host row run within the step limit."""
        model = self.perf_model
        base = model.shape_of([], gpu_decode_ctx)
        limit = self.step_limit_ms(model.predict_ms(Strategy.GPU_ONLY, base))
        shape = _with_host(base, len(host_decode_ctx) + 1, sum(host_decode_ctx) + new_ctx_len)
        return min(model.predict_ms(Strategy.ASYNC_OVERLAP, shape),
                   model.predict_ms(Strategy.ASYMMETRIC_PIPELINE, shape)) <= limit


class NeoChooser:
    """NEO's rule: pipeline all host rows when the model says that beats GPU_ONLY; otherwise
    GPU_ONLY with host rows waiting, until one has waited max_skipped_steps (then pipeline)."""

    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS) -> None:
        self.perf_model = perf_model
        self.config = config
        self.max_skipped_steps = max_skipped_steps

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_decode_ctx: Sequence[int],
                       new_ctx_len: int) -> bool:
        return True  # NEO offloads whatever the host tier can hold

    def choose(self, gpu_seqs: tuple[ScheduledSeq, ...],
               host_prefill_seqs: tuple[ScheduledSeq, ...],
               host_decode_seqs: tuple[ScheduledSeq, ...],
               num_skipped_steps: Mapping[str, int]) -> Choice:
        model = self.perf_model
        base = model.shape_of_seqs(gpu_seqs, host_prefill_seqs)
        gpu_only_ms = model.predict_ms(Strategy.GPU_ONLY, base)
        if not host_decode_seqs:
            return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)
        full = model.shape_of_seqs(gpu_seqs, host_prefill_seqs, host_decode_seqs)
        pipeline_ms = model.predict_ms(Strategy.ASYMMETRIC_PIPELINE, full)
        starving = any(num_skipped_steps.get(s.request_id, 0) >= self.max_skipped_steps
                       for s in host_decode_seqs)
        pipeline_wins = _tokens_per_ms(full, len(host_decode_seqs), pipeline_ms) > \
            _tokens_per_ms(base, 0, gpu_only_ms)
        if starving or pipeline_wins or base.num_gpu_tokens == 0:
            return Choice(Strategy.ASYMMETRIC_PIPELINE, host_decode_seqs, pipeline_ms)
        return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)


# Share of the TPOT target apex lets a decode step take: prefill steps run longer, and a
# request's TPOT averages over both.
TARGET_STEP_FRACTION = 0.85


def make_chooser(policy: Policy, model: PerfModel, config: EngineConfig,
                 tpot_slo_ms: float | None) -> StrategyChooser:
    """The chooser of each policy over a performance model (gpu-only needs none)."""
    if policy == Policy.GPU_ONLY:
        return SimpleChooser(Policy.GPU_ONLY)
    if policy == Policy.NEO:
        return NeoChooser(model, config)
    target = tpot_slo_ms * TARGET_STEP_FRACTION if tpot_slo_ms else None
    return ApexChooser(model, config, target_step_ms=target)
