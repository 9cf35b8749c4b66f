"""Launch and lifecycle of the gRPC server: grpc.aio under uvloop, health, reflection, metrics.

Owns ServerSettings (the server-side serve flags), ApexServer (bind, load the engine off the
event loop, readiness polling, graceful drain) and run_server (signal handling and the exit
code). Order of life: the port opens first with readiness NOT_SERVING and generation RPCs
answering UNAVAILABLE; the engine is built in a worker thread; readiness turns SERVING and one
"ready" line is logged; SIGTERM/SIGINT drains (readiness NOT_SERVING, new requests UNAVAILABLE,
in-flight streams get the grace period), then the server stops and run_server returns 0.
Health: "" (liveness) is SERVING from the port opening until the process exits; readiness
(apex.v1.GenerationService, and apex.v1.ModelService with it) follows ServingState.is_ready and
turns NOT_SERVING the moment a signal arrives, even while the model is still loading.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from apex_grpc.engine.protocol import EngineClient
from apex_grpc.flags import flag
from apex_grpc.proto import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc
from apex_grpc.server.auth import BearerTokenInterceptor, load_server_credentials
from apex_grpc.server.metrics import ServerMetrics
from apex_grpc.server.reflection import enable_reflection
from apex_grpc.server.servicer import GenerationServicer, ModelServicer, ServingState

logger = logging.getLogger("apex_grpc.server")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
MODEL_SERVICE = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
AUTH_TOKEN_ENV = "APEX_GRPC_AUTH_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    """Server-side flags of `apex-grpc serve` (the engine's are in config.ServeOptions); each
    field made with flags.flag is one."""

    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(50051, "gRPC port (0: any free port)")
    metrics_port: int | None = flag(None, "serve Prometheus metrics on this port (off when unset)")
    tls_cert: str | None = flag(None, "PEM certificate chain (enables TLS)")
    tls_key: str | None = flag(None, "PEM private key")
    auth_token: str | None = flag(  # repr=False: never logged
        None, f"require 'authorization: Bearer TOKEN' (or set ${AUTH_TOKEN_ENV})", repr=False)
    max_concurrent_streams: int = flag(2048, "most RPCs in flight at once")
    max_message_bytes: int = flag(16 * 1024 * 1024, "largest gRPC message either way")
    max_queue_time_ms: int | None = flag(
        None, "give up (RESOURCE_EXHAUSTED) on requests with no output by then")
    max_prompt_len: int | None = flag(
        None, "reject longer prompts (INVALID_ARGUMENT); default: the context limit")
    shutdown_grace_s: float = flag(
        10.0, "seconds in-flight streams get to finish on SIGTERM/SIGINT", name="--shutdown-grace")
    drain_quiet_s: float = flag(
        1.0, "on SIGTERM/SIGINT keep the port open, refusing with UNAVAILABLE, until no request "
        "has arrived for this long (a balancer that still routes here gets a refusal its "
        "clients retry, not a reset stream); within --shutdown-grace", name="--drain-quiet")
    replica_id: str | None = flag(
        None, "name of this replica in GetServerInfo and the apex-replica response metadata "
        "(default: hostname:port)")
    # How often readiness re-reads engine.is_ready (a dead engine thread turns it false).
    health_poll_s: float = 0.5

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
        for name in ("max_concurrent_streams", "max_message_bytes", "health_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prompt_len is not None and self.max_prompt_len <= 0:
            raise ValueError(f"--max-prompt-len must be positive, got {self.max_prompt_len}")
        if self.max_queue_time_ms is not None and self.max_queue_time_ms <= 0:
            raise ValueError(f"--max-queue-time-ms must be positive, got {self.max_queue_time_ms}")
        for flag_name, value in (("--shutdown-grace", self.shutdown_grace_s),
                                 ("--drain-quiet", self.drain_quiet_s)):
            if value < 0:
                raise ValueError(f"{flag_name} must be >= 0, got {value}")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("--auth-token must not be empty")
        if self.replica_id is not None and not (self.replica_id.isascii()
                                                and self.replica_id.isprintable()
                                                and self.replica_id.strip()):
            # It travels as a gRPC metadata value: printable ASCII only.
            raise ValueError(f"--replica-id must be printable ASCII, got {self.replica_id!r}")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ApexServer:
    """One gRPC server around one engine; the engine comes from engine_factory (blocking)."""

    def __init__(self, settings: ServerSettings,
                 engine_factory: Callable[[], EngineClient]) -> None:
        self.settings = settings
        self._engine_factory = engine_factory
        self.state = ServingState(max_concurrent_streams=settings.max_concurrent_streams,
                                  max_queue_time_ms=settings.max_queue_time_ms,
                                  max_prompt_len=settings.max_prompt_len)
        self.metrics = ServerMetrics(lambda: self.state.engine)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task | None = None
        self._stopped = False

    async def start(self) -> int:
        """Open the port (readiness NOT_SERVING until load_engine); returns the bound port."""
        settings = self.settings
        credentials = None
        if settings.tls_cert is not None:
            credentials = load_server_credentials(settings.tls_cert, settings.tls_key)
        interceptors = [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # A second server on the same port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
        ])
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.state, self.metrics), self._server)
        model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.state), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection((GENERATION_SERVICE, MODEL_SERVICE, health.SERVICE_NAME), self._server)
        await self._set_readiness(False)
        address = _host_port(settings.host, settings.port)
        try:
            if credentials is not None:
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a busy or bad address this way
            raise OSError(f"could not bind {address}: {exc}") from exc
        if not self.port:
            raise OSError(f"could not bind {address}")
        self.state.replica_id = settings.replica_id or f"{socket.gethostname()}:{self.port}"
        await self._server.start()
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(settings.host, settings.metrics_port,
                                                   lambda: self.state.is_ready)
        loop_type = type(asyncio.get_running_loop())
        logger.info("event=listening address=%s replica_id=%s tls=%s auth=%s metrics_port=%s "
                    "event_loop=%s.%s", _host_port(settings.host, self.port),
                    self.state.replica_id, settings.tls_cert is not None,
                    settings.auth_token is not None, self.metrics_port, loop_type.__module__,
                    loop_type.__qualname__)
        return self.port

    async def load_engine(self) -> EngineClient:
        """Build the engine in a worker thread (the loop keeps answering health), then serve."""
        engine = await asyncio.to_thread(self._engine_factory)
        self.state.attach(engine)
        await self._set_readiness(self.state.is_ready)
        self._health_task = asyncio.create_task(self._poll_readiness())
        logger.info("apex-grpc ready on %s model=%s device=%s policy=%s",
                    _host_port(self.settings.host, self.port), engine.model_name,
                    engine.device_name, engine.engine_config.policy.value)
        return engine

    async def _set_readiness(self, ready: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in (GENERATION_SERVICE, MODEL_SERVICE):
            await self.health.set(service, status)

    async def _poll_readiness(self) -> None:
        was_ready = self.state.is_ready
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            ready = self.state.is_ready
            if ready != was_ready:
                logger.warning("event=readiness_changed ready=%s", ready)
                await self._set_readiness(ready)
                was_ready = ready

    async def begin_drain(self) -> None:
        """Not ready from now on: new requests get UNAVAILABLE, readiness NOT_SERVING."""
        if not self.state.draining:
            self.state.draining = True
            self.state.last_arrival_while_draining = time.monotonic()
        await self._set_readiness(False)

    async def _wait_until_unrouted(self, deadline: float) -> None:
        """Returns once no request has arrived for drain_quiet_s (or at the deadline).

        Balancers notice NOT_SERVING only at their next readiness checks (HAProxy here: within
        ~0.6 s). Until then they keep sending streams, and one that crosses a closing port is
        reset: HAProxy answers CANCELLED, which no client may retry."""
        while True:
            wake = min(self.state.last_arrival_while_draining + self.settings.drain_quiet_s,
                       deadline)
            now = time.monotonic()
            if now >= wake:
                return
            await asyncio.sleep(wake - now)

    async def stop(self) -> None:
        """Graceful drain: NOT_SERVING, refuse new requests, let in-flight ones finish."""
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.settings.shutdown_grace_s
        logger.info("event=draining grace_s=%.1f active_streams=%d", grace_s,
                    self.state.num_active_streams)
        await self.begin_drain()
        deadline = time.monotonic() + grace_s
        if self._health_task is not None:
            self._health_task.cancel()
        engine = self.state.engine
        if engine is not None:
            # Streams that outlive the grace end with ABORTED from the engine, not a reset.
            await engine.shutdown(grace_s)
        await self._wait_until_unrouted(deadline)
        if self._server is not None:
            # The engine has ended every request; this only lets handlers flush final messages.
            await self._server.stop(grace=min(grace_s, 2.0))
        if engine is not None and hasattr(engine, "close"):
            await asyncio.to_thread(engine.close)
        self.metrics.close()
        logger.info("event=stopped")


async def serve_until_signal(server: ApexServer) -> int:
    """Start, load the engine, serve until SIGTERM/SIGINT, drain; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    drain_tasks: set[asyncio.Task] = set()

    def on_signal(signum: int) -> None:
        if stop_requested.is_set():
            logger.warning("event=signal signal=%s already draining", signal.Signals(signum).name)
        else:
            logger.info("event=signal signal=%s", signal.Signals(signum).name)
            # Readiness drops now, not once loading or the drain gets going.
            drain_tasks.add(loop.create_task(server.begin_drain()))
        stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.start()
    load_task = asyncio.create_task(server.load_engine())
    stop_task = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if load_task.done() and load_task.exception() is not None:
        logger.error("event=engine_load_failed error=%r", load_task.exception())
        exit_code = 1
    elif not load_task.done():
        # A loading thread cannot be interrupted: wait for it so its engine is closed cleanly.
        logger.info("event=stop_during_load")
        await asyncio.wait({load_task})
        exit_code = 0 if load_task.exception() is None else 1
    else:
        await stop_task
    stop_task.cancel()
    await server.stop()
    return exit_code


def run_server(settings: ServerSettings, engine_factory: Callable[[], EngineClient]) -> int:
    """Run under uvloop when it is installed (it is a dependency off Windows)."""
    server = ApexServer(settings, engine_factory)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve_until_signal(server))
    return uvloop.run(serve_until_signal(server))
