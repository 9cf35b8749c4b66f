"""The iteration scheduler: owns the waiting and running requests and their KV bookkeeping.
schedule() emits one StepPlan; update() applies the step's sampled tokens and finishes the
requests that hit a token-level stop (EOS, stop token ids, length, context limit).

Pure bookkeeping over Request objects and the KVCacheManager: it never touches tensors, so the
simulator drives this same code (schedule and update) in simulated time.

One step: tier moves, the running GPU-tier rows, then the chooser's one decision (strategy and
which host-resident decodes run; only those are charged budget and grown), then admission
spends what budget is left. A GPU decode that must leave the GPU goes to the host tier when
the host gate says the CPU can carry it every step (admits_to_host), is parked there when
copying its KV out and back is cheaper than recomputing it (parks_on_host: it runs when a step
has room, within the bounded wait, and is restored first when the GPU has room), and is
otherwise preempted by recompute.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Mapping, NamedTuple

from apex_grpc.config import EngineConfig, KVPlacement, Policy
from apex_grpc.kv_cache.manager import KVCacheManager, KVMove
from apex_grpc.request import FinishReason, Request, RequestStatus, Tier
from apex_grpc.scheduler.chooser import (Choice, HostDecode, HostRow, HostTierGate,
                                         SimpleChooser, StrategyChooser)
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy



class NewToken(NamedTuple):
    """One request's sampled token from update(), and whether it finished the request (a
    tuple: one is built per sampled row every step)."""

    req: Request
    token_id: int
    finish_reason: FinishReason  # UNSPECIFIED while the request runs on

    @property
    def finished(self) -> bool:
        return self.finish_reason != FinishReason.UNSPECIFIED


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager,
                 chooser: StrategyChooser | None = None, host_gate: HostTierGate | None = None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.kv = kv
        self.chooser = chooser or SimpleChooser(config.policy)
        self.host_gate = host_gate  # None: the host tier's capacity is the only limit
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order, oldest first
        self.requests: dict[str, Request] = {}  # every waiting or running request by id
        self.num_preemptions = 0
        self.num_evictions = 0
        self.num_restores = 0
        self.num_parks = 0
        # Host-resident requests parked there instead of preempted (restored first).
        self._parked: set[str] = set()
        self._num_alternate_admissions = 0

    # -- queue management ---------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def hybrid_enabled(self) -> bool:
        return self.config.policy != Policy.GPU_ONLY and self.kv.total_blocks(Tier.HOST) > 0

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Take a request out of the queues and free its KV in both tiers: the one finish
        path (token-level stops, stop strings, time limits, aborts, faults)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        self._parked.discard(req.request_id)
        self.requests.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def num_host_resident(self) -> int:
        return sum(1 for r in self.running if self.kv.tier_of(r.request_id) == Tier.HOST)

    # -- after the step -----------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[NewToken]:
        """Apply an executed plan: every row's request advances past this step's tokens, the
        sampled tokens (request id -> token id) are appended, and a request that hits a
        token-level stop is finished. Returns one NewToken per sampled token, in row order."""
        self._count_skipped_steps(plan)
        new_tokens = []
        for seq in plan.all_seqs:
            req = self.requests[seq.request_id]
            req.num_computed_tokens += seq.num_new_tokens
            token = sampled.get(seq.request_id)
            if token is None:
                continue  # a prompt chunk that does not end the prompt
            req.output_ids.append(token)
            reason = self._stop_reason(req, token)
            if reason != FinishReason.UNSPECIFIED:
                self.finish(req, reason)
            new_tokens.append(NewToken(req, token, reason))
        return new_tokens

    def _stop_reason(self, req: Request, token: int) -> FinishReason:
        """Token-level stops of the token just appended: EOS and stop token ids (neither
        before min_new_tokens), then the length and context limits."""
        stopping = req.stopping
        if req.num_output_tokens >= stopping.min_new_tokens:
            if not stopping.ignore_eos and token in self.eos_token_ids:
                return FinishReason.EOS
            if token in stopping.stop_token_ids:
                return FinishReason.STOP
        if req.num_output_tokens >= stopping.max_new_tokens:
            return FinishReason.LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return FinishReason.CONTEXT_LIMIT
        return FinishReason.UNSPECIFIED

    def _count_skipped_steps(self, plan: StepPlan) -> None:
        """The bounded-wait bookkeeping: a host-resident decode that ran this step has waited
        0 steps, one that sat out waits one more (prefills admitted to the host this step do
        not wait yet)."""
        ran = {s.request_id for s in plan.host_decode_seqs}
        admitted = {s.request_id for s in plan.host_prefill_seqs}
        for req in self.running:
            rid = req.request_id
            if rid not in admitted and self.kv.tier_of(rid) == Tier.HOST:
                req.num_skipped_steps = 0 if rid in ran else req.num_skipped_steps + 1

    # -- one iteration ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        moves: list[KVMove] = []
        self._rebalance_tiers(moves)
        budget = self.config.max_batched_tokens
        scheduled: list[ScheduledSeq] = []
        budget = self._schedule_gpu_running(scheduled, moves, budget)
        choice = self.chooser.choose(scheduled, self._host_decode_candidates(budget))
        budget = self._schedule_host_decodes(choice, scheduled, moves, budget)
        self._admit_waiting(scheduled, budget)
        return self._make_plan(scheduled, moves, choice.strategy)

    def _rebalance_tiers(self, moves: list[KVMove]) -> None:
        """Memory bookkeeping: evict to the host while the GPU tier cannot hold this step's
        growth; otherwise bring one host-resident request back (never both in one iteration)."""
        if not self.hybrid_enabled:
            return
        gpu_decodes = [r for r in self.running
                       if self.kv.tier_of(r.request_id) == Tier.GPU and not r.is_prefilling]
        if self.config.kv_placement == KVPlacement.HOST:
            # Forced host placement: long prompts prefilled on the GPU move out once decoding.
            for req in gpu_decodes:
                if self.kv.can_move(req.request_id, Tier.HOST):
                    moves.append(self._move(req, Tier.HOST))
            return
        growth = self._evict_for_growth(gpu_decodes, moves)
        if not moves and self.config.kv_placement == KVPlacement.AUTO:
            self._restore_oldest(growth, moves)

    def _evict_for_growth(self, gpu_decodes: list[Request], moves: list[KVMove]) -> int:
        """Evict the newest GPU decodes to the host while this step's growth does not fit, as
        long as the CPU can carry them or parking beats recompute; the rest is preempted by
        _schedule_gpu_running, exactly as GPU_ONLY would. Returns the GPU blocks the remaining
        decodes still need this step."""
        growth = sum(self.kv.num_new_blocks(r.request_id, r.num_tokens) for r in gpu_decodes)
        while growth > self.kv.pools[Tier.GPU].num_free and gpu_decodes:
            victim = gpu_decodes.pop()  # newest first
            if not self.kv.can_move(victim.request_id, Tier.HOST):
                break
            if not self._host_can_carry(victim):
                if not self._parks(victim):
                    break
                self._parked.add(victim.request_id)
                self.num_parks += 1
            growth -= self.kv.num_new_blocks(victim.request_id, victim.num_tokens)
            moves.append(self._move(victim, Tier.HOST))
        return growth

    def _restore_oldest(self, growth: int, moves: list[KVMove]) -> None:
        """Bring one host-resident request back, the oldest parked one first, while the GPU
        stays under the hysteresis fraction (so a restore is not undone by the next step's
        eviction)."""
        host_resident = [r for r in self.running if self.kv.tier_of(r.request_id) == Tier.HOST]
        if not host_resident:
            return
        parked = [r for r in host_resident if r.request_id in self._parked]
        oldest = (parked or host_resident)[0]
        gpu_pool = self.kv.pools[Tier.GPU]
        num_blocks = len(self.kv.block_table(oldest.request_id)) + 1
        limit = self.config.restore_below_fraction * gpu_pool.num_total
        if gpu_pool.num_used + growth + num_blocks <= limit and \
                self.kv.can_move(oldest.request_id, Tier.GPU):
            moves.append(self._move(oldest, Tier.GPU))

    def _move(self, req: Request, dst: Tier) -> KVMove:
        if dst == Tier.HOST:
            self.num_evictions += 1
        else:
            self.num_restores += 1
            self._parked.discard(req.request_id)
        return self.kv.move(req.request_id, dst)

    def _schedule_gpu_running(self, scheduled: list[ScheduledSeq], moves: list[KVMove],
                              budget: int) -> int:
        """Running GPU-tier requests, oldest first: prompt chunks and decodes."""
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING or \
                    self.kv.tier_of(req.request_id) != Tier.GPU:
                continue  # preempted earlier in this loop to make room, or host-resident
            num_new = min(req.num_uncomputed_tokens, budget)
            if not self._make_room(req, Tier.GPU, req.num_computed_tokens + num_new, moves):
                continue
            scheduled.append(self._scheduled_seq(req, num_new, Tier.GPU))
            budget -= num_new
        return budget

    def _host_decode_candidates(self, budget: int) -> list[HostDecode]:
        """The host-resident decodes the budget could still take (one token each), oldest
        first; the chooser picks the ones that run."""
        host = [r for r in self.running if self.kv.tier_of(r.request_id) == Tier.HOST]
        return [HostDecode(r.request_id, r.num_computed_tokens, r.num_skipped_steps,
                           r.request_id in self._parked) for r in host[:max(0, budget)]]

    def _schedule_host_decodes(self, choice: Choice, scheduled: list[ScheduledSeq],
                               moves: list[KVMove], budget: int) -> int:
        """Charge and grow only the host decodes the chooser picked."""
        for row in choice.host_decodes:
            req = self.requests[row.request_id]
            if req.status != RequestStatus.RUNNING:
                continue  # preempted to make room for an older host decode
            num_new = req.num_uncomputed_tokens
            if not self._make_room(req, Tier.HOST, req.num_computed_tokens + num_new, moves):
                continue
            scheduled.append(self._scheduled_seq(req, num_new, Tier.HOST))
            budget -= num_new
        return budget

    def _make_room(self, req: Request, tier: Tier, total_tokens: int,
                   moves: list[KVMove]) -> bool:
        """Grow req's table, preempting the newest requests of its tier (req last) if needed."""
        while not self.kv.can_grow(req.request_id, tier, total_tokens):
            victims = [r for r in self.running if self.kv.tier_of(r.request_id) == tier]
            victim = victims[-1]
            self._preempt(victim, moves)
            if victim is req:
                return False
        self.kv.grow(req.request_id, tier, total_tokens)
        return True

    def _preempt(self, req: Request, moves: list[KVMove]) -> None:
        """Drop the request's KV (recompute later); it goes back to the front of the queue."""
        # A move planned this step for the victim would copy blocks that are about to be freed.
        moves[:] = [m for m in moves if m.request_id != req.request_id]
        self.running.remove(req)
        self.kv.free(req.request_id)
        self._parked.discard(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _admit_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> None:
        sent_to_host = False
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_uncomputed_tokens, budget)
            tier = self._place(req, num_new, sent_to_host)
            if tier is None:
                break  # FCFS: nobody overtakes the head of the queue
            if self.hybrid_enabled and self.config.kv_placement == KVPlacement.ALTERNATE and \
                    num_new == req.num_uncomputed_tokens:
                self._num_alternate_admissions += 1
            self.waiting.popleft()
            self.kv.grow(req.request_id, tier, num_new)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled.append(self._scheduled_seq(req, num_new, tier))
            budget -= num_new
            sent_to_host |= tier == Tier.HOST

    def _place(self, req: Request, num_new: int, sent_to_host: bool) -> Tier | None:
        """The tier for a new request's KV, or None when neither tier has room now."""
        # Parked requests are older than any new one: GPU room goes to them first (FCFS).
        fits_gpu = not self._parked and self._fits(req, Tier.GPU, num_new, watermark=True)
        # Host prefill streams a whole prompt in one pass (no earlier context to read back).
        host_ok = self.hybrid_enabled and num_new == req.num_uncomputed_tokens and \
            self._fits(req, Tier.HOST, num_new, watermark=False)
        placement = self.config.kv_placement if self.hybrid_enabled else KVPlacement.GPU
        if placement == KVPlacement.AUTO:
            if fits_gpu and not sent_to_host:
                return Tier.GPU
            # Bandwidth-aware: the host tier only while the CPU can carry one more row.
            return Tier.HOST if host_ok and self._host_can_carry(req) else None
        if placement == KVPlacement.ALTERNATE and num_new == req.num_uncomputed_tokens:
            # Every other whole-prompt admission goes to the host (counted once admitted).
            placement = KVPlacement.HOST if self._num_alternate_admissions % 2 == 1 \
                else KVPlacement.GPU
        if placement == KVPlacement.HOST and host_ok:
            return Tier.HOST
        return Tier.GPU if fits_gpu else None

    def _final_len(self, req: Request) -> int:
        """The context a request will reach if it runs to max_new_tokens."""
        return min(req.num_prompt_tokens + req.stopping.max_new_tokens, self.config.max_model_len)

    def _host_row(self, req: Request, evicted: bool = False) -> HostRow:
        final_len = self._final_len(req)
        return HostRow((req.num_tokens + final_len) // 2, final_len,
                       req.num_computed_tokens if evicted else 0)

    def _host_can_carry(self, req: Request) -> bool:
        """Ask the host gate whether req (new, or a GPU decode about to be evicted) pays as
        one more host-resident row. GPU-tier prompts still prefilling count as the decode rows
        they are about to become; parked rows count as host rows (they run when they fit)."""
        if self.host_gate is None:
            return True
        gpu_ctx, host_rows = [], []
        for other in self.running:
            if other is req:
                continue
            if self.kv.tier_of(other.request_id) == Tier.HOST:
                host_rows.append(self._host_row(other))
            else:
                gpu_ctx.append(other.num_tokens)
        evicted = self.kv.tier_of(req.request_id) == Tier.GPU
        return self.host_gate.admits_to_host(gpu_ctx, host_rows, self._host_row(req, evicted))

    def _parks(self, victim: Request) -> bool:
        """Park the GPU decode victim on the host instead of preempting it? Only with automatic
        placement and an empty queue: a parked row runs only when a step has room (or its wait
        bound forces it), so it should get GPU room back soon, which it does when the running
        set can only shrink; with requests waiting, freed room goes on to them. The chooser
        gate weighs the copies and the forced runs over the expected wait against the
        recompute."""
        if self.host_gate is None or self.config.kv_placement != KVPlacement.AUTO or \
                self.waiting:
            return False
        gpu_decodes = [r for r in self.running if r is not victim
                       and self.kv.tier_of(r.request_id) == Tier.GPU]
        if not gpu_decodes:
            return False
        # It waits until as many GPU decodes finish as there are parked rows ahead of it.
        steps_left = sorted(self._final_len(r) - r.num_tokens for r in gpu_decodes)
        num_park_steps = steps_left[min(len(self._parked), len(steps_left) - 1)]
        return self.host_gate.parks_on_host([r.num_tokens for r in gpu_decodes],
                                          victim.num_computed_tokens, num_park_steps,
                                          self._num_to_park(gpu_decodes))

    def _num_to_park(self, gpu_decodes: list[Request]) -> int:
        """Rows parked together, this one included: those parked already plus the newest GPU
        decodes that cannot all reach their final length in the GPU tier."""
        num_free = self.kv.pools[Tier.GPU].num_total
        num_fitting = 0
        for req in gpu_decodes:  # oldest first: the newest leave first
            num_free -= self.kv.blocks_for_tokens(self._final_len(req))
            if num_free < 0:
                break
            num_fitting += 1
        return len(self._parked) + 1 + len(gpu_decodes) - num_fitting

    def _fits(self, req: Request, tier: Tier, num_new: int, watermark: bool) -> bool:
        pool = self.kv.pools[tier]
        # The reserve keeps room for running decodes to grow; alone, a request may use it all.
        reserve = int(self.config.gpu_admission_watermark * pool.num_total) \
            if watermark and self.running else 0
        return self.kv.num_new_blocks(req.request_id, num_new) + reserve <= pool.num_free

    def _scheduled_seq(self, req: Request, num_new: int, tier: Tier) -> ScheduledSeq:
        start = req.num_computed_tokens
        samples = start + num_new == req.num_tokens
        # A repetition penalty needs every earlier token; the copy is made only then.
        wants_prior = samples and req.sampling.repetition_penalty != 1.0
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=req.token_slice(start, start + num_new),
            num_computed_tokens=start,
            block_table=tuple(self.kv.block_table(req.request_id)),
            tier=tier,
            samples=samples,
            sampling=req.sampling,
            generator=req.generator,
            prior_token_ids=req.all_ids if wants_prior else None,
        )

    def _make_plan(self, scheduled: list[ScheduledSeq], moves: list[KVMove],
                   strategy: Strategy) -> StepPlan:
        # Prefill chunks first, then decodes: attention kernels split the GPU rows in two.
        gpu = tuple(sorted((s for s in scheduled if s.tier == Tier.GPU),
                           key=lambda s: s.is_decode))
        host = [s for s in scheduled if s.tier == Tier.HOST]
        host_decode = tuple(s for s in host if s.is_decode)
        return StepPlan(
            # Every picked host decode may have been preempted to make room for another.
            strategy=strategy if host_decode else Strategy.GPU_ONLY,
            gpu_seqs=gpu,
            host_prefill_seqs=tuple(s for s in host if not s.is_decode),
            host_decode_seqs=host_decode,
            moves=tuple(moves),
        )
