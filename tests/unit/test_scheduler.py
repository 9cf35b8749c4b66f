"""Scheduler policy tests: a real Scheduler over a real KVCacheManager, no model."""

from __future__ import annotations

import random

import pytest

from apex_grpc.config import EngineConfig, KVPlacement, Policy
from apex_grpc.kv_cache.block_pool import BlockPool, BlockPoolError
from apex_grpc.kv_cache.manager import KVCacheManager
from apex_grpc.request import (FinishReason, Request, RequestStatus, SamplingParams,
                               StoppingParams, Tier)
from apex_grpc.scheduler.apex_chooser import DEFAULT_MAX_SKIPPED_STEPS, ApexChooser
from apex_grpc.scheduler.chooser import Choice, HostRow, SimpleChooser
from apex_grpc.scheduler.host_gate import ApexHostGate
from apex_grpc.perf.perf_model import PerfModel
from apex_grpc.scheduler.plan import Strategy
from apex_grpc.scheduler.scheduler import Scheduler
from tests.unit.perf_fixtures import make_profile


def make_scheduler(**overrides) -> Scheduler:
    fields = dict(block_size=4, num_gpu_blocks=16, num_host_blocks=0, max_num_seqs=8,
                  max_batched_tokens=32, max_model_len=128)
    fields.update(overrides)
    config = EngineConfig(**fields)
    kv = KVCacheManager(config.block_size, config.num_gpu_blocks, config.num_host_blocks)
    return Scheduler(config, kv)


def make_request(rid: str, prompt_len: int, max_new: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(),
                   StoppingParams(max_new_tokens=max_new))


def run_step(sched: Scheduler):
    """Schedule, pretend to execute (token 7 for each sampling row), update (which retires
    requests at max_new_tokens)."""
    plan = sched.schedule()
    sched.update(plan, {s.request_id: 7 for s in plan.all_seqs if s.samples})
    sched.kv.check_integrity()
    return plan


def test_block_pool_detects_double_free_and_over_allocation():
    pool = BlockPool(4, Tier.GPU)
    blocks = pool.allocate(3)
    with pytest.raises(BlockPoolError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free(blocks[:1])
    with pytest.raises(BlockPoolError, match="freed twice"):
        pool.free(blocks[:1])
    pool.check_integrity()
    assert pool.num_free + pool.num_used == pool.num_total


def test_fcfs_admission_respects_token_budget_and_chunks_long_prompts():
    sched = make_scheduler(max_batched_tokens=16)
    sched.add_request(make_request("long", 40))
    sched.add_request(make_request("short", 4))
    plan = run_step(sched)
    assert [(s.request_id, s.num_new_tokens, s.samples) for s in plan.all_seqs] == \
        [("long", 16, False)]
    plan = run_step(sched)
    assert [(s.request_id, s.num_new_tokens) for s in plan.all_seqs] == [("long", 16)]
    plan = run_step(sched)
    # The last 8 prompt tokens end the prefill (a token is sampled); "short" fills the budget.
    assert [(s.request_id, s.num_new_tokens, s.samples) for s in plan.all_seqs] == \
        [("long", 8, True), ("short", 4, True)]
    plan = run_step(sched)
    assert all(s.is_decode for s in plan.all_seqs) and len(plan.all_seqs) == 2


def test_max_num_seqs_caps_the_running_batch():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 2))
    plan = run_step(sched)
    assert {s.request_id for s in plan.all_seqs} == {"r0", "r1"}
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]


def test_gpu_only_preempts_newest_by_recompute_and_resumes_it_first():
    # 6 blocks of 4 tokens: three 7-token prompts fit (2 blocks each), then decodes need more.
    sched = make_scheduler(num_gpu_blocks=6)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 7, max_new=6))
    run_step(sched)  # prefill all three: 7 tokens + 1 sampled
    run_step(sched)  # decode: token 8 fits in block 2
    plan = run_step(sched)  # token 9 needs a third block each: the newest is preempted
    assert sched.num_preemptions >= 1
    preempted = sched.waiting[0]
    assert preempted.request_id == "r2" and preempted.status == RequestStatus.PREEMPTED
    assert preempted.num_computed_tokens == 0 and preempted.output_ids  # keeps its output
    assert "r2" not in {s.request_id for s in plan.all_seqs}
    while sched.has_work:
        run_step(sched)
    assert sched.kv.used_blocks(Tier.GPU) == 0


