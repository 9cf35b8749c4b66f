"""Python client for apex-grpc: blocking (ApexClient) and asyncio (AsyncApexClient).

Owns request building from keyword arguments, the channel set-up (TLS, bearer-token
metadata), per-call deadlines and retries with exponential backoff on UNAVAILABLE (a
warming-up, draining or dead replica). A stream is retried only until its first message
arrives; after that a failure is the caller's to see, so no output is ever duplicated.
Streams can be cancelled, which aborts the request on the server.

A fleet of replicas is one channel: give several "host:port" targets (or a `dns:///name:port`
target with load_balancing="round_robin", e.g. a Kubernetes headless Service) and gRPC's
round_robin policy spreads calls over every replica whose readiness is SERVING (client-side
health checking on apex.v1.GenerationService), so a draining or loading replica gets none.
Each result names the replica that served it (`replica_id`, from `apex-replica` metadata).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc, model_pb2, model_pb2_grpc
from clients.fleet import READINESS_SERVICE, channel_target_and_options, replica_of
from clients.results import ApexError, GenerationResult

DEFAULT_TARGET = "127.0.0.1:50051"
AUTH_TOKEN_ENV = "APEX_GRPC_AUTH_TOKEN"


ChatInput = Sequence[tuple[str, str]] | Sequence[dict[str, str]]


def build_request(*, text: str | None = None, token_ids: Sequence[int] | None = None,
                  chat: ChatInput | None = None, request_id: str | None = None,
                  add_special_tokens: bool | None = None,
                  add_generation_prompt: bool | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None,
                  min_p: float | None = None, repetition_penalty: float | None = None,
                  seed: int | None = None, max_new_tokens: int | None = None,
                  min_new_tokens: int = 0, stop: Iterable[str] = (),
                  stop_token_ids: Iterable[int] = (), include_stop_strings: bool = False,
                  ignore_eos: bool = False, time_limit_ms: int | None = None,
                  return_token_ids: bool = False, logprobs: bool = False,
                  top_logprobs: int = 0) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of text / token_ids / chat plus options; None means
    "server default". A request id is made here so the caller can Abort it by id."""
    if sum(value is not None for value in (text, token_ids, chat)) != 1:
        raise ValueError("give exactly one of text, token_ids or chat")
    request = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex)
    if text is not None:
        request.text = text
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        for message in chat:
            role, content = ((message["role"], message["content"])
                             if isinstance(message, dict) else message)
            request.chat.messages.add(role=role, content=content)
        request.chat.SetInParent()  # an empty list still selects chat (the server rejects it)
        if add_generation_prompt is not None:
            request.chat.add_generation_prompt = add_generation_prompt
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "repetition_penalty": repetition_penalty, "seed": seed}
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling, name, value)
    stopping = request.stopping
    if max_new_tokens is not None:
        stopping.max_new_tokens = max_new_tokens
    if time_limit_ms is not None:
        stopping.time_limit_ms = time_limit_ms
    stopping.min_new_tokens = min_new_tokens
    stopping.stop_strings.extend(stop)
    stopping.stop_token_ids.extend(stop_token_ids)
    stopping.include_stop_strings = include_stop_strings
    stopping.ignore_eos = ignore_eos
    request.response.token_ids = return_token_ids
    request.response.logprobs = logprobs
    request.response.top_logprobs = top_logprobs
    return request


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on UNAVAILABLE: attempt n waits initial * 2**n (capped, with +-20% jitter)."""

    max_retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def backoff_s(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * (2 ** attempt))
        return base * random.uniform(0.8, 1.2)


def _credentials(tls: bool, root_certificates: bytes | str | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    if isinstance(root_certificates, str):  # a path to a PEM file
        with open(root_certificates, "rb") as pem:
            root_certificates = pem.read()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _error(exc: grpc.RpcError) -> ApexError:
    return ApexError(exc.code(), exc.details() or "")


class _ClientBase:
    def __init__(self, target: str | Sequence[str], *, tls: bool = False,
                 root_certificates: bytes | str | None = None, auth_token: str | None = None,
                 timeout: float | None = None, retry: RetryPolicy = RetryPolicy(),
                 channel_options: Sequence[tuple[str, Any]] = (),
                 load_balancing: str | None = None) -> None:
        self.target, self._channel_options = channel_target_and_options(
            target, load_balancing, channel_options)
        self.timeout = timeout
        self.retry = retry
        self._credentials = _credentials(tls, root_certificates)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()

    def __repr__(self) -> str:  # the token stays out of reprs and logs
        return f"{type(self).__name__}(target={self.target!r})"

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _should_retry(self, exc: grpc.RpcError, attempt: int, deadline: float | None) -> float:
        """Seconds to wait before the next attempt, or -1 to give up."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.max_retries:
            return -1.0
        wait_s = self.retry.backoff_s(attempt)
        if deadline is not None and time.monotonic() + wait_s >= deadline:
            return -1.0
        return wait_s


