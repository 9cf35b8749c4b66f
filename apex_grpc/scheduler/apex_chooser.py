"""Performance-model-driven strategy choosers: ApexChooser (policy apex) and NeoChooser
(policy neo), both implementing chooser.StrategyChooser.

Each iteration ApexChooser predicts tokens/s for GPU_ONLY (host rows sit out), ASYNC_OVERLAP
with a prefix of the host rows (longest-waiting first) and, only where NEO's inequality can
hold, ASYMMETRIC_PIPELINE with its prefix, under a step limit (max_step_stretch x GPU_ONLY's
step, or a TPOT target when one is given). Without a target it picks the highest tokens/s;
with one it serves as many host rows as fit (a skipped step adds a whole step to that row's
TPOT). A host row that sat out max_skipped_steps iterations always runs.

admits_to_host gates the host tier (admission and eviction): a row joins only if the step
stays within the limit at the host rows' final lengths and the row does not lower predicted
tokens/s. Where hybrid execution does not pay, nothing reaches the host tier and apex
schedules exactly as gpu-only does. The cost is one pass over the rows plus O(log n)
predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from apex_grpc.config import EngineConfig, Policy
from apex_grpc.scheduler.chooser import Choice, HostRow, SimpleChooser, StrategyChooser
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


def _order_for_service(host_decode_seqs: Sequence[ScheduledSeq], skipped: Mapping[str, int],
                       max_skipped: int) -> list[ScheduledSeq]:
    """Host rows in the order they get a CPU slot: those that sat out max_skipped steps
    (forced) first, then the longest-waiting, then the scheduler's order (oldest first)."""
    def waited(seq: ScheduledSeq) -> int:
        return min(skipped.get(seq.request_id, 0), max_skipped)
    return sorted(host_decode_seqs, key=lambda s: -waited(s))


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
        ordered = _order_for_service(host_decode_seqs, num_skipped_steps, self.max_skipped_steps)
        num_forced = sum(1 for s in host_decode_seqs
                         if num_skipped_steps.get(s.request_id, 0) >= self.max_skipped_steps)
        ctx_prefix = [0]
        for seq in ordered:
            ctx_prefix.append(ctx_prefix[-1] + seq.seq_len)
        limit = self.step_limit_ms(gpu_only_ms)
        strategies = [Strategy.ASYNC_OVERLAP]
        if model.pipeline_can_win(_with_host(base, len(ordered), ctx_prefix[-1])):
            strategies.append(Strategy.ASYMMETRIC_PIPELINE)
        hybrid = [self._best_prefix(s, base, ctx_prefix, num_forced, limit) for s in strategies]
        gpu_only = _Option(Strategy.GPU_ONLY, 0, gpu_only_ms, _tokens_per_ms(base, 0, gpu_only_ms))
        best = self._pick(gpu_only, hybrid, num_forced, base.num_gpu_tokens > 0, limit)
        chosen = {s.request_id for s in ordered[:best.num_host]}
        rows = tuple(s for s in host_decode_seqs if s.request_id in chosen)
        return Choice(best.strategy, rows, best.step_ms)

    def _pick(self, gpu_only: _Option, hybrid: list[_Option], num_forced: int,
              has_gpu_rows: bool, limit_ms: float) -> _Option:
        """Without a TPOT target: the highest tokens/s (ties keep the simpler strategy).
        With one, every skipped step adds a whole step to a host row's TPOT, and admission
        already decided that these rows pay: serve the most host rows within the limit, and
        sit them all out only when not even one fits."""
        if self.target_step_ms is not None:
            fitting = [o for o in hybrid if o.step_ms <= limit_ms or o.num_host == num_forced]
            if fitting or num_forced > 0 or not has_gpu_rows:
                candidates = fitting or hybrid
                return max(candidates, key=lambda o: (o.num_host, o.tokens_per_ms))
            return gpu_only
        best = gpu_only if num_forced == 0 and has_gpu_rows else hybrid[0]
        for option in hybrid:
            if option.tokens_per_ms > best.tokens_per_ms:
                best = option
        return best

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
        if self.target_step_ms is not None:
            return longest  # see _pick: under a TPOT target, serve as many rows as fit
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

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
        """Bandwidth-aware admission, every host row running: (a) with all host rows at
        their final length the step stays within the admission limit (TPOT for the rest of
        their lives), and (b) at their mean remaining length the extra row does not lower
        predicted tokens/s. (b) keeps apex at least as good as GPU_ONLY: a row that does not
        pay waits (new request) or is preempted by recompute (evicted decode), as under
        GPU_ONLY."""
        model = self.perf_model
        base = model.shape_of([], gpu_decode_ctx)
        gpu_only_ms = model.predict_ms(Strategy.GPU_ONLY, base)
        rows = list(host_rows) + [new_row]
        worst_ms = self._hybrid_ms(base, len(rows), sum(r.final_ctx_len for r in rows))
        if worst_ms > self.admission_limit_ms(gpu_only_ms):
            return False
        before_ms = gpu_only_ms
        if host_rows:
            before_ms = self._hybrid_ms(base, len(host_rows),
                                        sum(r.mean_ctx_len for r in host_rows))
        after_ms = self._hybrid_ms(base, len(rows), sum(r.mean_ctx_len for r in rows))
        num_rows = len(gpu_decode_ctx) + len(host_rows)
        # The row pays when its extra step time is at most what one token costs now, plus,
        # for an evicted decode, the recompute that preemption would cost, spread over the
        # tokens it has left.
        allowance_ms = before_ms / num_rows if num_rows else math.inf
        if new_row.num_recompute_tokens:
            num_left = max(1, 2 * (new_row.final_ctx_len - new_row.mean_ctx_len))
            recompute_ms = model.predict_step_ms(
                Strategy.GPU_ONLY, [new_row.num_recompute_tokens], gpu_decode_ctx) - gpu_only_ms
            allowance_ms += recompute_ms / num_left
        return after_ms - before_ms <= allowance_ms

    def admission_limit_ms(self, gpu_only_ms: float) -> float:
        """The step a decode-only batch may take once host rows join: the TPOT target's step
        when one is given (never stretched past it), else max_step_stretch x GPU_ONLY."""
        if self.target_step_ms is not None:
            return self.target_step_ms
        return self.config.max_step_stretch * gpu_only_ms

    def _hybrid_ms(self, base: StepShape, num_host: int, host_ctx_tokens: int) -> float:
        """The faster hybrid step with every host row running (the pipeline only where its
        inequality can hold)."""
        shape = _with_host(base, num_host, host_ctx_tokens)
        step_ms = self.perf_model.predict_ms(Strategy.ASYNC_OVERLAP, shape)
        if self.perf_model.pipeline_can_win(shape):
            step_ms = min(step_ms, self.perf_model.predict_ms(Strategy.ASYMMETRIC_PIPELINE,
                                                              shape))
        return step_ms


class NeoChooser:
    """NEO's rule: pipeline all host rows when the model says that beats GPU_ONLY; otherwise
    GPU_ONLY with host rows waiting, until one has waited max_skipped_steps (then pipeline)."""

    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS) -> None:
        self.perf_model = perf_model
        self.config = config
        self.max_skipped_steps = max_skipped_steps

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
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
