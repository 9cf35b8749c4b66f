"""ApexHostGate (policy apex): which requests may use the host tier, from the performance
model. It implements chooser.HostTierGate.

admits_to_host gates the host tier (admission and eviction): a row joins only if the step
stays within the limit at the host rows' final lengths and the row does not lower predicted
tokens/s. Where hybrid execution does not pay, nothing reaches the host tier and apex
schedules exactly as gpu-only does. parks_on_host decides, for an evicted decode the CPU
cannot carry every step, between parking it on the host (KV copied there and back) and
preemption by recompute, by the predicted cost of each. gpu-only and neo have no gate: the
host tier's capacity is their only limit.
"""

from __future__ import annotations

import math
from typing import Sequence

from apex_grpc.config import EngineConfig, Policy
from apex_grpc.perf.perf_model import PerfModel, StepShape
from apex_grpc.scheduler.apex_chooser import (DEFAULT_MAX_SKIPPED_STEPS, check_step_limits,
                                              target_step_ms, with_host)
from apex_grpc.scheduler.chooser import HostRow
from apex_grpc.scheduler.plan import Strategy


class ApexHostGate:
    def __init__(self, perf_model: PerfModel, config: EngineConfig,
                 max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS,
                 target_step_ms: float | None = None) -> None:
        check_step_limits(max_skipped_steps, target_step_ms)
        self.perf_model = perf_model
        self.config = config
        # A parked row is forced to run once per max_skipped_steps + 1 steps (the chooser's
        # bound): each forced run is a cost of parking.
        self.max_skipped_steps = max_skipped_steps
        self.target_step_ms = target_step_ms

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
        """Bandwidth-aware admission, every host row running: (a) with all host rows at
        their final length the step stays within the admission limit (TPOT for the rest of
        their lives), and (b) at their mean remaining length the extra row does not lower
        predicted tokens/s. (b) keeps apex at least as good as GPU_ONLY: a row that does not
        pay waits (new request), or is parked or preempted (evicted decode, parks_on_host)."""
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
            allowance_ms += model.recompute_ms(new_row.num_recompute_tokens,
                                               gpu_decode_ctx) / num_left
        return after_ms - before_ms <= allowance_ms

    def parks_on_host(self, gpu_decode_ctx: Sequence[int], num_kv_tokens: int,
                      num_park_steps: int, num_parked_together: int) -> bool:
        """Swap instead of recompute: a GPU decode that must leave and that the CPU cannot
        carry every step is parked on the host (served when a step has room, restored when
        the GPU has) when parking is predicted cheaper than prefilling it again beside the GPU
        decodes. Parking costs the copy out and back plus one forced CPU run per wait bound
        over the num_park_steps it expects to wait; a forced run costs its share of the extra
        step time of the rows forced with it (num_parked_together, this one included, spread
        over the bound). A slow CPU or a long wait keeps the GPU_ONLY choice (preemption)."""
        model = self.perf_model
        base = model.shape_of([], gpu_decode_ctx)
        num_per_step = -(-max(1, num_parked_together) // (self.max_skipped_steps + 1))
        forced_ms = self._hybrid_ms(base, num_per_step, num_per_step * (num_kv_tokens + 1)) - \
            model.predict_ms(Strategy.GPU_ONLY, base)
        num_forced_runs = num_park_steps // (self.max_skipped_steps + 1)
        park_ms = model.park_round_trip_ms(num_kv_tokens) + \
            num_forced_runs * max(0.0, forced_ms) / num_per_step
        return park_ms < model.recompute_ms(num_kv_tokens, gpu_decode_ctx)

    def admission_limit_ms(self, gpu_only_ms: float) -> float:
        """The step a decode-only batch may take once host rows join: the TPOT target's step
        when one is given (never stretched past it), else max_step_stretch x GPU_ONLY."""
        if self.target_step_ms is not None:
            return self.target_step_ms
        return self.config.max_step_stretch * gpu_only_ms

    def _hybrid_ms(self, base: StepShape, num_host: int, host_ctx_tokens: int) -> float:
        """The faster hybrid step with every host row running (the pipeline only where its
        inequality can hold)."""
        costs = self.perf_model.step_costs(base)
        step_ms = costs.predict_ms(Strategy.ASYNC_OVERLAP, num_host, host_ctx_tokens)
        if self.perf_model.pipeline_can_win(with_host(base, num_host, host_ctx_tokens)):
            step_ms = min(step_ms, costs.predict_ms(Strategy.ASYMMETRIC_PIPELINE, num_host,
                                                    host_ctx_tokens))
        return step_ms




def make_host_gate(policy: Policy, model: PerfModel, config: EngineConfig,
                   tpot_slo_ms: float | None) -> ApexHostGate | None:
    """apex's gate over a performance model; the other policies take what the tier holds."""
    if policy != Policy.APEX:
        return None
    return ApexHostGate(model, config, target_step_ms=target_step_ms(tpot_slo_ms))
