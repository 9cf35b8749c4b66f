"""What a replica fleet relies on: the health contract through loading, a signal during loading
and a drain (gRPC and HTTP /ready), reflection v1 discovery as grpcurl does it, the replica's
name in response metadata and GetServerInfo, and the load figure in GetStats."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from async_helpers import run, wait_until
from fake_engine import FakeEngine, serving, target
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc, model_pb2, model_pb2_grpc
from apex_grpc.server.app import GENERATION_SERVICE, MODEL_SERVICE, ApexServer, ServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFLECTION_V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


async def _health(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


def _http_ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_signal_during_load_keeps_readiness_off_while_liveness_stays_on():
    async def body():
        release = threading.Event()
        engine = FakeEngine(hold=asyncio.Event())

        def slow_factory() -> FakeEngine:
            release.wait(timeout=10)
            return engine

        server = ApexServer(ServerSettings(port=0, metrics_port=0, health_poll_s=0.02,
                                           shutdown_grace_s=5.0), slow_factory)
        await server.start()
        async with grpc.aio.insecure_channel(target(server)) as ch:
            load = asyncio.create_task(server.load_engine())
            assert await _health(ch, GENERATION_SERVICE) == NOT_SERVING
            assert await asyncio.to_thread(_http_ready, server.metrics_port) == 503
            await server.begin_drain()  # what SIGTERM does first, here while still loading
            release.set()
            await load
            # The engine is up, but the replica was told to go: it must not turn ready.
            assert await _health(ch, GENERATION_SERVICE) == NOT_SERVING
            assert await _health(ch, MODEL_SERVICE) == NOT_SERVING
            assert await asyncio.to_thread(_http_ready, server.metrics_port) == 503
            assert await _health(ch, "") == SERVING
            await server.stop()
        assert engine.closed

    run(body())


def test_liveness_stays_serving_through_the_drain_and_http_ready_follows():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine, metrics_port=0, shutdown_grace_s=5.0) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            assert await asyncio.to_thread(_http_ready, server.metrics_port) == 200
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5)
                                              .read().decode())
            # 32 free GPU blocks of the fake engine, no host tier, in tokens.
            assert (f"apex_kv_free_tokens {32.0 * engine.engine_config.block_size}"
                    in metrics)
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            in_flight = stub.GenerateStream(pb.GenerateRequest(request_id="busy", text="q"))
            await wait_until(lambda: "busy" in engine.live)
            stop = asyncio.create_task(server.stop())
            await wait_until(lambda: server.state.draining)
            statuses = (await _health(ch, GENERATION_SERVICE), await _health(ch, ""),
                        await asyncio.to_thread(_http_ready, server.metrics_port))
            engine.hold.set()
            chunks = [chunk async for chunk in in_flight]
            await stop
        return statuses, chunks

    (readiness, liveness, http_ready), chunks = run(body())
    assert (readiness, liveness, http_ready) == (NOT_SERVING, SERVING, 503)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_EOS


class _ReflectionV1:
    """A reflection v1 client on the raw method path (v1 has v1alpha's field numbers)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._rpc = channel.stream_stream(
            REFLECTION_V1_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)

    async def ask(self, **request) -> reflection_pb2.ServerReflectionResponse:
        call = self._rpc()
        await call.write(reflection_pb2.ServerReflectionRequest(**request))
        await call.done_writing()
        response = await call.read()
        assert not response.HasField("error_response"), response.error_response
        return response

    async def pool_for(self, symbol: str) -> descriptor_pool.DescriptorPool:
        """A descriptor pool holding symbol's file and every file it imports, as grpcurl does."""
        pool = descriptor_pool.DescriptorPool()
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        response = await self.ask(file_containing_symbol=symbol)
        pending = list(response.file_descriptor_response.file_descriptor_proto)
        while pending:
            proto = descriptor_pb2.FileDescriptorProto.FromString(pending.pop())
            if proto.name in files:
                continue
            files[proto.name] = proto
            for dependency in proto.dependency:
                if dependency not in files:
                    found = await self.ask(file_by_filename=dependency)
                    pending += found.file_descriptor_response.file_descriptor_proto
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)
        return pool


