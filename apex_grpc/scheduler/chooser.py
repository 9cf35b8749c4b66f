"""Strategy choosers: given this iteration's candidate rows, pick the execution strategy and
which host-resident decode rows run.

SimpleChooser is the fixed rule of each policy (every host row runs every step). The APEX
chooser, which weighs predicted step times from the performance model, lives in apex_chooser.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Protocol, Sequence

from apex_grpc.config import Policy
from apex_grpc.scheduler.plan import ScheduledSeq, Strategy


@dataclass(frozen=True)
class Choice:
    strategy: Strategy
    host_decode_seqs: tuple[ScheduledSeq, ...]
    predicted_step_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class HostRow:
    """A host-resident (or candidate) request's context for admission: its mean length over
    the rest of its life (what its CPU attention costs on average, for throughput) and its
    final length (the worst step it will cause, for the step limit). The rest of its life is
    2 x (final - mean) steps."""

    mean_ctx_len: int
    final_ctx_len: int
    # Tokens that preemption by recompute would prefill again (a GPU decode about to be
    # evicted); 0 for a new request.
    num_recompute_tokens: int = 0


class StrategyChooser(Protocol):
    def choose(self, gpu_seqs: tuple[ScheduledSeq, ...],
               host_prefill_seqs: tuple[ScheduledSeq, ...],
               host_decode_seqs: tuple[ScheduledSeq, ...],
               num_skipped_steps: Mapping[str, int],
               parked: AbstractSet[str] = frozenset()) -> Choice:
        """Pick the strategy and the host decode rows that run this step (a subset of
        host_decode_seqs, in order). num_skipped_steps: consecutive steps each host-resident
        request has sat out, so a chooser can bound how long any request waits. parked: the
        host rows parked there instead of preempted (see parks_on_host)."""
        ...

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
        """Bandwidth-aware admission: may one more host-resident request join (by admission
        or eviction) given the GPU rows' contexts and the host rows already resident?"""
        ...

    def parks_on_host(self, gpu_decode_ctx: Sequence[int], num_kv_tokens: int,
                      num_park_steps: int, num_parked_together: int) -> bool:
        """For a GPU decode that must leave and that admits_to_host refused: park it on the
        host (run when a step has room, restored when the GPU has, expected after
        num_park_steps; num_parked_together rows expected on the host with it, it included)
        rather than preempt it?"""
        ...


class SimpleChooser:
    """gpu-only never has host rows; neo pipelines whenever there are host rows; apex overlaps."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def choose(self, gpu_seqs: tuple[ScheduledSeq, ...],
               host_prefill_seqs: tuple[ScheduledSeq, ...],
               host_decode_seqs: tuple[ScheduledSeq, ...],
               num_skipped_steps: Mapping[str, int],
               parked: AbstractSet[str] = frozenset()) -> Choice:
        if not host_decode_seqs:
            return Choice(Strategy.GPU_ONLY, ())
        if self.policy == Policy.NEO:
            return Choice(Strategy.ASYMMETRIC_PIPELINE, host_decode_seqs)
        return Choice(Strategy.ASYNC_OVERLAP, host_decode_seqs)

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
        return True  # no performance model: the host tier's capacity is the only limit

    def parks_on_host(self, gpu_decode_ctx: Sequence[int], num_kv_tokens: int,
                      num_park_steps: int, num_parked_together: int) -> bool:
        return False  # never asked: admits_to_host already takes every row
