"""The client library against a fleet of in-process replicas (FakeEngine): round_robin over
several targets, client-side readiness checks keeping a draining replica out, retries of
UNAVAILABLE before the first token and never after one."""

from __future__ import annotations

import collections
import contextlib
import time

import grpc
import pytest
from fake_engine import FakeEngine, ServerThread

from apex_grpc.engine.protocol import EngineUnavailableError
from clients.client import ApexClient, ApexError, AsyncApexClient, RetryPolicy
from clients.fleet import channel_target_and_options, fleet_target, service_config

FAST_RETRY = RetryPolicy(max_retries=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def test_fleet_targets_become_one_grpc_target_with_round_robin():
    assert fleet_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert fleet_target(["[::1]:5", "::1:6"]) == "ipv6:[::1]:5,[::1]:6"
    target, options = channel_target_and_options(["127.0.0.1:1", "127.0.0.1:2"], None)
    assert target.startswith("ipv4:") and options == [("grpc.service_config",
                                                       service_config("round_robin"))]
    assert '"serviceName": "apex.v1.GenerationService"' in service_config("round_robin")
    assert channel_target_and_options("dns:///apex:50051", None) == ("dns:///apex:50051", [])
    for bad in (["apex-0:1", "apex-1:1"], ["127.0.0.1:1", "[::1]:2"], ["127.0.0.1:x", "1.2.3.4:5"]):
        with pytest.raises(ValueError):
            fleet_target(bad)
    with pytest.raises(ValueError, match="load_balancing"):
        service_config("least_request")


def _served_by(client: ApexClient, num_requests: int) -> collections.Counter:
    counts = collections.Counter()
    for i in range(num_requests):
        stream = client.generate_stream(text=f"q{i}", max_new_tokens=3)
        chunks = list(stream)
        assert chunks[-1].finish_reason == "length"
        assert {chunk.replica_id for chunk in chunks} == {stream.replica_id}
        counts[stream.replica_id] += 1
    return counts


def test_round_robin_spreads_calls_and_skips_a_draining_replica():
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(ServerThread(FakeEngine(reply="abcdef"),
                                                     replica_id=name))
                    for name in ("a", "b", "c")]
        # No retries: a call routed to the draining replica would fail, not be hidden.
        client = stack.enter_context(ApexClient([r.target for r in replicas],
                                                retry=RetryPolicy(max_retries=0)))
        client.wait_until_ready(timeout=10)
        deadline = time.monotonic() + 10
        # The channel connects to the replicas one by one; wait until all three take calls.
        while len(_served_by(client, 6)) < 3:
            assert time.monotonic() < deadline, "round_robin never reached all three replicas"
        assert _served_by(client, 30) == {"a": 10, "b": 10, "c": 10}

        replicas[0].call(replicas[0].server.begin_drain())  # readiness NOT_SERVING, port open
        time.sleep(0.2)  # the health watch stream pushes the change
        assert set(_served_by(client, 12)) == {"b", "c"}
        unary = client.generate(text="q", max_new_tokens=2)
        assert unary.replica_id in {"b", "c"} and unary.completion_tokens == 2


def test_a_stopped_replica_costs_retries_not_failures():
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(ServerThread(FakeEngine(reply="abcdef"),
                                                     replica_id=name))
                    for name in ("a", "b")]
        gone = ServerThread(FakeEngine(reply="abcdef"), replica_id="gone").__enter__()
        targets = [r.target for r in replicas] + [gone.target]
        gone.__exit__(None, None, None)  # its port is closed from here on
        client = stack.enter_context(ApexClient(targets, retry=FAST_RETRY))
        client.wait_until_ready(timeout=10)
        assert set(_served_by(client, 10)) == {"a", "b"}


class _DiesAfterFirstToken(FakeEngine):
    """An engine that delivers one token, then reports itself unavailable (UNAVAILABLE)."""

    async def _run(self, request_id, prompt_ids, sampling, stopping):
        async for output in super()._run(request_id, prompt_ids, sampling, stopping):
            yield output
            raise EngineUnavailableError("replica lost after the first token")


def test_unavailable_after_a_token_is_never_replayed():
    engine = _DiesAfterFirstToken(reply="abcdef")
    with ServerThread(engine) as replica, \
            ApexClient(replica.target, retry=FAST_RETRY) as client:
        stream = client.generate_stream(text="q", max_new_tokens=5)
        received = []
        with pytest.raises(ApexError) as failed:
            for chunk in stream:
                received.append(chunk)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert [chunk.text for chunk in received] == ["a"]
    assert len(engine.calls) == 1  # the request reached the engine once: no replay


def test_async_client_retries_unavailable_before_the_first_token_on_a_fleet():
    import asyncio

    engines = [FakeEngine(reply="abcdef", unavailable_first_calls=1) for _ in range(2)]
    with ServerThread(engines[0], replica_id="a") as a, \
            ServerThread(engines[1], replica_id="b") as b:

        async def body():
            async with AsyncApexClient([a.target, b.target], retry=FAST_RETRY) as client:
                results = []
                for i in range(4):
                    stream = client.generate_stream(text=f"q{i}", max_new_tokens=2)
                    results.append(([c async for c in stream], stream.replica_id))
                results.append(((await client.generate(text="q", max_new_tokens=2)),
                                 None))
                return results

        results = asyncio.run(asyncio.wait_for(body(), timeout=30))
    for chunks, replica_id in results[:-1]:
        assert "".join(c.text for c in chunks) == "ab" and replica_id in {"a", "b"}
    assert results[-1][0].text == "ab" and results[-1][0].replica_id in {"a", "b"}
    # Each replica refused its first call once, and those refusals were retried.
    assert sum(len(e.calls) for e in engines) == 5 + 2