def test_apex_evicts_newest_gpu_decode_to_host_instead_of_preempting():
    sched = make_scheduler(num_gpu_blocks=6, num_host_blocks=32, policy=Policy.APEX)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 7, max_new=6))
    run_step(sched)
    run_step(sched)
    plan = run_step(sched)
    assert sched.num_evictions >= 1 and sched.num_preemptions == 0
    assert [m.request_id for m in plan.moves] == ["r2"] and plan.moves[0].dst_tier == Tier.HOST
    assert "r2" in {s.request_id for s in plan.host_decode_seqs}
    assert plan.strategy == Strategy.ASYNC_OVERLAP


def test_restore_uses_hysteresis_and_never_follows_an_eviction_in_the_same_step():
    sched = make_scheduler(num_gpu_blocks=8, num_host_blocks=32, policy=Policy.APEX)
    for i, max_new in enumerate([3, 10, 10]):  # r0 finishes early and makes room on the GPU
        sched.add_request(make_request(f"r{i}", 7, max_new=max_new))
    kinds_per_step = []
    while sched.has_work:
        plan = run_step(sched)
        kinds_per_step.append({m.dst_tier for m in plan.moves})
    assert all(len(kinds) <= 1 for kinds in kinds_per_step)
    assert sched.num_evictions >= 1 and sched.num_restores >= 1
    assert sched.kv.used_blocks(Tier.HOST) == 0 and sched.kv.used_blocks(Tier.GPU) == 0


@pytest.mark.parametrize("placement,expected", [
    (KVPlacement.HOST, [Tier.HOST] * 4),
    (KVPlacement.GPU, [Tier.GPU] * 4),
    (KVPlacement.ALTERNATE, [Tier.GPU, Tier.HOST, Tier.GPU, Tier.HOST]),
])
def test_forced_placement(placement, expected):
    sched = make_scheduler(num_host_blocks=32, kv_placement=placement)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 5))
    plan = run_step(sched)
    tiers = {s.request_id: s.tier for s in plan.all_seqs}
    assert [tiers[f"r{i}"] for i in range(4)] == expected
    plan = run_step(sched)
    host_rows = [s.request_id for s in plan.host_decode_seqs]
    assert host_rows == [f"r{i}" for i in range(4) if expected[i] == Tier.HOST]


def test_auto_placement_sends_overflow_to_host_and_keeps_fcfs_order():
    sched = make_scheduler(num_gpu_blocks=5, num_host_blocks=32)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 8))
    plan = run_step(sched)
    tiers = [s.tier for s in plan.all_seqs]
    # r0 fits on the GPU (2 blocks), r1 would leave no headroom: host; r2 follows r1 to host.
    assert tiers[0] == Tier.GPU and Tier.HOST in tiers
    assert tiers.index(Tier.HOST) == len(tiers) - tiers[::-1].count(Tier.HOST)


def test_neo_policy_plans_the_asymmetric_pipeline_when_host_rows_exist():
    sched = make_scheduler(num_host_blocks=32, policy=Policy.NEO,
                           kv_placement=KVPlacement.ALTERNATE)
    for i in range(2):
        sched.add_request(make_request(f"r{i}", 5))
    run_step(sched)
    plan = run_step(sched)
    assert plan.strategy == Strategy.ASYMMETRIC_PIPELINE and plan.host_decode_seqs


def test_random_workload_keeps_pools_consistent_and_drains_completely():
    rng = random.Random(0)
    sched = make_scheduler(num_gpu_blocks=12, num_host_blocks=20, max_num_seqs=6)
    for i in range(40):
        sched.add_request(make_request(f"r{i}", rng.randint(1, 30), max_new=rng.randint(1, 12)))
    for _ in range(2000):
        if not sched.has_work:
            break
        run_step(sched)
        if rng.random() < 0.1 and sched.running:  # abort a random running request
            sched.finish(rng.choice(sched.running), FinishReason.ABORTED)
        gpu = sched.kv.pools[Tier.GPU]
        host = sched.kv.pools[Tier.HOST]
        assert gpu.num_used <= gpu.num_total and host.num_used <= host.num_total
    assert not sched.has_work
    assert sched.kv.used_blocks(Tier.GPU) == 0 and sched.kv.used_blocks(Tier.HOST) == 0


