"""Performance-model-driven strategy choosers: ApexChooser (policy apex) and NeoChooser
(policy neo), both implementing chooser.StrategyChooser.

Each iteration ApexChooser predicts tokens/s for GPU_ONLY (host rows sit out), ASYNC_OVERLAP
with a prefix of the host rows (longest-waiting first) and, only where NEO's inequality can
hold, ASYMMETRIC_PIPELINE with its prefix, under a step limit (max_step_stretch x GPU_ONLY's
step, or a TPOT target when one is given). Without a target it picks the highest tokens/s;
with one it serves as many host rows as fit (a skipped step adds a whole step to that row's
TPOT). A host row that sat out max_skipped_steps iterations always runs. choose() costs one
pass over the rows (a stable sort on capped waits, prefix sums of contexts) plus O(log n)
predictions on one step's cached GPU-side costs.

Which requests reach the host tier at all (bandwidth-aware admission, parking) is the host
gate's decision (host_gate.py), fed by the same performance model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Sequence

from apex_grpc.config import EngineConfig, Policy
from apex_grpc.perf.perf_model import PerfModel, StepCosts, StepShape
from apex_grpc.scheduler.chooser import Choice, HostDecode, SimpleChooser, StrategyChooser
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


def check_step_limits(max_skipped_steps: int, target_step_ms: float | None) -> None:
    """The bounds the APEX chooser and its host gate share: the skip bound and the TPOT-derived
    step target."""
    if max_skipped_steps < 0:
        raise ValueError("max_skipped_steps must be >= 0")
    if target_step_ms is not None and target_step_ms <= 0:
        raise ValueError("target_step_ms must be positive")


def with_host(shape: StepShape, num_host: int, host_ctx_tokens: int) -> StepShape:
    return replace(shape, num_host_decodes=num_host, host_ctx_tokens=host_ctx_tokens)


def _tokens_per_ms(shape: StepShape, num_host: int, step_ms: float) -> float:
    return (shape.num_gpu_sampled + num_host) / step_ms if step_ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class _ServiceOrder:
    """Host rows (indices) in the order they get a CPU slot: forced rows (sat out
    max_skipped steps), then rows admitted to the host tier, then parked rows; each group
    longest-waiting first, then in the scheduler's order (oldest first; the sort is stable)."""

    order: list[int]
    num_forced: int
    num_admitted: int  # order[:num_admitted] are the forced and the admitted rows


def _order_for_service(host_decodes: Sequence[HostDecode], max_skipped: int) -> _ServiceOrder:
    waits = [h.num_skipped_steps for h in host_decodes]
    if max(waits) > max_skipped:
        waits = [min(w, max_skipped) for w in waits]  # all forced rows rank alike
    num_forced = waits.count(max_skipped)
    if any(h.parked for h in host_decodes):
        # Disjoint ranks: forced above admitted (max_skipped+1+wait) above parked (wait).
        ranks = [w + (max_skipped + 1) * (w == max_skipped or not h.parked)
                 for h, w in zip(host_decodes, waits)]
        num_admitted = sum(1 for r in ranks if r > max_skipped)
    else:
        ranks, num_admitted = waits, len(waits)
    order = sorted(range(len(ranks)), key=ranks.__getitem__, reverse=True)
    return _ServiceOrder(order, num_forced, num_admitted)


