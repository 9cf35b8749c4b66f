"""The synchronous engine core: step() = schedule -> execute -> update, then outputs.

Owned by the engine thread. Scheduler.update applies the sampled tokens and token-level stops;
the OutputProcessor turns them into RequestOutputs (text, stop strings, usage). The core adds
what is engine-level: requests' seeded generators, time limits, aborts, step faults, the step
counters and the performance model's online correction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from apex_grpc.config import EngineConfig
from apex_grpc.engine.output_processor import OutputProcessor
from apex_grpc.engine.protocol import EngineStats
from apex_grpc.perf.perf_model import PerfModel
from apex_grpc.request import FinishReason, Request, RequestOutput, Tier
from apex_grpc.runner.model_runner import ModelRunner
from apex_grpc.scheduler.plan import Strategy
from apex_grpc.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class _Counters:
    aborted: int = 0
    steps: dict[Strategy, int] = field(default_factory=lambda: {s: 0 for s in Strategy})
    last_predicted_ms: float = 0.0
    last_measured_ms: float = 0.0


class EngineCore:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: ModelRunner,
                 tokenizer, device: torch.device, perf_model: PerfModel | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.device = device
        self.perf_model = perf_model  # predicts each plan; fed measured step times
        self.outputs = OutputProcessor(scheduler, tokenizer)
        self.counters = _Counters()

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.outputs:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        if req.sampling.seed is not None and not req.sampling.is_greedy:
            req.generator = torch.Generator(self.device).manual_seed(req.sampling.seed)
        self.outputs.add_request(req)
        # Only a fully set-up request enters the scheduler: every scheduled id has its output
        # state.
        self.scheduler.add_request(req)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORTED,
              error: str = "") -> RequestOutput | None:
        out = self.outputs.finish(request_id, reason, error)
        if out is not None:
            self.counters.aborted += reason == FinishReason.ABORTED
        return out

    def expire_waiting(self, now: float) -> list[RequestOutput]:
        """Requests whose client deadline passed while queued leave without being prefilled."""
        expired = [r for r in self.scheduler.waiting
                   if r.deadline is not None and r.deadline <= now]
        return [o for r in expired if (o := self.abort(r.request_id)) is not None]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        start = time.perf_counter()
        try:
            result = self.runner.execute(plan)
        except Exception as exc:  # an engine fault fails this step's requests, not the server
            # Requests moved between tiers this step may hold uncopied KV: fail them too.
            failed = dict.fromkeys([s.request_id for s in plan.all_seqs] +
                                   [m.request_id for m in plan.moves])
            log.exception("step failed; failing %d requests", len(failed))
            return [o for rid in failed
                    if (o := self.abort(rid, FinishReason.ERROR, repr(exc))) is not None]
        measured_ms = (time.perf_counter() - start) * 1e3
        self.counters.last_measured_ms = measured_ms
        if not plan.is_empty:
            self.counters.steps[plan.strategy] += 1
            if self.perf_model is not None:
                predicted_ms = self.perf_model.predict_plan_ms(plan)
                self.counters.last_predicted_ms = predicted_ms
                self.perf_model.observe(plan.strategy, predicted_ms, measured_ms)
        now = time.monotonic()
        outputs = self.outputs.process(self.scheduler.update(plan, result.sampled),
                                       result.logprobs, now)
        for req in self.outputs.requests:  # time limits also bind queued requests
            limit = req.stopping.time_limit_ms
            if limit is not None and (now - req.arrival_time) * 1e3 >= limit:
                outputs.append(self.outputs.finish(req.request_id, FinishReason.TIME_LIMIT,
                                                   release_text=True))
        return outputs

    def close(self) -> None:
        """Release the native CPU attention pool (its worker threads)."""
        self.runner.close()

    # -- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        sched, kv, c = self.scheduler, self.scheduler.kv, self.counters
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_host_resident=sched.num_host_resident(),
            gpu_kv_used_blocks=kv.used_blocks(Tier.GPU),
            gpu_kv_total_blocks=kv.total_blocks(Tier.GPU),
            host_kv_used_blocks=kv.used_blocks(Tier.HOST),
            host_kv_total_blocks=kv.total_blocks(Tier.HOST),
            preemptions_total=sched.num_preemptions,
            evictions_total=sched.num_evictions,
            restores_total=sched.num_restores,
            prompt_tokens_total=self.outputs.num_prompt_tokens,
            generation_tokens_total=self.outputs.num_generation_tokens,
            steps_gpu_only=c.steps[Strategy.GPU_ONLY],
            steps_async_overlap=c.steps[Strategy.ASYNC_OVERLAP],
            steps_asymmetric_pipeline=c.steps[Strategy.ASYMMETRIC_PIPELINE],
            steps_graphed=self.runner.decode_graphs.replays if self.runner.decode_graphs else 0,
            last_step_predicted_ms=c.last_predicted_ms,
            last_step_measured_ms=c.last_measured_ms,
            requests_finished_total=self.outputs.num_finished,
            requests_aborted_total=c.aborted,
        )
