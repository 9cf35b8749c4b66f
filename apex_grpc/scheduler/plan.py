"""StepPlan: the one immutable hand-off from the scheduler to the runner for one iteration."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apex_grpc.kv_cache.manager import KVMove
from apex_grpc.request import SamplingParams, Tier

if TYPE_CHECKING:
    import torch

_GREEDY = SamplingParams()


class Strategy(enum.IntEnum):
    GPU_ONLY = 0
    ASYNC_OVERLAP = 1  # APEX: one batch, the GPU waits for CPU attention just before O proj
    ASYMMETRIC_PIPELINE = 2  # NEO: two sub-batches, skewed layer schedule


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's share of this step: tokens [num_computed, num_computed + len(token_ids))."""

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens whose KV this step computes
    num_computed_tokens: int  # tokens already in the KV cache before this step
    block_table: tuple[int, ...]  # covers num_computed_tokens + len(token_ids) tokens
    tier: Tier  # where the request's KV lives (and where this step's k/v are written)
    samples: bool  # True when this step ends the prompt (or is a decode): sample a token
    # How a sampling row draws its token: the request's parameters, its seeded generator, and
    # its prompt + output ids when a repetition penalty needs them (plans built by hand for
    # tests and benchmarks sample greedily).
    sampling: SamplingParams = _GREEDY
    generator: torch.Generator | None = None
    prior_token_ids: list[int] | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.num_computed_tokens > 0


@dataclass(frozen=True)
class StepPlan:
    """Rows in execution order: gpu_seqs (GPU-tier prefills and decodes), host_prefill_seqs
    (prefills streaming their KV to the host tier), host_decode_seqs (CPU attention)."""

    strategy: Strategy
    gpu_seqs: tuple[ScheduledSeq, ...]
    host_prefill_seqs: tuple[ScheduledSeq, ...]
    host_decode_seqs: tuple[ScheduledSeq, ...]
    moves: tuple[KVMove, ...]  # applied before the forward pass

    @property
    def all_seqs(self) -> tuple[ScheduledSeq, ...]:
        return self.gpu_seqs + self.host_prefill_seqs + self.host_decode_seqs

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.all_seqs)

    @property
    def is_empty(self) -> bool:
        return not (self.gpu_seqs or self.host_prefill_seqs or self.host_decode_seqs)
