"""Request-level types shared by the server, engine, scheduler and sampler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Most alternatives a request may ask for per generated token (validation rejects more; the
# sampler computes at most this many).
MAX_TOP_LOGPROBS = 20


class FinishReason(enum.IntEnum):
    """Numbered as apex.v1.FinishReason on the wire."""

    UNSPECIFIED = 0
    EOS = 1
    STOP = 2
    LENGTH = 3
    CONTEXT_LIMIT = 4
    TIME_LIMIT = 5
    ABORTED = 6
    # Engine fault: the server maps it to gRPC INTERNAL rather than a finish reason.
    ERROR = 100


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


class Tier(enum.IntEnum):
    """Where a request's KV cache lives."""

    GPU = 0
    HOST = 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Number of top alternatives returned per generated token; -1 = no logprobs at all.
    top_logprobs: int = -1

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs >= 0


@dataclass(frozen=True, slots=True)
class StoppingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_strings: bool = False
    ignore_eos: bool = False
    time_limit_ms: int | None = None


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    """One increment of a request's output, handed from the engine to the front end."""

    request_id: str
    text: str  # delta since the previous output
    token_ids: list[int]  # new token ids since the previous output
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    matched_stop: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    num_preemptions: int = 0
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason != FinishReason.UNSPECIFIED


@dataclass(slots=True)
class Request:
    """Engine-side state of one generation request (owned by the engine thread)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # Monotonic deadline after which the request leaves the queue unserved (client deadline).
    deadline: float | None = None
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is already in the cache (prefill progress, then prompt+output-1).
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    # Scheduler bookkeeping: consecutive iterations this host-resident request sat out.
    num_skipped_steps: int = 0
    # Seeded per request (sampled, not greedy, with a seed): the plan hands it to the sampler.
    generator: torch.Generator | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + output without building the whole list (a decode
        step needs only the last token)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return tuple(self.output_ids[start - num_prompt:end - num_prompt])
        if end <= num_prompt:
            return tuple(self.prompt_ids[start:end])
        return tuple(self.prompt_ids[start:]) + tuple(self.output_ids[:end - num_prompt])

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while the prompt (or prompt+output after a preemption) still lacks KV."""
        return self.num_uncomputed_tokens > 1 or not self.output_ids
