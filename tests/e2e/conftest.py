"""End-to-end fixtures: a real apex-grpc server (real engine) on 127.0.0.1 and a free port.

The server runs on its own event-loop thread inside the test process, so tests use ordinary
blocking clients (or their own asyncio loop) over real loopback gRPC. The model is a tiny
random-weight Llama (dummy load format, byte-level tokenizer): every code path of the engine
runs, in well under a second per request on a CPU.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

# Imported here, not in the fixtures: a project module that does not import (a broken native
# build, say) must fail every e2e test, not skip it.
from apex_grpc.engine.builder import build_engine
from apex_grpc.server.app import ApexServer, ServerSettings
from tiny_options import tiny_serve_options

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama") / "config.json"
    path.write_text(json.dumps(TINY_LLAMA), encoding="utf-8")
    return str(path)


class InProcessServer:
    """ApexServer + real engine on a background event loop; `target` is "127.0.0.1:PORT"."""

    def __init__(self, serve_options, **settings) -> None:
        self.serve_options = serve_options
        self.settings = {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 2.0,
                         "drain_quiet_s": 0.0, **settings}
        self.loop = asyncio.new_event_loop()
        self.server = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine(self):
        return self.server.state.engine

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def start(self) -> InProcessServer:
        self._thread.start()
        self.server = ApexServer(ServerSettings(**self.settings),
                                 lambda: build_engine(self.serve_options))

        async def start() -> None:
            await self.server.start()
            await self.server.load_engine()

        self.call(start(), timeout_s=120.0)
        return self

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def wait_for_idle_pools(self, timeout_s: float = 10.0):
        """Engine stats once nothing runs or waits and no KV block is in use (else fail)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.engine.stats()
            if (stats.num_running == stats.num_waiting == 0
                    and stats.gpu_kv_used_blocks == stats.host_kv_used_blocks == 0):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks or requests still held: {stats}")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def start_server(tiny_config_path):
    """Factory: start_server(serve_overrides={...}, **server_settings) -> InProcessServer on
    the tiny model, or start_server(serve_options=ServeOptions(...)) for another model."""
    started = []

    def start(serve_overrides: dict | None = None, serve_options=None,
              **settings) -> InProcessServer:
        options = serve_options or tiny_serve_options(tiny_config_path, **(serve_overrides or {}))
        server = InProcessServer(options, **settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(start_server) -> InProcessServer:
    """The shared default server of a test module (policy apex, both KV tiers)."""
    return start_server()
