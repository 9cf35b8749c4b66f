"""The synchronous engine core: step() = schedule -> execute -> update.

Owned by the engine thread. It turns sampled tokens into RequestOutputs: incremental
detokenization, stop conditions (EOS, stop ids, stop strings, lengths, context, time limit),
usage and timing, and frees finished requests' KV blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from apex_grpc.config import EngineConfig
from apex_grpc.engine.protocol import EngineStats
from apex_grpc.request import FinishReason, Request, RequestOutput, TokenLogprob, Tier
from apex_grpc.runner.model_runner import ModelRunner, SamplingInput
from apex_grpc.perf.perf_model import PerfModel
from apex_grpc.scheduler.plan import Strategy
from apex_grpc.scheduler.scheduler import Scheduler
from apex_grpc.stopping import StopStringMatcher

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """Per-request output state kept beside the scheduler's Request."""

    req: Request
    detokenizer: object | None  # tokenizer.IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None
    generator: torch.Generator | None


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    steps: dict[Strategy, int] = field(default_factory=lambda: {s: 0 for s in Strategy})
    last_predicted_ms: float = 0.0
    last_measured_ms: float = 0.0


class EngineCore:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: ModelRunner,
                 tokenizer, eos_token_ids: tuple[int, ...], device: torch.device,
                 perf_model: PerfModel | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.perf_model = perf_model  # fed measured step times (online correction)
        self.tracked: dict[str, _Tracked] = {}
        self.counters = _Counters()

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.tracked:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        generator = None
        if req.sampling.seed is not None and not req.sampling.is_greedy:
            generator = torch.Generator(self.device).manual_seed(req.sampling.seed)
        stop_strings = req.stopping.stop_strings
        tracked = _Tracked(
            req=req,
            detokenizer=self.tokenizer.new_detokenizer(req.prompt_ids) if self.tokenizer else None,
            stop_matcher=StopStringMatcher(stop_strings, req.stopping.include_stop_strings)
            if stop_strings else None,
            generator=generator,
        )
        # Only a fully set-up request enters the scheduler: every scheduled id is tracked.
        self.scheduler.add_request(req)
        self.tracked[req.request_id] = tracked

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORTED,
              error: str = "") -> RequestOutput | None:
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return None
        self.counters.aborted += reason == FinishReason.ABORTED
        return self._finish(tracked, reason, text="", new_ids=[], logprobs=[], error=error)

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
        sampling = {s.request_id: self._sampling_input(s.request_id)
                    for s in plan.all_seqs if s.samples}
        try:
            result = self.runner.execute(plan, sampling)
        except Exception as exc:  # an engine fault fails this step's requests, not the server
            # Requests moved between tiers this step may hold uncopied KV: fail them too.
            failed = dict.fromkeys([s.request_id for s in plan.all_seqs] +
                                   [m.request_id for m in plan.moves])
            log.exception("step failed; failing %d requests", len(failed))
            return [o for rid in failed
                    if (o := self.abort(rid, FinishReason.ERROR, repr(exc))) is not None]
        measured_ms = (time.perf_counter() - start) * 1e3
        self.counters.last_measured_ms = measured_ms
        self.counters.last_predicted_ms = plan.predicted_step_ms
        if not plan.is_empty:
            self.counters.steps[plan.strategy] += 1
            if self.perf_model is not None:
                self.perf_model.observe(plan.strategy, plan.predicted_step_ms, measured_ms)
        now = time.monotonic()
        outputs = []
        for req in self.scheduler.record_step(plan, result.sampled):
            outputs.append(self._after_token(self.tracked[req.request_id],
                                             result.logprobs.get(req.request_id), now))
        for tracked in list(self.tracked.values()):  # time limits also bind queued requests
            limit = tracked.req.stopping.time_limit_ms
            if limit is not None and (now - tracked.req.arrival_time) * 1e3 >= limit:
                outputs.append(self._finish_with_flush(tracked, FinishReason.TIME_LIMIT, [], []))
        return outputs

    def _sampling_input(self, request_id: str) -> SamplingInput:
        tracked = self.tracked[request_id]
        params = tracked.req.sampling
        prior = tracked.req.all_ids if params.repetition_penalty != 1.0 else None
        return SamplingInput(params, tracked.generator, prior)

    def _after_token(self, tracked: _Tracked, logprob: TokenLogprob | None,
                     now: float) -> RequestOutput:
        """Stop checks and detokenization for the token record_step just appended."""
        req = tracked.req
        token = req.output_ids[-1]
        if req.first_token_time is None:
            req.first_token_time = now
            self.counters.prompt_tokens += req.num_prompt_tokens
        self.counters.generation_tokens += 1
        logprobs = [logprob] if logprob is not None else []
        stopping = req.stopping
        may_stop = req.num_output_tokens >= stopping.min_new_tokens
        if may_stop and not stopping.ignore_eos and token in self.eos_token_ids:
            return self._finish_with_flush(tracked, FinishReason.EOS, [token], logprobs)
        if may_stop and token in stopping.stop_token_ids:
            return self._finish_with_flush(tracked, FinishReason.STOP, [token], logprobs,
                                           matched=str(token))
        text = tracked.detokenizer.push([token]) if tracked.detokenizer else ""
        if tracked.stop_matcher is not None and may_stop:  # before min_new_tokens: no stops
            result = tracked.stop_matcher.push(text)
            text = result.emit
            if result.matched is not None:
                return self._finish(tracked, FinishReason.STOP, text, [token], logprobs,
                                    matched=result.matched)
        reason = FinishReason.UNSPECIFIED
        if req.num_output_tokens >= stopping.max_new_tokens:
            reason = FinishReason.LENGTH
        elif req.num_tokens >= self.config.max_model_len:
            reason = FinishReason.CONTEXT_LIMIT
        if reason != FinishReason.UNSPECIFIED:
            return self._finish_with_flush(tracked, reason, [token], logprobs, text=text)
        return self._output(req, text, [token], logprobs)

    def _finish_with_flush(self, tracked: _Tracked, reason: FinishReason, new_ids: list[int],
                           logprobs: list[TokenLogprob], text: str = "",
                           matched: str = "") -> RequestOutput:
        """Finish for a reason other than a stop string: release any held-back text."""
        if tracked.detokenizer is not None:
            tail = tracked.detokenizer.flush()
            if tracked.stop_matcher is not None:
                tail = tracked.stop_matcher.push(tail).emit
            text += tail
        if tracked.stop_matcher is not None:
            text += tracked.stop_matcher.flush()
        return self._finish(tracked, reason, text, new_ids, logprobs, matched=matched)

    def _finish(self, tracked: _Tracked, reason: FinishReason, text: str, new_ids: list[int],
                logprobs: list[TokenLogprob], matched: str = "", error: str = "") -> RequestOutput:
        req = tracked.req
        self.scheduler.remove(req)
        del self.tracked[req.request_id]
        req.finish_reason = reason
        self.counters.finished += 1
        return self._output(req, text, new_ids, logprobs, reason, matched, error)

    def _output(self, req: Request, text: str, new_ids: list[int], logprobs: list[TokenLogprob],
                reason: FinishReason = FinishReason.UNSPECIFIED, matched: str = "",
                error: str = "") -> RequestOutput:
        out = RequestOutput(req.request_id, text, new_ids, logprobs, reason, matched, error=error)
        if reason != FinishReason.UNSPECIFIED:
            now = time.monotonic()
            started = req.first_scheduled_time or now
            first = req.first_token_time or now
            out.prompt_tokens = req.num_prompt_tokens
            out.completion_tokens = req.num_output_tokens
            out.queue_ms = (started - req.arrival_time) * 1e3
            out.ttft_ms = (first - req.arrival_time) * 1e3 if req.first_token_time else 0.0
            out.decode_ms = (now - first) * 1e3 if req.first_token_time else 0.0
            out.num_preemptions = req.num_preemptions
        return out

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
            prompt_tokens_total=c.prompt_tokens,
            generation_tokens_total=c.generation_tokens,
            steps_gpu_only=c.steps[Strategy.GPU_ONLY],
            steps_async_overlap=c.steps[Strategy.ASYNC_OVERLAP],
            steps_asymmetric_pipeline=c.steps[Strategy.ASYMMETRIC_PIPELINE],
            last_step_predicted_ms=c.last_predicted_ms,
            last_step_measured_ms=c.last_measured_ms,
            requests_finished_total=c.finished,
            requests_aborted_total=c.aborted,
        )