class GenerationStream:
    """Iterator over a streamed generation (blocking); cancel() aborts it on the server."""

    def __init__(self, client: ApexClient, request: pb.GenerateRequest,
                 deadline: float | None) -> None:
        self.request_id = request.request_id
        self._client = client
        self._request = request
        self._deadline = deadline
        self._call = None
        self._cancelled = False
        self.replica_id = ""  # known once the first message has arrived

    def _open(self):
        return self._client._generation.GenerateStream(
            self._request, timeout=self._client._remaining(self._deadline),
            metadata=self._client._metadata)

    def __iter__(self) -> Iterator[GenerationResult]:
        attempt = 0
        received = False
        while True:
            self._call = self._open()
            try:
                for message in self._call:
                    if not received:
                        received = True
                        self.replica_id = replica_of(self._call.initial_metadata())
                    yield GenerationResult.from_proto(message, self.replica_id)
                return
            except grpc.RpcError as exc:
                if self._cancelled:
                    return
                wait_s = -1.0 if received else self._client._should_retry(
                    exc, attempt, self._deadline)
                if wait_s < 0:
                    raise _error(exc) from None
                time.sleep(wait_s)
                attempt += 1

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class ApexClient(_ClientBase):
    """Blocking client. Keyword arguments of generate*/ are those of build_request."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._channel_options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials,
                                                options=self._channel_options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._model = model_pb2_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _unary(self, method, request, timeout: float | None = None):
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=self._remaining(deadline),
                              metadata=self._metadata)
            except grpc.RpcError as exc:
                wait_s = self._should_retry(exc, attempt, deadline)
                if wait_s < 0:
                    raise _error(exc) from None
                time.sleep(wait_s)
                attempt += 1

    def generate(self, *, timeout: float | None = None, **request: Any) -> GenerationResult:
        response, call = self._unary(self._generation.Generate.with_call,
                                     build_request(**request), timeout)
        return GenerationResult.from_proto(response, replica_of(call.initial_metadata()))

    def generate_stream(self, *, timeout: float | None = None,
                        **request: Any) -> GenerationStream:
        return GenerationStream(self, build_request(**request), self._deadline(timeout))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        response = self._unary(self._generation.Tokenize, pb.TokenizeRequest(
            text=text, add_special_tokens=add_special_tokens))
        return list(response.ids)

    def abort(self, request_id: str) -> bool:
        return self._unary(self._generation.Abort, pb.AbortRequest(request_id=request_id)).aborted

    def model_info(self) -> model_pb2.GetModelInfoResponse:
        return self._unary(self._model.GetModelInfo, model_pb2.GetModelInfoRequest())

    def server_info(self) -> model_pb2.GetServerInfoResponse:
        return self._unary(self._model.GetServerInfo, model_pb2.GetServerInfoRequest())

    def stats(self) -> model_pb2.GetStatsResponse:
        return self._unary(self._model.GetStats, model_pb2.GetStatsRequest())

    def health(self, service: str = READINESS_SERVICE) -> str:
        """"SERVING", "NOT_SERVING", ... ("" = liveness, the default = readiness)."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(
            service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_ready(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except ApexError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} not ready after {timeout:.0f} s")
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ApexClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncGenerationStream:
    """Async iterator over a streamed generation; cancel() aborts it on the server."""

    def __init__(self, client: AsyncApexClient, request: pb.GenerateRequest,
                 deadline: float | None) -> None:
        self.request_id = request.request_id
        self._client = client
        self._request = request
        self._deadline = deadline
        self._call = None
        self._cancelled = False
        self.replica_id = ""  # known once the first message has arrived

    async def __aiter__(self):
        attempt = 0
        received = False
        while True:
            self._call = self._client._generation.GenerateStream(
                self._request, timeout=self._client._remaining(self._deadline),
                metadata=self._client._metadata)
            try:
                async for message in self._call:
                    if not received:
                        received = True
                        self.replica_id = replica_of(await self._call.initial_metadata())
                    yield GenerationResult.from_proto(message, self.replica_id)
                return
            except grpc.RpcError as exc:
                wait_s = -1.0 if received else self._client._should_retry(
                    exc, attempt, self._deadline)
                if wait_s < 0:
                    raise _error(exc) from None
                await asyncio.sleep(wait_s)
                attempt += 1
            except asyncio.CancelledError:
                if self._cancelled:  # our own cancel(): the stream just ends
                    return
                raise

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


class AsyncApexClient(_ClientBase):
    """asyncio client with the methods of ApexClient as coroutines (use `async with`)."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials,
                                                    options=self._channel_options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._model = model_pb2_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _unary(self, method, request, timeout: float | None = None,
                     with_call: bool = False):
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                call = method(request, timeout=self._remaining(deadline),
                              metadata=self._metadata)
                response = await call
                return (response, call) if with_call else response
            except grpc.RpcError as exc:
                wait_s = self._should_retry(exc, attempt, deadline)
                if wait_s < 0:
                    raise _error(exc) from None
                await asyncio.sleep(wait_s)
                attempt += 1

    async def generate(self, *, timeout: float | None = None,
                       **request: Any) -> GenerationResult:
        response, call = await self._unary(self._generation.Generate,
                                           build_request(**request), timeout, with_call=True)
        return GenerationResult.from_proto(response, replica_of(await call.initial_metadata()))

    def generate_stream(self, *, timeout: float | None = None,
                        **request: Any) -> AsyncGenerationStream:
        return AsyncGenerationStream(self, build_request(**request), self._deadline(timeout))

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        response = await self._unary(self._generation.Tokenize, pb.TokenizeRequest(
            text=text, add_special_tokens=add_special_tokens))
        return list(response.ids)

    async def abort(self, request_id: str) -> bool:
        response = await self._unary(self._generation.Abort,
                                     pb.AbortRequest(request_id=request_id))
        return response.aborted

    async def model_info(self) -> model_pb2.GetModelInfoResponse:
        return await self._unary(self._model.GetModelInfo, model_pb2.GetModelInfoRequest())

    async def server_info(self) -> model_pb2.GetServerInfoResponse:
        return await self._unary(self._model.GetServerInfo, model_pb2.GetServerInfoRequest())

    async def stats(self) -> model_pb2.GetStatsResponse:
        return await self._unary(self._model.GetStats, model_pb2.GetStatsRequest())

    async def health(self, service: str = READINESS_SERVICE) -> str:
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(
            service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncApexClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