def test_reflection_v1_discovers_and_calls_the_service_without_the_proto():
    async def body():
        async with serving(FakeEngine(reply="abc")) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            client = _ReflectionV1(ch)
            listed = await client.ask(list_services="")
            names = {s.name for s in listed.list_services_response.service}
            pool = await client.pool_for("apex.v1.GenerationService")
            method = pool.FindServiceByName("apex.v1.GenerationService").methods_by_name[
                "Generate"]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            request = request_class(text="hi")
            request.stopping.max_new_tokens = 2
            generate = ch.unary_unary("/apex.v1.GenerationService/Generate",
                                      request_serializer=request_class.SerializeToString,
                                      response_deserializer=response_class.FromString)
            response = await generate(request)
            v1_pool = await client.pool_for("grpc.reflection.v1.ServerReflection")
            return names, response, v1_pool

    names, response, v1_pool = run(body())
    assert {"apex.v1.GenerationService", "apex.v1.ModelService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert response.text == "ab" and response.usage.completion_tokens == 2
    v1_method = v1_pool.FindServiceByName(
        "grpc.reflection.v1.ServerReflection").methods_by_name["ServerReflectionInfo"]
    assert v1_method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


def test_replica_is_named_in_metadata_and_server_info():
    async def body():
        engine = FakeEngine()
        async with serving(engine, replica_id="replica-a") as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            stream = stub.GenerateStream(pb.GenerateRequest(text="q"))
            initial = await stream.initial_metadata()
            _ = [chunk async for chunk in stream]
            bad = stub.Generate(pb.GenerateRequest(text=""))
            try:
                await bad
                raise AssertionError("an empty prompt was accepted")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                trailing = error.trailing_metadata()
            info = await model_pb2_grpc.ModelServiceStub(ch).GetServerInfo(
                model_pb2.GetServerInfoRequest())
        async with serving(FakeEngine()) as default_server, \
                grpc.aio.insecure_channel(target(default_server)) as ch:
            default_info = await model_pb2_grpc.ModelServiceStub(ch).GetServerInfo(
                model_pb2.GetServerInfoRequest())
        return dict(initial), dict(trailing), info, default_info, default_server.port

    initial, trailing, info, default_info, default_port = run(body())
    assert initial["apex-replica"] == trailing["apex-replica"] == "replica-a"
    assert info.replica_id == "replica-a"
    assert default_info.replica_id.endswith(f":{default_port}")


def test_get_stats_carries_the_load_a_router_needs():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            streams = [stub.GenerateStream(pb.GenerateRequest(request_id=f"r{i}", text="q"))
                       for i in range(2)]
            await wait_until(lambda: len(engine.live) == 2)
            busy = await model_pb2_grpc.ModelServiceStub(ch).GetStats(model_pb2.GetStatsRequest())
            engine.hold.set()
            for stream in streams:
                _ = [chunk async for chunk in stream]
            await wait_until(lambda: server.state.num_active_streams == 0)
            idle = await model_pb2_grpc.ModelServiceStub(ch).GetStats(model_pb2.GetStatsRequest())
        return busy, idle, engine.engine_config.block_size

    busy, idle, block_size = run(body())
    # The fake engine holds one GPU block per live request, 32 GPU blocks, no host tier.
    assert busy.load.num_requests == 2 and busy.load.num_active_streams == 2
    assert busy.load.free_kv_tokens == (32 - 2) * block_size
    assert busy.load.total_kv_tokens == 32 * block_size
    assert idle.load.num_requests == 0 and idle.load.num_active_streams == 0
    assert idle.load.free_kv_tokens == idle.load.total_kv_tokens


def test_replica_id_must_be_a_metadata_value():
    for bad in ("réplica", "a\nb", "  "):
        with pytest.raises(ValueError, match="--replica-id"):
            ServerSettings(replica_id=bad)
    assert ServerSettings(replica_id="apex-grpc-7d9f-x2").replica_id == "apex-grpc-7d9f-x2"
