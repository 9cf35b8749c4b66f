"""Sends a benchmark workload to an apex-grpc server over grpc.aio and times every message.

Owns the connection (channel credentials and bearer-token metadata; one server, or a fleet of
replicas over gRPC's round_robin, see clients.fleet), the server probe (GetModelInfo +
GetServerInfo), the send loop (arrival schedule, --max-concurrency semaphore, warm-ups,
cancellation injection, retries of UNAVAILABLE before the first token, a tqdm progress bar) and
the GetStats snapshots taken, with the servers idle, before and after the measured run (summed
over the replicas when they are listed). Talks to the generated stubs directly, so per-message
client overhead is one protobuf parse and one clock read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from apex_grpc.proto import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc
from clients.bench.arrivals import arrival_offsets
from clients.bench.metrics import RequestRecord
from clients.bench.workloads import BenchRequest
from clients.fleet import channel_target_and_options, replica_of

PROBE_TIMEOUT_S = 30.0
STATS_POLL_INTERVAL_S = 0.05
# The stream ended without a message carrying a finish_reason (a contract violation).
NO_FINISH_REASON = "NO_FINISH_REASON"
_UNFINISHED = generation_pb2.FINISH_REASON_UNSPECIFIED
# Before retry 1, 2, ...; the last one repeats. Five retries span 1.55 s: longer than a
# balancer takes to notice a draining replica (deploy/kubernetes/haproxy.cfg: ~0.6 s).
RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)


class BenchError(RuntimeError):
    """The benchmark cannot run (unreachable server, failed warm-up)."""


@dataclass(frozen=True)
class ConnectionOptions:
    target: str  # host:port or any gRPC target (dns:///name:port); a label when replicas is set
    tls: bool = False  # TLS with the system's root certificates
    tls_ca: str | None = None  # PEM file of the root certificate(s); implies TLS
    auth_token: str | None = None  # sent as `authorization: Bearer <token>` metadata
    replicas: tuple[str, ...] = ()  # IP:PORT of each replica: one round_robin channel over all
    load_balancing: str | None = None  # gRPC policy (round_robin for a dns:/// fleet)

    def open_channel(self) -> grpc.aio.Channel:
        """The channel the load goes through (all replicas when they are listed)."""
        try:
            target, options = channel_target_and_options(self.replicas or self.target,
                                                          self.load_balancing)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        return self._channel(target, options)

    def stats_channels(self) -> list[grpc.aio.Channel]:
        """One channel per listed replica, for their GetStats (none when none are listed)."""
        return [self._channel(replica, []) for replica in self.replicas]

    def _channel(self, target: str, options: list) -> grpc.aio.Channel:
        if self.tls_ca is None and not self.tls:
            return grpc.aio.insecure_channel(target, options=options)
        root_certificates = None
        if self.tls_ca is not None:
            try:
                root_certificates = Path(self.tls_ca).read_bytes()
            except OSError as exc:
                raise BenchError(f"--tls-ca {self.tls_ca}: {exc.strerror}") from None
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.aio.secure_channel(target, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.auth_token:
            return ()
        return (("authorization", f"Bearer {self.auth_token}"),)


@dataclass(frozen=True)
class ServerDescription:
    model_name: str
    vocab_size: int
    max_model_len: int
    policy: str
    version: str
    device_name: str


@dataclass(frozen=True)
class RunOptions:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    request_timeout_s: float | None = None
    # How long to wait for the server to go idle before each GetStats snapshot.
    settle_timeout_s: float = 10.0
    show_progress: bool = True
    # Resend a request refused with UNAVAILABLE before any token (loading, draining or dead
    # replica) up to this many times; a stream that delivered a token is never resent.
    max_retries: int = 5


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]  # in workload order
    duration_s: float
    stats_before: dict[str, float]
    stats_after: dict[str, float]

    @property
    def stats_delta(self) -> dict[str, float]:
        """Change of every counter field (totals since server start) over the run."""
        return {name: self.stats_after[name] - self.stats_before[name]
                for name in self.stats_after if _is_counter(name)}


def _is_counter(field_name: str) -> bool:
    return field_name.endswith("_total") or field_name.startswith("steps_")


async def describe_server(channel: grpc.aio.Channel,
                          metadata: tuple[tuple[str, str], ...]) -> ServerDescription:
    stub = model_pb2_grpc.ModelServiceStub(channel)
    try:
        model = await stub.GetModelInfo(model_pb2.GetModelInfoRequest(), metadata=metadata,
                                        timeout=PROBE_TIMEOUT_S, wait_for_ready=True)
        server = await stub.GetServerInfo(model_pb2.GetServerInfoRequest(), metadata=metadata,
                                          timeout=PROBE_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"cannot query the server: {exc.code().name}: {exc.details()}") from None
    return ServerDescription(model_name=model.model_name, vocab_size=model.vocab_size,
                             max_model_len=model.max_model_len, policy=server.policy,
                             version=server.version, device_name=server.device_name)


def build_generate_request(req: BenchRequest, request_id: str) -> generation_pb2.GenerateRequest:
    message = generation_pb2.GenerateRequest(
        request_id=request_id,
        stopping=generation_pb2.StoppingCriteria(max_new_tokens=req.output_len,
                                                 ignore_eos=req.ignore_eos),
        # Token ids let the client count tokens per message (cancel after k tokens).
        response=generation_pb2.ResponseOptions(token_ids=True),
    )
    if req.prompt_ids is not None:
        message.token_ids.ids.extend(req.prompt_ids)
    else:
        message.text = req.prompt_text
    return message


async def send_request(stub: generation_pb2_grpc.GenerationServiceStub, req: BenchRequest,
                       request_id: str, metadata: tuple[tuple[str, str], ...],
                       timeout_s: float | None, max_retries: int = 0) -> RequestRecord:
    """Stream one request, resent while it is refused with UNAVAILABLE before any message;
    times count from the first send."""
    message = build_generate_request(req, request_id)
    send_time = time.perf_counter()
    deadline = None if timeout_s is None else send_time + timeout_s
    attempt = 0
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
        record, received = await _send_once(stub, req, message, metadata, remaining, send_time)
        backoff_s = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
        if (received or record.error_code != grpc.StatusCode.UNAVAILABLE.name
                or attempt >= max_retries
                or (deadline is not None and time.perf_counter() + backoff_s >= deadline)):
            return dataclasses.replace(record, num_retries=attempt)
        await asyncio.sleep(backoff_s)
        attempt += 1


async def _send_once(stub: generation_pb2_grpc.GenerationServiceStub, req: BenchRequest,
                     message: generation_pb2.GenerateRequest,
                     metadata: tuple[tuple[str, str], ...], timeout_s: float | None,
                     send_time: float) -> tuple[RequestRecord, bool]:
    """One attempt; cancels after req.cancel_after_tokens tokens when set. Returns the record
    and whether any message arrived."""
    chunk_times: list[float] = []
    num_tokens = 0
    final = None
    replica_id = ""
    received = False
    end_time = send_time
    call = stub.GenerateStream(message, metadata=metadata, timeout=timeout_s)
    try:
        async for response in call:
            end_time = time.perf_counter()
            if not received:
                received = True
                replica_id = replica_of(await call.initial_metadata())
            if response.token_ids or response.text:
                chunk_times.append(end_time)
            num_tokens += len(response.token_ids)
            if response.finish_reason != _UNFINISHED:
                final = response
            elif req.cancel_after_tokens is not None and num_tokens >= req.cancel_after_tokens:
                call.cancel()
                return RequestRecord(send_time, tuple(chunk_times), end_time, req.input_len,
                                     num_tokens, success=False, cancelled=True,
                                     replica_id=replica_id), True
    except grpc.aio.AioRpcError as exc:
        return RequestRecord(send_time, tuple(chunk_times), time.perf_counter(), req.input_len,
                             num_tokens, success=False, error_code=exc.code().name,
                             replica_id=replica_id or replica_of(exc.trailing_metadata())
                             ), received
    if final is None:
        return RequestRecord(send_time, tuple(chunk_times), end_time, req.input_len, num_tokens,
                             success=False, error_code=NO_FINISH_REASON,
                             replica_id=replica_id), received
    return RequestRecord(send_time, tuple(chunk_times), end_time, final.usage.prompt_tokens,
                         final.usage.completion_tokens, success=True,
                         finish_reason=generation_pb2.FinishReason.Name(final.finish_reason),
                         replica_id=replica_id), True


def _stats_fields(message) -> dict[str, float]:
    """A GetStatsResponse as flat numbers; a nested message's fields get its name as prefix
    (load.num_requests -> load_num_requests)."""
    values: dict[str, float] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is None:
            values[field.name] = value
        else:
            values.update({f"{field.name}_{name}": sub_value
                           for name, sub_value in _stats_fields(value).items()})
    return values


async def fetch_stats(channels: list[grpc.aio.Channel],
                      metadata: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """GetStats of each channel's server, summed field by field."""
    total: dict[str, float] = {}
    for channel in channels:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        response = await stub.GetStats(model_pb2.GetStatsRequest(), metadata=metadata,
                                       timeout=PROBE_TIMEOUT_S)
        for name, value in _stats_fields(response).items():
            total[name] = total.get(name, 0) + value
    return total


