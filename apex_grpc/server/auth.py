"""Transport security of the gRPC server: TLS credentials and bearer-token authentication.

Owns the server interceptor that checks "authorization: Bearer <token>" metadata with a
constant-time comparison (health checks pass without a token so load balancers can probe),
and the loading of the TLS certificate and key. Tokens never reach a log line.
"""

from __future__ import annotations

import hmac
import logging
import pathlib
from typing import Awaitable, Callable

import grpc

logger = logging.getLogger("apex_grpc.server.auth")

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
BEARER_PREFIX = "bearer "


def _bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if text[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
                return text[len(BEARER_PREFIX):].strip().encode("utf-8")
            return None
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def reject_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token (metadata authorization: Bearer ...)")

    async def reject_stream(request_or_iterator, context):
        await reject_unary(request_or_iterator, context)
        yield  # pragma: no cover - abort raises first; the yield makes this an async generator

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(reject_unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(reject_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(reject_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(reject_stream, **codec)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every RPC but health checks unless it carries the configured bearer token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth token must not be empty")
        self._token = token.encode("utf-8")

    def __repr__(self) -> str:  # keep the secret out of any accidental log of the object
        return "BearerTokenInterceptor(token=***)"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        presented = _bearer_token(handler_call_details.invocation_metadata)
        if presented is not None and hmac.compare_digest(presented, self._token):
            return handler
        logger.warning("event=unauthenticated method=%s", handler_call_details.method)
        return _rejecting_handler(handler)


def load_server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; a clear error names the file that is missing."""
    pem = {}
    for name, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        file = pathlib.Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{name} {path}: no such file")
        pem[name] = file.read_bytes()
    return grpc.ssl_server_credentials([(pem["--tls-key"], pem["--tls-cert"])])