class _RecordingGate:
    """Answers admits_to_host with a fixed verdict, records the arguments it was asked with,
    and never parks."""

    def __init__(self, verdict: bool) -> None:
        self.verdict = verdict
        self.calls: list[tuple[list[int], list[HostRow], HostRow]] = []

    def admits_to_host(self, gpu_decode_ctx, host_rows, new_row) -> bool:
        self.calls.append((list(gpu_decode_ctx), list(host_rows), new_row))
        return self.verdict

    def parks_on_host(self, gpu_decode_ctx, num_kv_tokens, num_park_steps,
                      num_parked_together) -> bool:
        return False


def _apex_with(gate, **overrides) -> Scheduler:
    """APEX overlapping every host row, with the given host gate."""
    fields = dict(block_size=4, num_gpu_blocks=6, num_host_blocks=32, max_num_seqs=8,
                  max_batched_tokens=32, max_model_len=128, policy=Policy.APEX)
    fields.update(overrides)
    config = EngineConfig(**fields)
    return Scheduler(config, KVCacheManager(config.block_size, config.num_gpu_blocks,
                                            config.num_host_blocks),
                     SimpleChooser(Policy.APEX), gate)


def test_admission_asks_with_prefilling_gpu_rows_and_final_lengths():
    gate = _RecordingGate(verdict=True)
    sched = _apex_with(gate, num_gpu_blocks=3)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 8, max_new=8))
    plan = run_step(sched)
    assert [s.tier for s in plan.all_seqs] == [Tier.GPU, Tier.HOST, Tier.HOST]
    # r1: r0 (prefilling this very step on the GPU) counts as an 8-token GPU row.
    gpu_ctx, host_rows, new_row = gate.calls[0]
    assert gpu_ctx == [8] and host_rows == [] and new_row == HostRow(12, 16)
    # r2 sees r1 on the host at its mean remaining and final length.
    assert gate.calls[1] == ([8], [HostRow(12, 16)], HostRow(12, 16))


def test_eviction_leaves_the_victim_out_of_the_gpu_rows():
    gate = _RecordingGate(verdict=True)
    sched = _apex_with(gate)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 7, max_new=6))
    run_step(sched)
    run_step(sched)
    gate.calls.clear()
    plan = run_step(sched)
    assert [m.request_id for m in plan.moves] == ["r2"]
    gpu_ctx, host_rows, new_row = gate.calls[0]
    # r2 has 8 tokens in its KV that preemption would recompute.
    assert gpu_ctx == [9, 9] and host_rows == [] and new_row == HostRow(11, 13, 8)


def test_apex_schedules_exactly_like_gpu_only_when_the_host_tier_does_not_pay():
    rng = random.Random(1)
    specs = [(rng.randint(3, 20), rng.randint(2, 12)) for _ in range(30)]
    runs = []
    for sched in (make_scheduler(num_gpu_blocks=12),
                  _apex_with(_RecordingGate(verdict=False), num_gpu_blocks=12)):
        for i, (prompt_len, max_new) in enumerate(specs):
            sched.add_request(make_request(f"r{i}", prompt_len, max_new=max_new))
        plans = []
        while sched.has_work:
            plan = run_step(sched)
            plans.append([(s.request_id, s.num_new_tokens, s.tier) for s in plan.all_seqs])
        runs.append((plans, sched.num_preemptions, sched.num_evictions))
    assert runs[0] == runs[1] and runs[0][1] > 0 and runs[1][2] == 0


# Parking pays: a long prefill (recompute), instant copies, and a CPU too slow to carry a
# row every step but cheap enough for one forced run per wait bound.
PARK_PROFILE = dict(cpu_ms_per_ktok=1.0, prefill_ms_per_ktok=2000.0)


