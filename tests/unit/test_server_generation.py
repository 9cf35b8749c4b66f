"""GenerationService and ModelService over a real in-process grpc.aio server and a FakeEngine:
stream/unary equality, cancel and deadline freeing the engine request, status-code mapping,
Abort, concurrency and queue-time limits, introspection RPCs."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from async_helpers import run, wait_until
from fake_engine import FakeEngine, serving, target

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc, model_pb2, model_pb2_grpc
from apex_grpc.server.app import ApexServer, ServerSettings
from apex_grpc.server.servicer import GenerationServicer, ServingState


def _stub(channel) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(channel)


FULL_REQUEST = pb.GenerateRequest(
    text="hello", stopping=pb.StoppingCriteria(max_new_tokens=10),
    response=pb.ResponseOptions(token_ids=True, top_logprobs=2))


def test_stream_and_unary_results_are_equal():
    async def body():
        engine = FakeEngine(reply="abcdefghijklmnop")
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            stub = _stub(ch)
            unary = await stub.Generate(FULL_REQUEST)
            chunks = [chunk async for chunk in stub.GenerateStream(FULL_REQUEST)]
        return unary, chunks

    unary, chunks = run(body())
    assert unary.text == "abcdefghij" and len(unary.token_ids) == 10
    assert unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(chunks) == 10  # one message per engine output
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert all(not c.HasField("usage") for c in chunks[:-1])
    merged = pb.GenerateResponse(request_id=unary.request_id,
                                 text="".join(c.text for c in chunks),
                                 finish_reason=chunks[-1].finish_reason,
                                 matched_stop=chunks[-1].matched_stop,
                                 usage=chunks[-1].usage)
    for chunk in chunks:
        merged.token_ids.extend(chunk.token_ids)
        merged.logprobs.extend(chunk.logprobs)
    unary.ClearField("timing")  # decode time is measured, the rest must match exactly
    assert merged == unary
    assert unary.usage.prompt_tokens == 6 and unary.usage.completion_tokens == 10
    assert [t.token for t in unary.logprobs[0].top] == ["a", "b"]
    assert {c.request_id for c in chunks} == {chunks[0].request_id} and chunks[0].request_id


def test_token_ids_and_logprobs_only_when_asked():
    async def body():
        async with serving(FakeEngine()) as server, grpc.aio.insecure_channel(target(server)) as ch:
            return await _stub(ch).Generate(pb.GenerateRequest(request_id="r1", text="x"))

    response = run(body())
    assert response.request_id == "r1" and response.text == "Hello from the fake engine."
    assert not response.token_ids and not response.logprobs
    assert response.finish_reason == pb.FINISH_REASON_EOS and response.timing.ttft_ms == 2.5


async def _held_stream(engine: FakeEngine, stub, request_id: str, **call_kwargs):
    call = stub.GenerateStream(pb.GenerateRequest(request_id=request_id, text="q"), **call_kwargs)
    reader = asyncio.ensure_future(call.read())
    await wait_until(lambda: request_id in engine.live)
    return call, reader


def test_client_cancel_closes_the_engine_iterator():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            call, reader = await _held_stream(engine, _stub(ch), "cancel-me")
            call.cancel()
            await wait_until(lambda: "cancel-me" in engine.closed_early)
            assert not engine.live and server.state.num_active_streams == 0
            with pytest.raises(asyncio.CancelledError):
                await reader
            # A cancelled request frees its id: the same id may be used again.
            engine.hold.set()
            again = await _stub(ch).Generate(pb.GenerateRequest(request_id="cancel-me", text="q"))
            assert again.finish_reason == pb.FINISH_REASON_EOS

    run(body())


def test_client_deadline_aborts_the_engine_request_and_is_passed_on():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            before = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stub(ch).Generate(pb.GenerateRequest(request_id="slow", text="q"),
                                         timeout=0.5)
            await wait_until(lambda: "slow" in engine.closed_early)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = engine.calls[0].deadline
        assert deadline is not None and before < deadline < before + 0.6

    run(body())


class _ExpiredContext:
    """Just enough of grpc.aio.ServicerContext for a request whose deadline already passed."""

    def __init__(self) -> None:
        self.aborted_with = None
        self.trailing_metadata = ()

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = tuple(metadata)

    def time_remaining(self) -> float:
        return -0.01

    def code(self):
        return self.aborted_with

    async def abort(self, code, details):
        self.aborted_with = code
        raise grpc.aio.AbortError(details)


def test_expired_deadline_never_reaches_the_engine():
    async def body():
        engine = FakeEngine()
        state = ServingState()
        state.attach(engine)
        server = ApexServer(ServerSettings(port=0), lambda: engine)
        servicer = GenerationServicer(state, server.metrics)
        context = _ExpiredContext()
        with pytest.raises(grpc.aio.AbortError):
            await servicer.Generate(pb.GenerateRequest(text="late"), context)
        return engine, context, state

    engine, context, state = run(body())
    assert context.aborted_with == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not engine.calls and state.num_active_streams == 0


@pytest.mark.parametrize("engine_kwargs,code,details", [
    ({"max_live": 0}, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
    ({"unavailable": True}, grpc.StatusCode.UNAVAILABLE, "not accepting"),
    ({"error_after": 2}, grpc.StatusCode.INTERNAL, "fake engine fault"),
])
def test_engine_failures_map_to_status_codes(engine_kwargs, code, details):
    async def body():
        engine = FakeEngine(**engine_kwargs)
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            for method in ("Generate", "GenerateStream"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    call = getattr(_stub(ch), method)(pb.GenerateRequest(text="q"))
                    if method == "GenerateStream":
                        [_ async for _ in call]
                    else:
                        await call
                assert info.value.code() == code and details in info.value.details()
            # The server is still healthy afterwards.
            assert not engine.live

    run(body())


def test_abort_rpc_is_idempotent_and_ends_the_stream_with_aborted():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            stub = _stub(ch)
            unknown = await stub.Abort(pb.AbortRequest(request_id="nobody"))
            empty = await stub.Abort(pb.AbortRequest())
            call, reader = await _held_stream(engine, stub, "victim")
            first = await stub.Abort(pb.AbortRequest(request_id="victim"))
            last = await reader
            second = await stub.Abort(pb.AbortRequest(request_id="victim"))
            return unknown, empty, first, last, second

    unknown, empty, first, last, second = run(body())
    assert (unknown.aborted, empty.aborted, first.aborted, second.aborted) == (
        False, False, True, False)
    assert last.finish_reason == pb.FINISH_REASON_ABORTED and last.request_id == "victim"


def test_concurrency_cap_and_duplicate_ids():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine, max_concurrent_streams=1) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = _stub(ch)
            call, reader = await _held_stream(engine, stub, "one")
            with pytest.raises(grpc.aio.AioRpcError) as capped:
                await stub.Generate(pb.GenerateRequest(text="two"))
            call.cancel()
            await wait_until(lambda: server.state.num_active_streams == 0)
        engine = FakeEngine(hold=asyncio.Event())  # the first one was shut down with its server
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            call, reader = await _held_stream(engine, _stub(ch), "same")
            with pytest.raises(grpc.aio.AioRpcError) as duplicate:
                await _stub(ch).Generate(pb.GenerateRequest(request_id="same", text="again"))
            engine.hold.set()
            assert (await reader).request_id == "same"
        return capped.value, duplicate.value

    capped, duplicate = run(body())
    assert capped.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_streams" in capped.details()
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS


def test_queue_time_limit_gives_up_and_frees_the_request():
    async def body():
        engine = FakeEngine(hold=asyncio.Event())
        async with serving(engine, max_queue_time_ms=100) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stub(ch).Generate(pb.GenerateRequest(request_id="waits", text="q"))
            await wait_until(lambda: "waits" in engine.closed_early)
        return info.value

    error = run(body())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_time_ms" in error.details()


def test_unavailable_while_warming_up():
    async def body():
        server = ApexServer(ServerSettings(port=0), lambda: FakeEngine())
        await server.start()
        try:
            async with grpc.aio.insecure_channel(target(server)) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as generate:
                    await _stub(ch).Generate(pb.GenerateRequest(text="q"))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await model_pb2_grpc.ModelServiceStub(ch).GetModelInfo(
                        model_pb2.GetModelInfoRequest())
        finally:
            await server.stop()
        return generate.value, info.value

    generate, info = run(body())
    assert generate.code() == info.code() == grpc.StatusCode.UNAVAILABLE


def test_message_size_limit():
    async def body():
        async with serving(FakeEngine(), max_message_bytes=1024) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stub(ch).Generate(pb.GenerateRequest(text="x" * 4096))
        return info.value

    assert run(body()).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tokenize_and_model_service():
    async def body():
        engine = FakeEngine()
        async with serving(engine) as server, grpc.aio.insecure_channel(target(server)) as ch:
            ids = await _stub(ch).Tokenize(pb.TokenizeRequest(text="ab", add_special_tokens=True))
            long_ids = await _stub(ch).Tokenize(pb.TokenizeRequest(text="z" * 5000))
            model_stub = model_pb2_grpc.ModelServiceStub(ch)
            info = await model_stub.GetModelInfo(model_pb2.GetModelInfoRequest())
            server_info = await model_stub.GetServerInfo(model_pb2.GetServerInfoRequest())
            await _stub(ch).Generate(pb.GenerateRequest(text="abc"))
            stats = await model_stub.GetStats(model_pb2.GetStatsRequest())
        return ids, long_ids, info, server_info, stats

    ids, long_ids, info, server_info, stats = run(body())
    assert list(ids.ids) == [1, 3 + ord("a"), 3 + ord("b")] and len(long_ids.ids) == 5000
    assert info.model_name == "fake-model" and info.vocab_size == 512
    assert info.max_model_len == 128 and list(info.eos_token_ids) == [2]
    assert info.bos_token_id == 1 and info.has_chat_template and info.num_kv_heads == 2
    assert server_info.policy == "apex" and server_info.block_size == 16
    assert server_info.gpu_kv_blocks == 32 and server_info.kv_placement == "auto"
    assert stats.prompt_tokens_total == 4 and stats.steps_asymmetric_pipeline == 13
    assert stats.steps_graphed == 10
    assert stats.requests_finished_total == 1
