"""Bearer-token authentication and TLS, with a self-signed certificate made in the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fake_engine import FakeEngine, serving, target
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc
from apex_grpc.server.app import ServerSettings
from apex_grpc.server.auth import BearerTokenInterceptor

TOKEN = "s3cret-token-value"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def _outcome(call_coro) -> grpc.StatusCode:
    try:
        await call_coro
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _stream_outcome(call) -> grpc.StatusCode:
    try:
        [_ async for _ in call]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_bearer_token_is_required_except_for_health(caplog):
    async def body():
        async with serving(FakeEngine(), auth_token=TOKEN) as server, \
                grpc.aio.insecure_channel(target(server)) as ch:
            stub = generation_pb2_grpc.GenerationServiceStub(ch)
            request = pb.GenerateRequest(text="q")
            good = (("authorization", f"Bearer {TOKEN}"),)
            outcomes = {
                "none": await _outcome(stub.Generate(request)),
                "wrong": await _outcome(stub.Generate(
                    request, metadata=(("authorization", "Bearer nope"),))),
                "not bearer": await _outcome(stub.Generate(
                    request, metadata=(("authorization", TOKEN),))),
                "stream none": await _stream_outcome(stub.GenerateStream(request)),
                "good": await _outcome(stub.Generate(request, metadata=good)),
                "stream good": await _stream_outcome(stub.GenerateStream(request, metadata=good)),
            }
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            return outcomes, health.status

    with caplog.at_level(logging.DEBUG):
        outcomes, health_status = run(body())
    assert outcomes == {"none": grpc.StatusCode.UNAUTHENTICATED,
                        "wrong": grpc.StatusCode.UNAUTHENTICATED,
                        "not bearer": grpc.StatusCode.UNAUTHENTICATED,
                        "stream none": grpc.StatusCode.UNAUTHENTICATED,
                        "good": grpc.StatusCode.OK, "stream good": grpc.StatusCode.OK}
    assert health_status == health_pb2.HealthCheckResponse.SERVING
    assert any("unauthenticated" in record.getMessage() for record in caplog.records)
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_secrets_stay_out_of_reprs():
    assert TOKEN not in repr(ServerSettings(auth_token=TOKEN))
    assert TOKEN not in repr(BearerTokenInterceptor(TOKEN))
    with pytest.raises(ValueError, match="auth token"):
        BearerTokenInterceptor("")


def _self_signed(tmp_path) -> tuple[str, str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path), cert_pem


def test_tls_with_a_self_signed_certificate_and_token(tmp_path):
    cert_path, key_path, cert_pem = _self_signed(tmp_path)

    async def body():
        async with serving(FakeEngine(), tls_cert=cert_path, tls_key=key_path,
                           auth_token=TOKEN) as server:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
            async with grpc.aio.secure_channel(target(server), credentials) as ch:
                stub = generation_pb2_grpc.GenerationServiceStub(ch)
                response = await stub.Generate(pb.GenerateRequest(text="q"),
                                               metadata=(("authorization", f"Bearer {TOKEN}"),))
            async with grpc.aio.insecure_channel(target(server)) as plain:
                plain_outcome = await _outcome(generation_pb2_grpc.GenerationServiceStub(
                    plain).Generate(pb.GenerateRequest(text="q"), timeout=2))
            return response, plain_outcome

    response, plain_outcome = run(body())
    assert response.finish_reason == pb.FINISH_REASON_EOS
    assert plain_outcome == grpc.StatusCode.UNAVAILABLE


def test_tls_flags_must_come_together_and_name_missing_files(tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        ServerSettings(tls_cert="a.pem")

    async def body():
        async with serving(FakeEngine(), tls_cert=str(tmp_path / "missing.crt"),
                           tls_key=str(tmp_path / "missing.key")):
            pass

    with pytest.raises(FileNotFoundError, match="--tls-cert"):
        run(body())