def _apex_on(profile) -> Scheduler:
    """APEX with the real chooser over a synthetic profile; 128 GPU KV tokens."""
    config = EngineConfig(block_size=16, num_gpu_blocks=8, num_host_blocks=32, max_num_seqs=8,
                          max_batched_tokens=128, max_model_len=256, policy=Policy.APEX)
    model = PerfModel(profile)
    return Scheduler(config, KVCacheManager(config.block_size, config.num_gpu_blocks,
                                            config.num_host_blocks),
                     ApexChooser(model, config), ApexHostGate(model, config))


def _add_growing(sched: Scheduler, max_new_tokens: list[int]) -> None:
    """Prompts of 30 tokens that all start at once and outgrow the GPU together."""
    for i, max_new in enumerate(max_new_tokens):
        sched.add_request(make_request(f"r{i}", 30, max_new=max_new))


def _drain(sched: Scheduler) -> list[list[tuple[str, int, Tier]]]:
    plans = []
    while sched.has_work:
        plan = run_step(sched)
        plans.append([(s.request_id, s.num_new_tokens, s.tier) for s in plan.all_seqs])
        for req in sched.running:  # bounded waits: parked rows run or come back in time
            assert req.num_skipped_steps <= DEFAULT_MAX_SKIPPED_STEPS
        assert len(plans) < 500
    return plans


def test_apex_parks_on_the_host_when_the_copy_is_cheaper_than_recompute():
    # Nothing waits: the decodes that must leave the GPU are parked, not preempted.
    sched = _apex_on(make_profile(**PARK_PROFILE))
    _add_growing(sched, [40, 40, 40])
    parked_runs, saw_parked = 0, False
    while sched.has_work:
        plan = run_step(sched)
        parked_runs += len(plan.host_decode_seqs)
        saw_parked |= sched.num_host_resident() > 0
        for req in sched.running:
            assert req.num_skipped_steps <= DEFAULT_MAX_SKIPPED_STEPS
    assert saw_parked and sched.num_parks > 0 and sched.num_parks == sched.num_evictions
    assert sched.num_preemptions == 0 and sched.num_restores > 0
    assert parked_runs > 0  # served on the CPU when forced by the bounded wait
    assert sched.kv.used_blocks(Tier.HOST) == 0 and sched.kv.used_blocks(Tier.GPU) == 0


@pytest.mark.parametrize("profile", [
    dict(PARK_PROFILE, copy_gb_per_s=1e-5),  # the copies cost more than the recompute
    dict(PARK_PROFILE, cpu_ms_per_ktok=50.0),  # so do the forced CPU runs while parked
], ids=["slow-copies", "slow-cpu"])
def test_apex_preempts_like_gpu_only_when_parking_costs_more_than_recompute(profile):
    runs = []
    for sched in (make_scheduler(block_size=16, num_gpu_blocks=8, max_batched_tokens=128,
                                 max_model_len=256), _apex_on(make_profile(**profile))):
        _add_growing(sched, [40, 40, 40])
        runs.append((_drain(sched), sched.num_preemptions, sched.num_evictions))
    assert runs[0] == runs[1] and runs[0][1] > 0 and runs[1][2] == 0


def test_parked_requests_are_restored_oldest_first_and_block_new_gpu_admissions():
    sched = _apex_on(make_profile(**PARK_PROFILE))
    _add_growing(sched, [20, 60, 60, 60])
    admission_order = {"r0": 0, "r1": 1, "r2": 2, "r3": 3, "late": 4}
    num_restores, late_added = 0, False
    while sched.has_work:
        if sched._parked and not late_added:
            sched.add_request(make_request("late", 30, max_new=10))  # arrives after the parks
            late_added = True
        parked_before = [r.request_id for r in sched.running if r.request_id in sched._parked]
        plan = run_step(sched)
        restored = [m.request_id for m in plan.moves if m.dst_tier == Tier.GPU]
        if restored:
            assert restored == [min(parked_before, key=admission_order.get)]
            num_restores += 1
        if sched._parked:
            # FCFS: nobody new starts on the GPU while an older request is parked.
            assert all(s.num_computed_tokens > 0 for s in plan.gpu_seqs)
    assert num_restores > 0 and sched.num_parks > 0


