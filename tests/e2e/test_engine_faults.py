"""Engine faults on the real engine: a failing step fails only its requests (INTERNAL) and the
server keeps serving; a dead engine thread turns readiness to NOT_SERVING."""

from __future__ import annotations

import time

import grpc
import pytest

from clients.client import ApexClient, ApexError


def test_failing_step_gives_internal_and_the_server_keeps_serving(start_server):
    server = start_server()
    runner = server.engine.core.runner
    real_execute = runner.execute
    calls = []

    def execute_failing_once(plan):
        calls.append(plan)
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return real_execute(plan)

    runner.execute = execute_failing_once
    try:
        with ApexClient(server.target) as client:
            with pytest.raises(ApexError) as failed:
                client.generate(token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True)
            assert failed.value.code == grpc.StatusCode.INTERNAL
            assert "injected device fault" in failed.value.details
            after = client.generate(token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True)
            assert after.completion_tokens == 4
            assert client.health() == "SERVING"
    finally:
        runner.execute = real_execute
    server.wait_for_idle_pools()


# The engine thread dies on purpose here: its exception is the point of the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_turns_readiness_off(start_server):
    server = start_server()
    scheduler = server.engine.core.scheduler

    def broken_schedule():
        raise RuntimeError("scheduler invariant broken")

    scheduler.schedule = broken_schedule  # an error outside the step's fault boundary
    with ApexClient(server.target) as client:
        with pytest.raises(ApexError) as failed:
            client.generate(token_ids=[5, 6, 7], max_new_tokens=4)
        assert failed.value.code == grpc.StatusCode.INTERNAL
        deadline = time.monotonic() + 10
        while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.health() == "NOT_SERVING"
        assert client.health("") == "SERVING"  # liveness: the process still answers
        with pytest.raises(ApexError) as refused:
            client.generate(token_ids=[5, 6, 7], max_new_tokens=4)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
