"""The gRPC server end to end with the real engine on a tiny random-weight model: stream/unary
equality, batch invariance of greedy tokens, seeded sampling, stop strings, cancel and deadline
freeing KV blocks, Abort, validation, overload, preemption, metrics."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import grpc
import pytest

from apex_grpc.config import Policy
from clients.client import ApexClient, ApexError, AsyncApexClient

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def test_stream_and_unary_are_equal(tiny_server):
    with ApexClient(tiny_server.target) as client:
        for request in ({"text": "Hello there", "max_new_tokens": 24},
                        {"token_ids": [5, 77, 300, 12], "max_new_tokens": 17, "top_logprobs": 3}):
            whole = client.generate(**GREEDY, return_token_ids=True, **request)
            chunks = list(client.generate_stream(**GREEDY, return_token_ids=True, **request))
            assert whole.completion_tokens == request["max_new_tokens"] == len(whole.token_ids)
            assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids
            assert "".join(c.text for c in chunks) == whole.text
            assert chunks[-1].finish_reason == whole.finish_reason == "length"
            assert tuple(lp for c in chunks for lp in c.logprobs) == whole.logprobs
    tiny_server.wait_for_idle_pools()


def test_concurrent_greedy_streams_match_each_alone(tiny_server):
    prompts = [[(7 * i + j) % 250 + 3 for j in range(4 + i)] for i in range(16)]
    with ApexClient(tiny_server.target) as client:
        alone = [client.generate(token_ids=p, max_new_tokens=12, return_token_ids=True,
                                 **GREEDY).token_ids for p in prompts]

    async def together():
        async with AsyncApexClient(tiny_server.target) as client:
            async def one(prompt):
                chunks = [c async for c in client.generate_stream(
                    token_ids=prompt, max_new_tokens=12, return_token_ids=True, **GREEDY)]
                return tuple(t for c in chunks for t in c.token_ids)
            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(together()) == alone


def test_seeded_sampling_is_reproducible(tiny_server):
    sampled = {"temperature": 1.0, "top_k": 50, "ignore_eos": True, "max_new_tokens": 16,
               "return_token_ids": True, "text": "seed me"}
    with ApexClient(tiny_server.target) as client:
        first = client.generate(seed=1234, **sampled).token_ids
        again = client.generate(seed=1234, **sampled).token_ids
        other = client.generate(seed=4321, **sampled).token_ids
    assert first == again and first != other


def test_stop_strings_never_reach_the_client(tiny_server):
    with ApexClient(tiny_server.target) as client:
        free = client.generate(text="abc", max_new_tokens=40, **GREEDY).text
        stop = free[6:9]  # a stop string known to occur in the greedy continuation
        cut = free.index(stop)
        chunks = list(client.generate_stream(text="abc", max_new_tokens=40, stop=[stop],
                                             **GREEDY))
        streamed = "".join(c.text for c in chunks)
        kept = client.generate(text="abc", max_new_tokens=40, stop=[stop],
                               include_stop_strings=True, **GREEDY)
    assert streamed == free[:cut] and stop not in streamed
    assert chunks[-1].finish_reason == "stop" and chunks[-1].matched_stop == stop
    assert kept.text == free[:cut] + stop


def test_random_cancels_and_deadlines_free_every_block(tiny_server):
    rng = random.Random(0)

    async def one(client: AsyncApexClient, index: int) -> str:
        stream = client.generate_stream(token_ids=[rng.randrange(3, 250) for _ in range(20)],
                                        max_new_tokens=40, **GREEDY)
        stop_after = rng.randrange(0, 6)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= stop_after:
                stream.cancel()
        return "cancelled"

    async def many():
        async with AsyncApexClient(tiny_server.target) as client:
            semaphore = asyncio.Semaphore(32)

            async def bounded(index: int):
                async with semaphore:
                    return await one(client, index)
            results = await asyncio.gather(*(bounded(i) for i in range(200)))
            expired = 0
            for _ in range(10):
                try:
                    await client.generate(text="too slow", max_new_tokens=200, timeout=0.05,
                                          **GREEDY)
                except ApexError as error:
                    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
                    expired += 1
            return results, expired

    results, expired = asyncio.run(many())
    assert len(results) == 200 and expired > 0
    stats = tiny_server.wait_for_idle_pools()
    assert stats.requests_aborted_total > 0


def test_abort_rpc_and_unknown_ids(tiny_server):
    with ApexClient(tiny_server.target) as client:
        assert client.abort("no-such-request") is False
        stream = client.generate_stream(text="long", max_new_tokens=200, request_id="to-abort",
                                        **GREEDY)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                assert client.abort("to-abort") is True
        assert chunks[-1].finish_reason == "aborted" and len(chunks) < 200
        assert client.abort("to-abort") is False
    tiny_server.wait_for_idle_pools()


@pytest.mark.parametrize("request_kwargs,field_name", [
    ({"text": "x" * 300}, "text"),
    ({"text": "hi", "temperature": float("nan")}, "sampling.temperature"),
    ({"text": "hi", "top_p": 0.0}, "sampling.top_p"),
    ({"token_ids": [1, 512]}, "token_ids.ids[1]"),
    ({"text": "hi", "max_new_tokens": 0}, "stopping.max_new_tokens"),
    ({"text": "hi", "stop": [f"s{i}" for i in range(17)]}, "stopping.stop_strings"),
    ({"chat": [("user", "hi")]}, "chat"),  # the dummy model has no chat template
])
def test_invalid_requests_name_the_field_and_the_server_keeps_serving(
        tiny_server, request_kwargs, field_name):
    with ApexClient(tiny_server.target) as client:
        with pytest.raises(ApexError) as info:
            client.generate(**request_kwargs)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details.startswith(field_name)
        assert client.generate(text="ok", max_new_tokens=2).finished


def test_overload_rejects_the_excess_and_completes_the_rest(start_server):
    server = start_server({"max_num_seqs": 1, "max_waiting": 2})

    async def burst():
        async with AsyncApexClient(server.target) as client:
            async def one(index: int):
                try:
                    return await client.generate(token_ids=[index + 3] * 8, max_new_tokens=48,
                                                 **GREEDY)
                except ApexError as error:
                    return error.code
            return await asyncio.gather(*(one(i) for i in range(16)))

    outcomes = asyncio.run(burst())
    rejected = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    completed = [o for o in outcomes if not isinstance(o, grpc.StatusCode)]
    assert rejected and completed and len(rejected) + len(completed) == 16
    assert all(result.finish_reason == "length" for result in completed)
    server.wait_for_idle_pools()


def test_preempted_requests_resume_with_the_same_greedy_tokens(start_server):
    server = start_server({"policy": Policy.GPU_ONLY, "gpu_kv_blocks": 12, "host_kv_gb": 0.0,
                           "max_num_seqs": 4})
    prompts = [[(11 * i + j) % 250 + 3 for j in range(20)] for i in range(4)]
    with ApexClient(server.target) as client:
        alone = [client.generate(token_ids=p, max_new_tokens=60, return_token_ids=True,
                                 **GREEDY).token_ids for p in prompts]

    async def together():
        async with AsyncApexClient(server.target) as client:
            return await asyncio.gather(*(client.generate(
                token_ids=p, max_new_tokens=60, return_token_ids=True, **GREEDY)
                for p in prompts))

    results = asyncio.run(together())
    assert [r.token_ids for r in results] == alone
    assert sum(r.timing.num_preemptions for r in results) > 0
    server.wait_for_idle_pools()


def test_health_reflection_metrics(start_server):
    server = start_server(metrics_port=0)
    with ApexClient(server.target) as client:
        assert client.health() == "SERVING" and client.health("") == "SERVING"
        client.generate(text="measure me", max_new_tokens=5, **GREEDY)
        info = client.model_info()
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert info.vocab_size == 512 and not info.has_chat_template
    for name in ('apex_kv_total_blocks{tier="gpu"} 128.0', "apex_generation_tokens_total",
                 "apex_engine_steps_total", "apex_time_to_first_token_seconds_count 1.0",
                 'apex_requests_finished_total{finish_reason="length"} 1.0'):
        assert name in text, name