class _Prefixes:
    """Prices the first n host rows of the service order under one strategy: one step's
    cached GPU costs plus prefix sums of the host contexts, so each candidate is a few table
    lookups (memoised: the searches revisit their bounds)."""

    def __init__(self, strategy: Strategy, costs: StepCosts, num_gpu_sampled: int,
                 ctx_prefix: list[int]) -> None:
        self.strategy = strategy
        self.costs = costs
        self.num_gpu_sampled = num_gpu_sampled
        self.ctx_prefix = ctx_prefix  # ctx_prefix[n]: context tokens of the first n rows
        self._seen: dict[int, _Option] = {}

    @property
    def num_rows(self) -> int:
        return len(self.ctx_prefix) - 1

    def option(self, num_host: int) -> _Option:
        found = self._seen.get(num_host)
        if found is None:
            step_ms = self.costs.predict_ms(self.strategy, num_host, self.ctx_prefix[num_host])
            tokens_per_ms = (self.num_gpu_sampled + num_host) / step_ms if step_ms > 0 else 0.0
            found = _Option(self.strategy, num_host, step_ms, tokens_per_ms)
            self._seen[num_host] = found
        return found

    def last_within(self, low: int, high: int, limit_ms: float) -> _Option:
        """The largest prefix in [low, high] whose step fits limit_ms (option(low) when none
        does: forced rows run regardless). Galloping from low, then bisecting: the answer is
        usually a few rows past low, so this probes O(log answer) prefixes."""
        best = self.option(low)
        if best.step_ms > limit_ms:
            return best
        fits, fails, stride = low, high + 1, 1
        while fits + stride < fails:
            candidate = self.option(fits + stride)
            if candidate.step_ms > limit_ms:
                fails = fits + stride
                break
            fits, best, stride = fits + stride, candidate, 2 * stride
        while fails - fits > 1:
            mid = (fits + fails) // 2
            candidate = self.option(mid)
            if candidate.step_ms <= limit_ms:
                fits, best = mid, candidate
            else:
                fails = mid
        return best


class ApexChooser:
    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS,
                 target_step_ms: float | None = None) -> None:
        check_step_limits(max_skipped_steps, target_step_ms)
        self.perf_model = perf_model
        self.config = config
        self.max_skipped_steps = max_skipped_steps
        # A TPOT target: steps up to it are acceptable even past the stretch over GPU_ONLY.
        self.target_step_ms = target_step_ms

    def step_limit_ms(self, gpu_only_ms: float) -> float:
        return max(self.config.max_step_stretch * gpu_only_ms, self.target_step_ms or 0.0)

    def choose(self, gpu_seqs: Sequence[ScheduledSeq],
               host_decodes: Sequence[HostDecode]) -> Choice:
        model = self.perf_model
        base = model.shape_of_seqs(gpu_seqs)
        costs = model.step_costs(base)
        gpu_only_ms = costs.predict_ms(Strategy.GPU_ONLY, 0, 0)
        if not host_decodes:
            return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)
        service = _order_for_service(host_decodes, self.max_skipped_steps)
        ctx_prefix = list(accumulate([host_decodes[i].ctx_len for i in service.order],
                                     initial=0))
        limit = self.step_limit_ms(gpu_only_ms)
        strategies = [Strategy.ASYNC_OVERLAP]
        if model.pipeline_can_win(with_host(base, len(host_decodes), ctx_prefix[-1])):
            strategies.append(Strategy.ASYMMETRIC_PIPELINE)
        hybrid = [self._best_prefix(_Prefixes(s, costs, base.num_gpu_sampled, ctx_prefix),
                                    service, limit) for s in strategies]
        gpu_only = _Option(Strategy.GPU_ONLY, 0, gpu_only_ms, _tokens_per_ms(base, 0, gpu_only_ms))
        best = self._pick(gpu_only, hybrid, service, base.num_gpu_tokens > 0, limit)
        rows = tuple(host_decodes[i] for i in sorted(service.order[:best.num_host]))
        return Choice(best.strategy, rows, best.step_ms)

    def _pick(self, gpu_only: _Option, hybrid: list[_Option], service: _ServiceOrder,
              has_gpu_rows: bool, limit_ms: float) -> _Option:
        """Without a TPOT target: the highest tokens/s (ties keep the simpler strategy).
        With one, every skipped step adds a whole step to a host row's TPOT, and admission
        already decided that admitted rows pay: serve the most host rows within the limit,
        and sit them all out only when not even one fits. Parked rows alone (admission said
        they do not pay every step) run only where they raise tokens/s, or when forced."""
        must_run = service.num_forced > 0 or not has_gpu_rows
        if self.target_step_ms is not None and (must_run or service.num_admitted > 0):
            fitting = [o for o in hybrid
                       if o.step_ms <= limit_ms or o.num_host == service.num_forced]
            if fitting or must_run:
                return max(fitting or hybrid, key=lambda o: (o.num_host, o.tokens_per_ms))
            return gpu_only
        best = hybrid[0] if must_run else gpu_only
        for option in hybrid:
            if option.tokens_per_ms > best.tokens_per_ms and option.step_ms <= limit_ms:
                best = option
        return best

    def _best_prefix(self, prefixes: _Prefixes, service: _ServiceOrder,
                     limit_ms: float) -> _Option:
        """The best number of host rows (a prefix, at least the forced ones and one row).

        Step time grows with the prefix; tokens/s first rises while CPU attention hides in
        the GPU window, then moves monotonically (each extra row costs about the same). So the
        best prefix is at the window's edge (either side) or the longest one within the
        limit. Under a TPOT target: the most admitted rows that fit, then parked rows only
        while they hide in the window."""
        low = prefixes.option(max(1, service.num_forced))
        if self.target_step_ms is not None:
            high = max(low.num_host, service.num_admitted)
            served = prefixes.last_within(low.num_host, high, limit_ms)
            if served.num_host < high or high == prefixes.num_rows:
                return served  # the limit stopped it, or no parked rows are left to add
            window_ms = min(limit_ms, served.step_ms * _WINDOW_TOLERANCE)
            filled = prefixes.last_within(served.num_host, prefixes.num_rows, window_ms)
            return filled if filled.tokens_per_ms >= served.tokens_per_ms else served
        longest = prefixes.last_within(low.num_host, prefixes.num_rows, limit_ms)
        window_ms = min(limit_ms, low.step_ms * _WINDOW_TOLERANCE)
        window_edge = prefixes.last_within(low.num_host, longest.num_host, window_ms)
        candidates = [window_edge, longest]
        if window_edge.num_host < longest.num_host:
            # Past the kink the step grows with every row, yet the first row past it can
            # still fill the rest of the window.
            candidates.append(prefixes.option(window_edge.num_host + 1))
        best = low
        for candidate in candidates:
            if candidate.tokens_per_ms > best.tokens_per_ms:
                best = candidate
        return best


