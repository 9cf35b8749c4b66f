"""Bounded soak: a few hundred mixed requests (streams, unary, random cancels, tight deadlines,
Abort RPCs) under KV pressure on the tiny model. Only the expected status codes appear, no KV
block, request or asyncio task leaks, and memory stays flat after a warm-up round.
APEX_SOAK_REQUESTS sets the number of requests per round."""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import pytest

from clients.client import ApexError, AsyncApexClient

NUM_REQUESTS = int(os.environ.get("APEX_SOAK_REQUESTS", "200"))
EXPECTED_CODES = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


async def _one(client: AsyncApexClient, rng: random.Random, index: int) -> str:
    prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(4, 60))]
    kwargs = {"token_ids": prompt, "max_new_tokens": rng.randrange(1, 80), "ignore_eos": True,
              "temperature": rng.choice([0.0, 0.8]), "seed": index}
    action = rng.choice(["unary", "stream", "cancel", "deadline", "abort"])
    try:
        if action == "unary":
            return (await client.generate(**kwargs)).finish_reason
        if action == "deadline":
            return (await client.generate(timeout=rng.uniform(0.005, 0.2), **kwargs)).finish_reason
        stream = client.generate_stream(**kwargs)
        stop_after = rng.randrange(1, 8)
        last = None
        async for chunk in stream:
            last = chunk
            stop_after -= 1
            if stop_after == 0 and action == "cancel":
                stream.cancel()
            elif stop_after == 0 and action == "abort":
                await client.abort(stream.request_id)
        return "cancelled" if last is None or not last.finished else last.finish_reason
    except ApexError as error:
        assert error.code in EXPECTED_CODES, error
        return error.code.name


async def _round(target: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    async with AsyncApexClient(target) as client:
        semaphore = asyncio.Semaphore(24)

        async def bounded(index: int) -> str:
            async with semaphore:
                return await _one(client, rng, index)
        outcomes = await asyncio.gather(*(bounded(i) for i in range(NUM_REQUESTS)))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


async def _num_tasks() -> int:
    return len(asyncio.all_tasks())


async def _tasks_settle(limit: int, timeout_s: float = 5.0) -> list[str]:
    """Waits for the loop's task count to fall to `limit` (RPC tasks of a closed connection
    finish a moment after the client is gone); returns the extra tasks if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(asyncio.all_tasks()) > limit and loop.time() < deadline:
        await asyncio.sleep(0.05)
    tasks = asyncio.all_tasks()
    return [repr(task) for task in tasks] if len(tasks) > limit else []


@pytest.mark.slow
def test_soak_mixed_traffic_under_kv_pressure(start_server):
    server = start_server({"gpu_kv_blocks": 24, "host_kv_gb": 0.002, "max_num_seqs": 8})
    tasks_before = server.call(_num_tasks())
    warmup = asyncio.run(_round(server.target, seed=1))
    server.wait_for_idle_pools(timeout_s=30)
    rss_after_warmup = _rss_mib()
    counts = asyncio.run(_round(server.target, seed=2))
    stats = server.wait_for_idle_pools(timeout_s=30)
    growth_mib = _rss_mib() - rss_after_warmup
    assert {"length", "cancelled"} <= set(counts) and "aborted" in set(counts) | set(warmup)
    assert server.server.state.num_active_streams == 0
    assert not server.server.state.live_request_ids
    assert server.call(_tasks_settle(tasks_before)) == []
    assert stats.preemptions_total + stats.evictions_total > 0  # the KV pressure was real
    assert growth_mib < 64, f"RSS grew {growth_mib:.0f} MiB over a round"