async def settled_stats(channels: list[grpc.aio.Channel], metadata: tuple[tuple[str, str], ...],
                        timeout_s: float) -> dict[str, float]:
    """GetStats once nothing runs or waits (aborts of cancelled streams land asynchronously),
    or after timeout_s when other traffic keeps the servers busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await fetch_stats(channels, metadata)
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if idle or time.monotonic() >= deadline:
            return stats
        await asyncio.sleep(STATS_POLL_INTERVAL_S)


async def run_benchmark(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...],
                        requests: list[BenchRequest], options: RunOptions,
                        stats_channels: list[grpc.aio.Channel] | None = None) -> RunResult:
    """Warm up, snapshot GetStats, send the workload on its arrival schedule, snapshot again.
    stats_channels: the servers whose GetStats are summed (default: channel's)."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    stats_channels = stats_channels or [channel]
    run_id = uuid.uuid4().hex[:8]
    if options.num_warmups > 0:
        await _warm_up(stub, requests, metadata, options, run_id)
    stats_before = await settled_stats(stats_channels, metadata, options.settle_timeout_s)
    offsets = arrival_offsets(len(requests), options.request_rate, options.burstiness,
                              options.seed)
    semaphore = asyncio.Semaphore(options.max_concurrency or len(requests))
    with tqdm(total=len(requests), disable=not options.show_progress, unit="req") as progress:
        start = time.perf_counter()

        async def send_at(index: int, req: BenchRequest) -> RequestRecord:
            delay = start + offsets[index] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with semaphore:
                record = await send_request(stub, req, f"bench-{run_id}-{index}", metadata,
                                            options.request_timeout_s, options.max_retries)
            progress.update(1)
            return record

        records = await asyncio.gather(*(send_at(i, req) for i, req in enumerate(requests)))
        duration_s = time.perf_counter() - start
    stats_after = await settled_stats(stats_channels, metadata, options.settle_timeout_s)
    return RunResult(list(records), duration_s, stats_before, stats_after)


async def _warm_up(stub: generation_pb2_grpc.GenerationServiceStub, requests: list[BenchRequest],
                   metadata: tuple[tuple[str, str], ...], options: RunOptions,
                   run_id: str) -> None:
    """Send num_warmups requests from the head of the workload, never cancelled, unmeasured."""
    warmups = [dataclasses.replace(requests[i % len(requests)], cancel_after_tokens=None)
               for i in range(options.num_warmups)]
    semaphore = asyncio.Semaphore(options.max_concurrency or len(warmups))

    async def send(index: int, req: BenchRequest) -> RequestRecord:
        async with semaphore:
            return await send_request(stub, req, f"warmup-{run_id}-{index}", metadata,
                                      options.request_timeout_s, options.max_retries)

    records = await asyncio.gather(*(send(i, req) for i, req in enumerate(warmups)))
    failed = [rec.error_code for rec in records if not rec.success]
    if failed:
        raise BenchError(f"{len(failed)} of {len(warmups)} warm-up requests failed "
                         f"(codes: {', '.join(sorted(set(failed)))}); check the target and "
                         f"the workload flags")