class NeoChooser:
    """NEO's rule: pipeline all host rows when the model says that beats GPU_ONLY; otherwise
    GPU_ONLY with host rows waiting, until one has waited max_skipped_steps (then pipeline)."""

    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS) -> None:
        self.perf_model = perf_model
        self.config = config
        self.max_skipped_steps = max_skipped_steps

    def choose(self, gpu_seqs: Sequence[ScheduledSeq],
               host_decodes: Sequence[HostDecode]) -> Choice:
        model = self.perf_model
        base = model.shape_of_seqs(gpu_seqs)
        gpu_only_ms = model.predict_ms(Strategy.GPU_ONLY, base)
        if not host_decodes:
            return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)
        full = with_host(base, len(host_decodes), sum(h.ctx_len for h in host_decodes))
        pipeline_ms = model.predict_ms(Strategy.ASYMMETRIC_PIPELINE, full)
        starving = any(h.num_skipped_steps >= self.max_skipped_steps for h in host_decodes)
        pipeline_wins = _tokens_per_ms(full, len(host_decodes), pipeline_ms) > \
            _tokens_per_ms(base, 0, gpu_only_ms)
        if starving or pipeline_wins or base.num_gpu_tokens == 0:
            return Choice(Strategy.ASYMMETRIC_PIPELINE, tuple(host_decodes), pipeline_ms)
        return Choice(Strategy.GPU_ONLY, (), gpu_only_ms)


# Share of the TPOT target apex lets a decode step take: prefill steps run longer, and a
# request's TPOT averages over both.
TARGET_STEP_FRACTION = 0.85


def target_step_ms(tpot_slo_ms: float | None) -> float | None:
    """The decode step apex aims for under a TPOT target (its chooser and host gate)."""
    return tpot_slo_ms * TARGET_STEP_FRACTION if tpot_slo_ms else None


def make_chooser(policy: Policy, model: PerfModel, config: EngineConfig,
                 tpot_slo_ms: float | None) -> StrategyChooser:
    """The chooser of each policy over a performance model (gpu-only needs none)."""
    if policy == Policy.GPU_ONLY:
        return SimpleChooser(Policy.GPU_ONLY)
    if policy == Policy.NEO:
        return NeoChooser(model, config)
    return ApexChooser(model, config, target_step_ms=target_step_ms(tpot_slo_ms))
