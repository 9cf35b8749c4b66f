"""Run an EngineCore to completion on the calling thread: for tests, benchmarks and the
profiler, where no gRPC front end or engine thread is wanted."""

from __future__ import annotations

from dataclasses import dataclass, field

from apex_grpc.engine.core import EngineCore
from apex_grpc.request import FinishReason, Request, SamplingParams, StoppingParams


@dataclass
class OfflineResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = FinishReason.UNSPECIFIED


def run_to_completion(core: EngineCore, prompts: dict[str, list[int]],
                      sampling: SamplingParams = SamplingParams(),
                      stopping: StoppingParams = StoppingParams(),
                      max_steps: int = 100_000) -> dict[str, OfflineResult]:
    """Submit every prompt at once and step until all finish."""
    results = {rid: OfflineResult() for rid in prompts}
    for rid, ids in prompts.items():
        core.add_request(Request(rid, list(ids), sampling, stopping))
    for _ in range(max_steps):
        if not core.has_work:
            return results
        for out in core.step():
            result = results[out.request_id]
            result.token_ids.extend(out.token_ids)
            result.logprobs.extend(lp.logprob for lp in out.logprobs)
            result.text += out.text
            if out.finished:
                result.finish_reason = out.finish_reason
    raise RuntimeError(f"requests still running after {max_steps} steps")
