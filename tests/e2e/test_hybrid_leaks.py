"""Random cancels under eviction pressure leave both KV pools exactly as they started."""

from __future__ import annotations

import asyncio
import random

from apex_grpc.config import KVPlacement, Policy
from apex_grpc.engine.builder import build_engine, build_engine_core
from apex_grpc.request import SamplingParams, StoppingParams
from tests.e2e.conftest import tiny_serve_options


def test_engine_core_random_aborts_under_eviction_pressure_free_both_tiers(tiny_config_path):
    from apex_grpc.request import Request, Tier

    core = build_engine_core(tiny_serve_options(tiny_config_path, gpu_kv_blocks=12,
                                                block_size=4, host_kv_gb=0.001)).core
    rng = random.Random(3)
    for i in range(48):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 30))]
        core.add_request(Request(f"r{i}", prompt, SamplingParams(),
                                 StoppingParams(max_new_tokens=rng.randint(4, 24),
                                                ignore_eos=True)))
    steps = 0
    while core.has_work:
        core.step()
        steps += 1
        if rng.random() < 0.15 and core.scheduler.running:
            core.abort(rng.choice(core.scheduler.running).request_id)
        if rng.random() < 0.05 and core.scheduler.waiting:
            core.abort(rng.choice(list(core.scheduler.waiting)).request_id)
        core.scheduler.kv.check_integrity()
        assert steps < 5000
    stats = core.stats()
    assert stats.evictions_total > 0 and stats.requests_aborted_total > 0
    assert stats.gpu_kv_used_blocks == 0 and stats.host_kv_used_blocks == 0
    assert core.scheduler.kv.used_blocks(Tier.GPU) == core.scheduler.kv.used_blocks(Tier.HOST) == 0
    core.close()


def test_async_engine_cancels_under_forced_host_placement_free_both_tiers(tiny_config_path):
    engine = build_engine(tiny_serve_options(
        tiny_config_path, gpu_kv_blocks=16, block_size=4, host_kv_gb=0.001,
        policy=Policy.NEO, kv_placement=KVPlacement.ALTERNATE))
    rng = random.Random(5)

    async def one(i: int) -> None:
        outputs = engine.generate(f"c{i}", [rng.randrange(3, 500) for _ in range(12)],
                                  SamplingParams(), StoppingParams(max_new_tokens=30,
                                                                   ignore_eos=True))
        stop_after = rng.randrange(0, 8)
        seen = 0
        async for out in outputs:
            seen += 1
            if seen > stop_after or out.finished:
                break  # leaving the iterator early is a client cancel
        await outputs.aclose()

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(40)))
        for _ in range(200):  # the engine thread applies the aborts within a step
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(run())
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.gpu_kv_used_blocks == 0 and stats.host_kv_used_blocks == 0
        assert stats.steps_asymmetric_pipeline > 0 and stats.requests_aborted_total > 0
    finally:
        engine.close()