def test_block_runs_pair_consecutive_blocks_for_contiguous_copies():
    from apex_grpc.kv_cache.storage import block_runs

    assert block_runs((4, 5, 6, 9, 10, 2), (0, 1, 2, 3, 7, 8)) == \
        [(4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1)]
    assert block_runs((), ()) == []


class _SitOutChooser:
    """Runs no host decode (GPU_ONLY every step) and records what it was offered."""

    def __init__(self) -> None:
        self.offered: list[list[str]] = []

    def choose(self, gpu_seqs, host_decodes) -> Choice:
        self.offered.append([h.request_id for h in host_decodes])
        return Choice(Strategy.GPU_ONLY, ())


def test_host_decodes_that_sit_out_are_neither_charged_nor_grown():
    # Alternate placement: r0 on the GPU, r1 on the host; both decode after one step.
    chooser = _SitOutChooser()
    config = EngineConfig(block_size=4, num_gpu_blocks=16, num_host_blocks=16, max_num_seqs=8,
                          max_batched_tokens=12, max_model_len=128, policy=Policy.APEX,
                          kv_placement=KVPlacement.ALTERNATE)
    sched = Scheduler(config, KVCacheManager(4, 16, 16), chooser)
    sched.add_request(make_request("r0", 4, max_new=20))
    sched.add_request(make_request("r1", 4, max_new=20))
    run_step(sched)
    host_table = list(sched.kv.block_table("r1"))
    sched.add_request(make_request("late", 30))
    plan = run_step(sched)
    assert chooser.offered[-1] == ["r1"] and plan.strategy == Strategy.GPU_ONLY
    assert sched.kv.block_table("r1") == host_table and sched.requests["r1"].num_skipped_steps == 1
    # Admission spends all the budget the GPU decode left (12 - 1), none held for r1.
    assert [(s.request_id, s.num_new_tokens) for s in plan.all_seqs] == [("late", 11), ("r0", 1)]


@pytest.mark.parametrize("token,stopping,expected", [
    (2, StoppingParams(max_new_tokens=8), FinishReason.EOS),
    (2, StoppingParams(max_new_tokens=8, ignore_eos=True), FinishReason.UNSPECIFIED),
    (2, StoppingParams(max_new_tokens=8, min_new_tokens=2), FinishReason.UNSPECIFIED),
    (9, StoppingParams(max_new_tokens=8, stop_token_ids=(9,)), FinishReason.STOP),
    (9, StoppingParams(max_new_tokens=8, stop_token_ids=(9,), min_new_tokens=2),
     FinishReason.UNSPECIFIED),
    (7, StoppingParams(max_new_tokens=1), FinishReason.LENGTH),
    (7, StoppingParams(max_new_tokens=8), FinishReason.CONTEXT_LIMIT),  # 7 + 1 = max_model_len
    (7, StoppingParams(max_new_tokens=8), FinishReason.UNSPECIFIED),
])
def test_update_applies_token_level_stops_and_frees_finished_requests(token, stopping, expected):
    max_model_len = 8 if expected == FinishReason.CONTEXT_LIMIT else 128
    config = EngineConfig(block_size=4, num_gpu_blocks=16, num_host_blocks=0, max_num_seqs=8,
                          max_batched_tokens=32, max_model_len=max_model_len)
    sched = Scheduler(config, KVCacheManager(4, 16, 0), eos_token_ids=(2,))
    req = Request("r", list(range(10, 17)), SamplingParams(), stopping)
    sched.add_request(req)
    plan = sched.schedule()
    [new] = sched.update(plan, {"r": token})
    assert (new.req, new.token_id, new.finish_reason) == (req, token, expected)
    assert req.output_ids == [token] and req.num_computed_tokens == 7
    finished = expected != FinishReason.UNSPECIFIED
    assert (req.status == RequestStatus.FINISHED) == finished and req.finish_reason == expected
    assert sched.kv.used_blocks(Tier.GPU) == (0 if finished else 2)
    assert ("r" in sched.requests) != finished
