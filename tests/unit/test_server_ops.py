"""Operational behaviour of the server: health transitions, reflection, Prometheus metrics,
graceful drain, and robustness against garbage bytes on the port."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request

import grpc
from async_helpers import run, wait_until
from fake_engine import FakeEngine, serving, target
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc
from apex_grpc.server.app import GENERATION_SERVICE, ApexServer, ServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def _wait_for_health(channel, service: str, status: int) -> None:
    deadline = time.monotonic() + 5.0
    while await _health(channel, service) != status:
        assert time.monotonic() < deadline, f"{service!r} never reached status {status}"
        await asyncio.sleep(0.02)


def test_readiness_follows_loading_engine_state_and_drain():
    async def body():
        loaded = threading.Event()
        engine = FakeEngine(hold=asyncio.Event())

        def slow_factory() -> FakeEngine:
            loaded.wait(timeout=10)
            return engine

        server = ApexServer(ServerSettings(port=0, health_poll_s=0.02, shutdown_grace_s=5.0),
                            slow_factory)
        await server.start()
        async with grpc.aio.insecure_channel(target(server)) as ch:
            load = asyncio.create_task(server.load_engine())
            assert await _health(ch, "") == SERVING  # live while loading
            assert await _health(ch, GENERATION_SERVICE) == NOT_SERVING
            loaded.set()
            await load
            assert await _health(ch, GENERATION_SERVICE) == SERVING
            engine.ready = False  # e.g. the engine thread died
            await _wait_for_health(ch, GENERATION_SERVICE, NOT_SERVING)
            engine.ready = True
            await _wait_for_health(ch, GENERATION_SERVICE, SERVING)

            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            in_flight = stub.GenerateStream(pb.GenerateRequest(request_id="busy", text="q"))
            await wait_until(lambda: "busy" in engine.live)
            stop = asyncio.create_task(server.stop())
            await wait_until(lambda: server.state.draining)
            assert await _health(ch, GENERATION_SERVICE) == NOT_SERVING
            try:
                await stub.Generate(pb.GenerateRequest(text="late"))
                raise AssertionError("a request during the drain was accepted")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            engine.hold.set()
            chunks = [chunk async for chunk in in_flight]
            await stop
        assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS
        assert engine.shutdown_grace_s == 5.0 and engine.closed

    run(body())


def test_streams_outliving_the_grace_end_aborted():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine, shutdown_grace_s=0.2) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            in_flight = stub.GenerateStream(pb.GenerateRequest(request_id="stuck", text="q"))
            await wait_until(lambda: "stuck" in engine.live)
            stop = asyncio.create_task(server.stop())
            chunks = [chunk async for chunk in in_flight]
            await stop
        return chunks

    chunks = run(body())
    assert chunks[-1].finish_reason == pb.FINISH_REASON_ABORTED


def test_drain_keeps_refusing_until_requests_stop_arriving():
    """A balancer routes here until its next readiness check: the port stays open, refusing
    with UNAVAILABLE, until no request has arrived for drain_quiet_s, within the grace."""
    quiet_s = 0.4

    async def body():
        async with serving(FakeEngine(), drain_quiet_s=quiet_s, shutdown_grace_s=5.0) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            stop = asyncio.create_task(server.stop())
            await wait_until(lambda: server.state.draining)
            refusals = []
            for _ in range(6):  # 0.6 s of arrivals, each closer than quiet_s to the last
                try:
                    await stub.Generate(pb.GenerateRequest(text="late"))
                except grpc.aio.AioRpcError as error:
                    refusals.append((error.code(), error.details()))
                await asyncio.sleep(0.1)
                assert not stop.done()
            last_request = time.monotonic()
            await stop
            return refusals, time.monotonic() - last_request

    refusals, closed_after_s = run(body())
    assert refusals == [(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")] * 6
    assert quiet_s - 0.15 <= closed_after_s < quiet_s + 2.0


def test_drain_quiet_wait_ends_at_the_grace():
    async def body():
        async with serving(FakeEngine(), drain_quiet_s=30.0, shutdown_grace_s=0.3) as server:
            started = time.monotonic()
            await server.stop()
            return time.monotonic() - started

    assert run(body()) < 2.5


def test_reflection_lists_the_services():
    async def body():
        async with serving(FakeEngine()) as server, grpc.aio.insecure_channel(target(server)) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            response = await call.read()
            await call.done_writing()
            return {s.name for s in response.list_services_response.service}

    names = run(body())
    assert {"apex.v1.GenerationService", "apex.v1.ModelService",
            "grpc.health.v1.Health"} <= names


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_endpoint_serves_engine_and_request_metrics():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine, metrics_port=0) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            cancelled = stub.GenerateStream(pb.GenerateRequest(request_id="gone", text="q"))
            await wait_until(lambda: "gone" in engine.live)
            cancelled.cancel()
            await wait_until(lambda: server.state.num_active_streams == 0)
            engine.hold.set()
            await stub.Generate(pb.GenerateRequest(text="q"))
            await stub.Generate(pb.GenerateRequest(text="q",
                                                   stopping=pb.StoppingCriteria(max_new_tokens=3)))
            return await asyncio.to_thread(_scrape, server.metrics_port)

    text = run(body())
    for name in ("apex_requests_running", "apex_requests_waiting", "apex_requests_host_resident",
                 'apex_kv_used_blocks{tier="gpu"}', 'apex_kv_total_blocks{tier="host"}',
                 "apex_preemptions_total 3.0", "apex_evictions_total 4.0",
                 "apex_restores_total 5.0", 'apex_engine_steps_total{strategy="async_overlap"} 12.0',
                 "apex_engine_steps_graphed_total 10.0",
                 "apex_prompt_tokens_total", "apex_generation_tokens_total 7.0",
                 "apex_step_predicted_seconds 0.004", "apex_step_measured_seconds 0.005",
                 "apex_time_to_first_token_seconds_count 2.0",
                 "apex_inter_token_latency_seconds_count",
                 "apex_time_per_output_token_seconds_count 2.0",
                 "apex_e2e_request_latency_seconds_count 2.0",
                 "apex_queue_time_seconds_count 2.0",
                 'apex_requests_finished_total{finish_reason="eos"} 1.0',
                 'apex_requests_finished_total{finish_reason="length"} 1.0',
                 'apex_requests_failed_total{code="CANCELLED"} 1.0'):
        assert name in text, name


def test_garbage_and_truncated_http2_do_not_crash_the_server():
    async def body():
        async with serving(FakeEngine()) as server, grpc.aio.insecure_channel(target(server)) as ch:
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            settings_header = b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"  # promises 18 bytes
            for payload in (os.urandom(4096), preface[:10], preface + settings_header + b"\x00\x03",
                            preface + b"\xff" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(payload)
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1024), timeout=0.5)
                except (asyncio.TimeoutError, ConnectionError):
                    pass
                writer.close()
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            return await stub.Generate(pb.GenerateRequest(text="still there?"))

    assert run(body()).finish_reason == pb.FINISH_REASON_EOS
