"""A scripted EngineClient and an in-process server harness for the gRPC front-end tests.

FakeEngine implements apex_grpc.engine.protocol.EngineClient without a model: every request
"generates" the bytes of a fixed reply, one token per step, and the engine records what it was
asked (calls, closes, aborts) so tests can check that the server frees requests. FakeTokenizer
is byte-level: id = 3 + byte, BOS = 1, EOS = 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from apex_grpc.config import EngineConfig, ModelConfig
from apex_grpc.engine.protocol import EngineStats, EngineUnavailableError, QueueFullError
from apex_grpc.request import (FinishReason, RequestOutput, SamplingParams, StoppingParams,
                               TokenLogprob)
from apex_grpc.server.app import ApexServer, ServerSettings

BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 512


class FakeTokenizer:
    vocab_size = VOCAB_SIZE

    def __init__(self, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BYTE_OFFSET + byte for byte in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", "replace")

    def id_to_token(self, token_id: int) -> str:
        if BYTE_OFFSET <= token_id < BYTE_OFFSET + 256:
            return chr(token_id - BYTE_OFFSET)
        return f"<{token_id}>"

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise ValueError("no chat template")
        rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return rendered + ("<|assistant|>" if add_generation_prompt else "")


@dataclass
class GenerateCall:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    deadline: float | None


@dataclass
class FakeEngine:
    """Scripted engine: one reply token per step, honouring abort, close and shutdown."""

    reply: str = "Hello from the fake engine."
    step_delay_s: float = 0.0
    max_model_len: int = 128
    max_live: int = 1024  # past it generate raises QueueFullError
    # When set, each request waits for this event before its first token (a "queued" request).
    hold: asyncio.Event | None = None
    # Yield a FinishReason.ERROR output after this many tokens.
    error_after: int | None = None
    unavailable: bool = False
    unavailable_first_calls: int = 0  # this many first requests get EngineUnavailableError
    ready: bool = True
    has_chat_template: bool = True
    model_name: str = "fake-model"
    dtype_name: str = "float32"
    device_name: str = "cpu"
    calls: list[GenerateCall] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)  # iterators closed before finishing
    finished: list[str] = field(default_factory=list)
    live: dict[str, asyncio.Event] = field(default_factory=dict)  # request id -> abort flag
    shutdown_grace_s: float | None = None
    closed: bool = False

    def __post_init__(self) -> None:
        self.model_config = ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=VOCAB_SIZE, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,),
            name=self.model_name)
        self.engine_config = EngineConfig(num_gpu_blocks=32, max_model_len=self.max_model_len)
        self._tokenizer = FakeTokenizer(self.has_chat_template)

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    @property
    def is_ready(self) -> bool:
        return self.ready and self.shutdown_grace_s is None

    def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 stopping: StoppingParams,
                 deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        self.calls.append(GenerateCall(request_id, list(prompt_ids), sampling, stopping,
                                       deadline))
        return self._run(request_id, prompt_ids, sampling, stopping)

    async def _run(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                   stopping: StoppingParams) -> AsyncIterator[RequestOutput]:
        call_number = len(self.calls)
        if (self.unavailable or call_number <= self.unavailable_first_calls
                or self.shutdown_grace_s is not None):
            raise EngineUnavailableError("fake engine is not accepting requests")
        if len(self.live) >= self.max_live:
            raise QueueFullError(f"{len(self.live)} requests waiting")
        aborted = asyncio.Event()
        self.live[request_id] = aborted
        start = time.monotonic()
        done = False
        try:
            if self.hold is not None:
                await self.hold.wait()
            reply_ids = self._tokenizer.encode(self.reply, add_special_tokens=False) + [EOS_ID]
            for index, token_id in enumerate(reply_ids):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                else:
                    await asyncio.sleep(0)  # let other streams run, as a real step boundary does
                output = self._output(request_id, token_id, index, sampling)
                if aborted.is_set():
                    output = self._output(request_id, None, index, sampling)
                    output.finish_reason = FinishReason.ABORTED
                elif self.error_after is not None and index >= self.error_after:
                    output.finish_reason = FinishReason.ERROR
                    output.error = "fake engine fault"
                elif token_id == EOS_ID and not stopping.ignore_eos:
                    output.finish_reason = FinishReason.EOS
                elif index + 1 >= stopping.max_new_tokens:
                    output.finish_reason = FinishReason.LENGTH
                if output.finished:
                    num_generated = index + (0 if output.finish_reason == FinishReason.ABORTED
                                             else 1)
                    self._finish_fields(output, len(prompt_ids), num_generated, start)
                    done = True
                    yield output
                    return
                yield output
            raise AssertionError("fake reply exhausted with ignore_eos; ask fewer tokens")
        finally:
            self.live.pop(request_id, None)
            (self.finished if done else self.closed_early).append(request_id)

    def _output(self, request_id: str, token_id: int | None, index: int,
                sampling: SamplingParams) -> RequestOutput:
        if token_id is None:
            return RequestOutput(request_id=request_id, text="", token_ids=[], logprobs=[])
        logprobs = []
        if sampling.wants_logprobs:
            logprob = -0.1 * (index + 1)
            top = [(token_id + rank, logprob - rank) for rank in range(sampling.top_logprobs)]
            logprobs.append(TokenLogprob(token_id=token_id, logprob=logprob, top=top))
        text = "" if token_id == EOS_ID else self._tokenizer.id_to_token(token_id)
        return RequestOutput(request_id=request_id, text=text, token_ids=[token_id],
                             logprobs=logprobs)

    @staticmethod
    def _finish_fields(output: RequestOutput, num_prompt: int, num_generated: int,
                       start: float) -> None:
        output.prompt_tokens = num_prompt
        output.completion_tokens = num_generated
        output.queue_ms = 1.5
        output.ttft_ms = 2.5
        output.decode_ms = (time.monotonic() - start) * 1000.0

    async def abort(self, request_id: str) -> bool:
        flag = self.live.get(request_id)
        if flag is None:
            return False
        flag.set()
        if self.hold is not None:
            self.hold.set()
        return True

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.live), num_waiting=0, num_host_resident=0,
            gpu_kv_used_blocks=len(self.live), gpu_kv_total_blocks=32, host_kv_used_blocks=0,
            host_kv_total_blocks=0, preemptions_total=3, evictions_total=4, restores_total=5,
            prompt_tokens_total=sum(len(c.prompt_ids) for c in self.calls),
            generation_tokens_total=7, steps_gpu_only=11, steps_async_overlap=12,
            steps_asymmetric_pipeline=13, steps_graphed=10, last_step_predicted_ms=4.0,
            last_step_measured_ms=5.0,
            requests_finished_total=len(self.finished),
            requests_aborted_total=len(self.closed_early))

    async def shutdown(self, grace_s: float) -> None:
        self.shutdown_grace_s = grace_s
        deadline = time.monotonic() + grace_s
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self.live):
            await self.abort(request_id)
        while self.live:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, **settings: object) -> AsyncIterator[ApexServer]:
    """An in-process server on 127.0.0.1 (free port) around `engine`; drained on exit."""
    # drain_quiet_s 0: no balancer in front to wait for (tests/unit/test_server_ops.py tests it).
    options = {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 1.0, "drain_quiet_s": 0.0,
               "health_poll_s": 0.05}
    options.update(settings)
    server = ApexServer(ServerSettings(**options), lambda: engine)
    await server.start()
    await server.load_engine()
    try:
        yield server
    finally:
        await server.stop()


def target(server: ApexServer) -> str:
    return f"127.0.0.1:{server.port}"


class ServerThread:
    """An in-process server on its own event loop thread, for tests with blocking clients."""

    def __init__(self, engine: FakeEngine, **settings: object) -> None:
        self.engine = engine
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server: ApexServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def target(self) -> str:
        return target(self.server)

    def call(self, coro):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        options = {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 1.0,
                   "drain_quiet_s": 0.0, "health_poll_s": 0.05}
        options.update(self.settings)

        async def start() -> ApexServer:
            server = ApexServer(ServerSettings(**options), lambda: self.engine)
            await server.start()
            await server.load_engine()
            return server

        self.server = self.call(start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
