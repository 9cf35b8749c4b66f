"""The strategy chooser seam: given this step's running GPU rows and the host-resident decodes
that may run, pick the execution strategy and which host decodes run (asked once per step,
before any budget or KV block is spent on host rows).

Also the host-tier gate seam: bandwidth-aware admission to the host tier and parking (only
policies with a performance model have one, host_gate.py).

SimpleChooser is the fixed rule of each policy (every host row runs every step). The APEX and
NEO choosers, which weigh predicted step times from the performance model, live in
apex_chooser.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from apex_grpc.config import Policy
from apex_grpc.scheduler.plan import ScheduledSeq, Strategy


@dataclass(frozen=True, slots=True)
class HostDecode:
    """A running host-resident decode that may run this step (nothing charged for it yet)."""

    request_id: str
    num_computed_tokens: int  # cached KV; the step attends over these and its new token
    num_skipped_steps: int  # consecutive steps it sat out (a chooser bounds the wait)
    parked: bool  # parked on the host instead of preempted: runs when a step has room

    @property
    def ctx_len(self) -> int:
        return self.num_computed_tokens + 1


@dataclass(frozen=True)
class Choice:
    strategy: Strategy
    host_decodes: tuple[HostDecode, ...]  # the ones that run, a subset in the given order
    predicted_step_ms: float = 0.0  # of the rows the chooser saw (admissions come later)


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
    def choose(self, gpu_seqs: Sequence[ScheduledSeq],
               host_decodes: Sequence[HostDecode]) -> Choice:
        """Pick the strategy and the host decodes that run beside gpu_seqs (the running
        GPU-tier rows already scheduled this step)."""
        ...


class HostTierGate(Protocol):
    """Bandwidth-aware use of the host tier. Without a gate the host tier's capacity is the
    only limit on admission and eviction, and nothing is parked."""

    def admits_to_host(self, gpu_decode_ctx: Sequence[int], host_rows: Sequence[HostRow],
                       new_row: HostRow) -> bool:
        """May one more host-resident request join (by admission or eviction) given the GPU
        rows' contexts and the host rows already resident?"""
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

    def choose(self, gpu_seqs: Sequence[ScheduledSeq],
               host_decodes: Sequence[HostDecode]) -> Choice:
        if not host_decodes:
            return Choice(Strategy.GPU_ONLY, ())
        if self.policy == Policy.NEO:
            return Choice(Strategy.ASYMMETRIC_PIPELINE, tuple(host_decodes))
        return Choice(Strategy.ASYNC_OVERLAP, tuple(host_decodes))
