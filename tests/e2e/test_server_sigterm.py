"""`python -m apex_grpc serve` as a real process on the tiny model: SIGTERM while streaming
lets the in-flight streams finish, refuses new requests with UNAVAILABLE, turns readiness (not
liveness) off, exits 0."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from clients.client import ApexClient, ApexError, RetryPolicy
from tests.process_logs import read_until

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sigterm_during_streaming_drains_and_exits_zero(tiny_config_path):
    command = [sys.executable, "-m", "apex_grpc", "serve", "--load-format", "dummy",
               "--dummy-config", tiny_config_path, "--device", "cpu", "--port", "0",
               "--gpu-kv-blocks", "64", "--host-kv-gb", "0.01", "--cpu-attention-threads", "1",
               "--shutdown-grace", "20", "--auth-token", "sigterm-secret"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    lines: list[str] = []
    try:
        ready = read_until(process, "apex-grpc ready on 127.0.0.1:", lines, timeout_s=120)
        target = "127.0.0.1:" + ready.split("127.0.0.1:")[1].split()[0]
        with ApexClient(target, auth_token="sigterm-secret",
                        retry=RetryPolicy(max_retries=0)) as client:
            streams = [iter(client.generate_stream(text=f"stream {i}", max_new_tokens=120,
                                                   ignore_eos=True)) for i in range(3)]
            firsts = [next(stream) for stream in streams]
            process.send_signal(signal.SIGTERM)
            read_until(process, "event=draining", lines, timeout_s=120)
            # Draining: not ready, still live (the process answers until it exits).
            assert client.health() == "NOT_SERVING" and client.health("") == "SERVING"
            with pytest.raises(ApexError) as late:
                client.generate(text="too late", max_new_tokens=2)
            rests = [list(stream) for stream in streams]
        threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert late.value.code == grpc.StatusCode.UNAVAILABLE
    for first, rest in zip(firsts, rests):
        assert rest[-1].finish_reason == "length"
        assert rest[-1].completion_tokens == 120
        assert first.request_id == rest[-1].request_id
    assert exit_code == 0
    assert all("sigterm-secret" not in line for line in lines)
