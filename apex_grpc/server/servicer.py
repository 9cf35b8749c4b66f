"""apex.v1 GenerationService and ModelService over an EngineClient.

Owns the per-RPC flow: admission (engine attached, not draining, concurrency cap, deadline),
validation, the engine request, the mapping of engine outcomes to gRPC status codes, request
metrics and request-id logging. The engine is reached only through engine.protocol; the
engine's async iterator is always closed in a finally block, which is what aborts the request
and frees its KV blocks when a client cancels or its deadline expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from apex_grpc.engine.protocol import EngineClient, EngineUnavailableError, QueueFullError
from apex_grpc.proto import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc
from apex_grpc.request import FinishReason, RequestOutput
from apex_grpc.server import convert
from apex_grpc.server.metrics import RequestTimer, ServerMetrics
from apex_grpc.server.validation import (ModelLimits, RequestValidator, ValidatedRequest,
                                         ValidationError)

logger = logging.getLogger("apex_grpc.server")

# Response metadata (initial on success, trailing on rejection) naming the replica that answered.
REPLICA_METADATA_KEY = "apex-replica"
# Longer inputs are tokenized in a worker thread so the event loop keeps serving other streams.
TOKENIZE_INLINE_MAX_CHARS = 2048


@dataclass
class ServingState:
    """What the servicers share with the app: the engine (None while loading) and draining."""

    max_concurrent_streams: int = 2048
    # Upper bound on the wait for a request's first output (queue plus prefill); None = off.
    max_queue_time_ms: int | None = None
    max_prompt_len: int | None = None  # operator's cap on prompts, below the context limit
    replica_id: str = ""  # set by the app once the port is bound
    engine: EngineClient | None = None
    validator: RequestValidator | None = None
    draining: bool = False
    # time.monotonic() of the drain's start or of the last request refused since.
    last_arrival_while_draining: float = 0.0
    num_active_streams: int = 0
    live_request_ids: set[str] = field(default_factory=set)

    def attach(self, engine: EngineClient) -> None:
        vocab_size = engine.model_config.vocab_size
        if engine.tokenizer is not None:
            # Ids past the tokenizer's vocabulary (padded embedding rows) cannot be detokenized.
            vocab_size = min(vocab_size, engine.tokenizer.vocab_size)
        limits = ModelLimits(vocab_size=vocab_size,
                             max_model_len=engine.engine_config.max_model_len,
                             max_stop_strings=engine.engine_config.max_stop_strings,
                             max_prompt_len=self.max_prompt_len)
        self.validator = RequestValidator(engine.tokenizer, limits)
        self.engine = engine

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and not self.draining and self.engine.is_ready


async def _abort(context: grpc.aio.ServicerContext, timer: RequestTimer | None, request_id: str,
                 code: grpc.StatusCode, details: str) -> None:
    """Ends the RPC with a status; logs and counts it first (abort raises)."""
    logger.info("request_id=%s event=rejected code=%s details=%r", request_id or "-",
                code.name, details)
    if timer is not None:
        timer.on_error(code.name)
    await context.abort(code, details)


async def _tokenize(func, text_len: int):
    if text_len <= TOKENIZE_INLINE_MAX_CHARS:
        return func()
    return await asyncio.to_thread(func)


def _request_text_len(request: generation_pb2.GenerateRequest) -> int:
    if request.WhichOneof("input") == "chat":
        return sum(len(m.content) for m in request.chat.messages)
    return len(request.text)


@dataclass
class _Call:
    """One admitted generation RPC."""

    request: ValidatedRequest
    options: convert.ResponseOptions
    timer: RequestTimer
    deadline: float | None
    finished: bool = False


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: ServingState, metrics: ServerMetrics) -> None:
        self.state = state
        self.metrics = metrics

    async def Generate(self, request, context):
        async with self._admitted(request, context) as call:
            outputs = [output async for output in self._engine_outputs(call, context)]
        return convert.unary_response(outputs, call.options, self.state.engine.tokenizer)

    async def GenerateStream(self, request, context):
        async with self._admitted(request, context) as call:
            tokenizer = self.state.engine.tokenizer
            async for output in self._engine_outputs(call, context):
                yield convert.stream_response(output, call.options, tokenizer)

    async def Tokenize(self, request, context):
        engine = await self._require_engine(context, "")
        if engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the model has no tokenizer")
        ids = await _tokenize(
            lambda: engine.tokenizer.encode(request.text,
                                            add_special_tokens=request.add_special_tokens),
            len(request.text))
        return generation_pb2.TokenizeResponse(ids=list(ids))

    async def Abort(self, request, context):
        engine = self.state.engine
        if engine is None or not request.request_id:
            return generation_pb2.AbortResponse(aborted=False)
        aborted = await engine.abort(request.request_id)
        logger.info("request_id=%s event=abort_rpc aborted=%s", request.request_id, aborted)
        return generation_pb2.AbortResponse(aborted=aborted)

    async def _require_engine(self, context, request_id: str) -> EngineClient:
        if self.state.engine is None:
            await _abort(context, None, request_id, grpc.StatusCode.UNAVAILABLE,
                         "the server is warming up (model loading)")
        if self.state.draining:
            self.state.last_arrival_while_draining = time.monotonic()
            await _abort(context, None, request_id, grpc.StatusCode.UNAVAILABLE,
                         "the server is shutting down")
        return self.state.engine

    @contextlib.asynccontextmanager
    async def _admitted(self, request, context) -> AsyncIterator[_Call]:
        """Admission and validation; holds a concurrency slot and the request id while open."""
        state = self.state
        timer = self.metrics.start_request()
        replica = ((REPLICA_METADATA_KEY, state.replica_id),)
        context.set_trailing_metadata(replica)  # a rejected call still says who rejected it
        await self._require_engine(context, request.request_id)
        if state.num_active_streams >= state.max_concurrent_streams:
            await _abort(context, timer, request.request_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"too many concurrent generation streams "
                         f"(max_concurrent_streams={state.max_concurrent_streams})")
        state.num_active_streams += 1
        call = None
        try:
            call = await self._validate(request, context, timer)
            state.live_request_ids.add(call.request.request_id)
            await context.send_initial_metadata(replica)
            yield call
        finally:
            state.num_active_streams -= 1
            if call is not None:
                state.live_request_ids.discard(call.request.request_id)
                if not call.finished and context.code() is None:
                    # Neither a finish nor an error status: the client went away.
                    timer.on_error(grpc.StatusCode.CANCELLED.name)
                    logger.info("request_id=%s event=cancelled", call.request.request_id)

    async def _validate(self, request, context, timer: RequestTimer) -> _Call:
        validator = self.state.validator
        try:
            validator.check_static(request)
            prompt_ids = await _tokenize(lambda: validator.prompt_ids(request),
                                         _request_text_len(request))
            validated = validator.finish(request, prompt_ids)
        except ValidationError as exc:
            await _abort(context, timer, request.request_id, grpc.StatusCode.INVALID_ARGUMENT,
                         str(exc))
        if validated.request_id in self.state.live_request_ids:
            await _abort(context, timer, validated.request_id, grpc.StatusCode.ALREADY_EXISTS,
                         f"request_id {validated.request_id!r} is already in flight")
        deadline = None
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= 0:
                await _abort(context, timer, validated.request_id,
                             grpc.StatusCode.DEADLINE_EXCEEDED,
                             "the client deadline passed before the request was queued")
            deadline = time.monotonic() + remaining
        options = convert.ResponseOptions(request_id=validated.request_id,
                                          return_token_ids=validated.return_token_ids,
                                          return_logprobs=validated.return_logprobs)
        return _Call(request=validated, options=options, timer=timer, deadline=deadline)

    async def _engine_outputs(self, call: _Call, context) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one call, with engine failures mapped to gRPC statuses."""
        req = call.request
        request_id = req.request_id
        logger.debug("request_id=%s event=queued prompt_tokens=%d max_new_tokens=%d",
                     request_id, len(req.prompt_ids), req.stopping.max_new_tokens)
        stream = None
        try:
            stream = self.state.engine.generate(request_id, req.prompt_ids, req.sampling,
                                                req.stopping, deadline=call.deadline)
            output = await self._first_output(stream)
            while True:
                if output.finish_reason == FinishReason.ERROR:
                    raise _EngineFault(output.error or "engine error")
                call.timer.on_tokens(len(output.token_ids))
                if output.finished:
                    self._on_finish(call, output)
                    yield output
                    return
                yield output
                output = await anext(stream)
        except QueueFullError as exc:
            await _abort(context, call.timer, request_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the waiting queue is full: {exc}")
        except EngineUnavailableError as exc:
            await _abort(context, call.timer, request_id, grpc.StatusCode.UNAVAILABLE,
                         f"the engine is not accepting requests: {exc}")
        except asyncio.TimeoutError:
            await _abort(context, call.timer, request_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the request waited longer than max_queue_time_ms="
                         f"{self.state.max_queue_time_ms} for its first output")
        except (_EngineFault, StopAsyncIteration) as exc:
            details = str(exc) if isinstance(exc, _EngineFault) else \
                "the engine ended the request without a finish reason"
            logger.error("request_id=%s event=engine_fault details=%r", request_id, details)
            await _abort(context, call.timer, request_id, grpc.StatusCode.INTERNAL, details)
        finally:
            # Closing the engine iterator is what aborts the request and frees its KV blocks.
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()

    async def _first_output(self, stream) -> RequestOutput:
        max_queue_time_ms = self.state.max_queue_time_ms
        if max_queue_time_ms is None:
            return await anext(stream)
        return await asyncio.wait_for(anext(stream), max_queue_time_ms / 1000.0)

    def _on_finish(self, call: _Call, output: RequestOutput) -> None:
        call.finished = True
        reason = convert.finish_reason_name(output.finish_reason)
        call.timer.on_finish(reason, output.completion_tokens, output.queue_ms)
        logger.info("request_id=%s event=finished finish_reason=%s prompt_tokens=%d "
                    "completion_tokens=%d queue_ms=%.1f ttft_ms=%.1f e2e_ms=%.1f",
                    call.request.request_id, reason, output.prompt_tokens,
                    output.completion_tokens, output.queue_ms, output.ttft_ms,
                    (time.monotonic() - call.timer.start) * 1000.0)


class _EngineFault(RuntimeError):
    """A RequestOutput carried FinishReason.ERROR."""


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def _engine(self, context) -> EngineClient:
        if self.state.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the server is warming up (model loading)")
        return self.state.engine

    async def GetModelInfo(self, request, context) -> model_pb2.GetModelInfoResponse:
        return convert.model_info_response(await self._engine(context))

    async def GetServerInfo(self, request, context) -> model_pb2.GetServerInfoResponse:
        return convert.server_info_response(await self._engine(context), self.state.replica_id)

    async def GetStats(self, request, context) -> model_pb2.GetStatsResponse:
        engine = await self._engine(context)
        return convert.stats_response(engine.stats(), engine.engine_config.block_size,
                                      self.state.num_active_streams)
