"""The asyncio front of the engine: add_request -> async iterator of outputs, abort, stats.

The EngineCore runs on its own thread (the step loop); this class lives on the event loop and
never blocks it. Commands go to the engine thread through a thread-safe queue; each step's outputs
come back in one call_soon_threadsafe and land in per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from apex_grpc.config import EngineConfig, ModelConfig
from apex_grpc.engine.core import EngineCore
from apex_grpc.engine.protocol import EngineStats, EngineUnavailableError, QueueFullError
from apex_grpc.request import FinishReason, Request, RequestOutput, SamplingParams, StoppingParams

log = logging.getLogger(__name__)

_ADD, _ABORT, _STOP = "add", "abort", "stop"
# While busy, the engine thread logs its state (and the performance model's accuracy) this often.
_STATS_LOG_INTERVAL_S = 10.0


class AsyncEngine:
    def __init__(self, core: EngineCore, model_config: ModelConfig, engine_config: EngineConfig,
                 model_name: str, dtype_name: str, device_name: str, tokenizer) -> None:
        self.core = core
        self.model_config = model_config
        self.engine_config = engine_config
        self.model_name = model_name
        self.dtype_name = dtype_name
        self.device_name = device_name
        self._tokenizer = tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._collectors: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _collectors, _num_pending_adds and _dead
        self._num_pending_adds = 0  # requests sent to the engine thread, not yet in its queue
        self._dead = False  # the engine thread died: no new collector may be registered
        self._draining = False
        self._stats = core.stats()
        self._thread = threading.Thread(target=self._run, name="apex-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._draining

    # -- front-end API (event loop thread) ------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       stopping: StoppingParams,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        if not self.is_ready:
            raise EngineUnavailableError("engine is not serving (starting, draining or dead)")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead:
                raise EngineUnavailableError("the engine thread died")
            if request_id in self._collectors:
                raise ValueError(f"request_id {request_id!r} is already in use")
            queued = self._stats.num_waiting + self._num_pending_adds
            if queued >= self.engine_config.max_waiting:
                raise QueueFullError(f"waiting queue is full ({self.engine_config.max_waiting})")
            self._collectors[request_id] = (loop, outputs)
            self._num_pending_adds += 1
        req = Request(request_id, list(prompt_ids), sampling, stopping, deadline=deadline)
        self._commands.put((_ADD, req))
        finished = False
        try:
            while True:
                out: RequestOutput = await outputs.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # client went away (cancel, deadline): free the KV blocks now
                self._commands.put((_ABORT, request_id))
            with self._lock:
                self._collectors.pop(request_id, None)

    async def abort(self, request_id: str) -> bool:
        with self._lock:
            known = request_id in self._collectors
        if known:
            self._commands.put((_ABORT, request_id))
        return known

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting; in-flight requests get grace_s to finish, then are aborted."""
        self._draining = True
        end = time.monotonic() + grace_s
        while self._collectors and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for request_id in list(self._collectors):
            self._commands.put((_ABORT, request_id))
        while self._collectors and time.monotonic() < end + 5.0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the engine thread, then release the native CPU pool (idempotent)."""
        if self._thread.is_alive():
            self._commands.put((_STOP, None))
            self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.core.close()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        next_log = time.monotonic() + _STATS_LOG_INTERVAL_S
        try:
            while True:
                outputs: list[RequestOutput] = []
                # Block for a command only when idle; otherwise drain what arrived and step.
                block = not self.core.has_work
                while True:
                    try:
                        cmd, arg = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if cmd == _STOP:
                        self._deliver(outputs)
                        return
                    try:
                        self._apply(cmd, arg, outputs)
                    except Exception as exc:  # a bad command fails its request, not the engine
                        log.exception("engine command %s failed", cmd)
                        if cmd == _ADD:
                            outputs.append(RequestOutput(arg.request_id, "", [], [],
                                                         FinishReason.ERROR, error=repr(exc)))
                outputs.extend(self.core.expire_waiting(time.monotonic()))
                if self.core.has_work:
                    outputs.extend(self.core.step())
                self._stats = self.core.stats()
                if outputs:
                    self._deliver(outputs)
                if not self.core.has_work:
                    self.core.scheduler.kv.check_integrity()  # idle: every block is free
                elif time.monotonic() >= next_log:
                    next_log = time.monotonic() + _STATS_LOG_INTERVAL_S
                    _log_stats(self._stats)
        except Exception:
            log.exception("engine thread died")
            with self._lock:
                self._dead = True
            self._fail_all("engine thread died")
            raise

    def _apply(self, cmd: str, arg, outputs: list[RequestOutput]) -> None:
        if cmd == _ADD:
            with self._lock:
                self._num_pending_adds -= 1
            self.core.add_request(arg)
        elif cmd == _ABORT:
            out = self.core.abort(arg)
            if out is not None:
                outputs.append(out)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            targets = [(self._collectors.get(o.request_id), o) for o in outputs]
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for target, out in targets:
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its clients are gone
                pass

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._collectors)
        self._deliver([RequestOutput(rid, "", [], [], FinishReason.ERROR, error=message)
                       for rid in ids])


def _log_stats(stats: EngineStats) -> None:
    log.info("engine running=%d waiting=%d host_resident=%d gpu_kv=%d/%d host_kv=%d/%d "
             "step predicted=%.2fms measured=%.2fms preemptions=%d evictions=%d restores=%d",
             stats.num_running, stats.num_waiting, stats.num_host_resident,
             stats.gpu_kv_used_blocks, stats.gpu_kv_total_blocks, stats.host_kv_used_blocks,
             stats.host_kv_total_blocks, stats.last_step_predicted_ms,
             stats.last_step_measured_ms, stats.preemptions_total, stats.evictions_total,
             stats.restores_total)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for out_queue, out in items:
        out_queue.put_nowait(out)
