"""What the gRPC front end needs from the engine (implemented by engine.async_engine.AsyncEngine).

The server depends on this protocol only, so it can be tested against the real engine or a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from apex_grpc.config import EngineConfig, ModelConfig
from apex_grpc.request import RequestOutput, SamplingParams, StoppingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound (gRPC RESOURCE_EXHAUSTED)."""


class EngineUnavailableError(RuntimeError):
    """The engine is warming up, draining or dead (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class EngineStats:
    """Counters are totals since start; field names match apex.v1.GetStatsResponse."""

    num_running: int
    num_waiting: int
    num_host_resident: int
    gpu_kv_used_blocks: int
    gpu_kv_total_blocks: int
    host_kv_used_blocks: int
    host_kv_total_blocks: int
    preemptions_total: int
    evictions_total: int
    restores_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_gpu_only: int
    steps_async_overlap: int
    steps_asymmetric_pipeline: int
    steps_graphed: int  # decode steps run as a replayed CUDA graph
    last_step_predicted_ms: float
    last_step_measured_ms: float
    requests_finished_total: int
    requests_aborted_total: int


class EngineClient(Protocol):
    model_config: ModelConfig
    engine_config: EngineConfig
    model_name: str
    dtype_name: str
    device_name: str

    @property
    def tokenizer(self):  # apex_grpc.tokenizer.Tokenizer
        ...

    @property
    def is_ready(self) -> bool:
        """Model loaded, engine thread alive and not draining."""
        ...

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        stopping: StoppingParams,
        deadline: float | None = None,  # time.monotonic() deadline (client deadline)
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs; the last one has finish_reason set.

        Raises QueueFullError / EngineUnavailableError before yielding anything. Closing the
        iterator early (client cancel) aborts the request and frees its KV blocks.
        """
        ...

    async def abort(self, request_id: str) -> bool:
        """Abort a live request (its stream ends with ABORTED); False when unknown."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let in-flight requests finish within grace_s, abort the rest."""
        ...
