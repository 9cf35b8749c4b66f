"""The host side of a step: host-tier KV writes and the host decode rows' attention on the CPU.

HostAttention owns the native CPU pool, the per-layer hand-off and the host-bound prefills' k/v
writes. A step begins with begin_step(layout): one flag-gated CPU job per layer is queued at
once for the layout's host_decode rows (each job appends its layer's new k/v to the host cache
and attends over it). Per layer, stage() is one native call that copies the host rows' q/k/v
into preallocated pinned staging buffers and raises the layer's ready flag behind them: on CUDA
the copy and the flag (a stream memory write, or where the device lacks those, a copy of the
step's sequence number from device memory) are enqueued on the compute stream, so the pool's
watcher sees the data land with no Python in between. fetch() is a second native call that
brings the layer's output back just before the O projection. On CUDA the wait is chosen by
`layer_wait` (--cuda-layer-wait, config.py): "stream-wait" (the compute stream itself waits on
the pinned done flag), "host-func" (a CUDA host function holds the stream) or "engine-thread"
(the engine thread waits natively, GIL released); the first two let the engine thread enqueue
the whole step without waiting. The hand-off itself is kernels/cpu_attention/handoff.cpp.
end_step() writes the staged prefill k/v, collects the jobs and surfaces any worker error.

A graphed decode step (runner/decode_graphs.py) records stage/fetch once per bucket under
capturing(): the recorded calls copy every staged row (the bucket's padding included), read the
step's sequence number from device memory for the ready flags, and wait for each done flag to
be raised at all, so one graph serves every step. begin_step(layout, graphed=True) zeroes the
done flags, queues the jobs and sets that sequence number before the replay.

Buffers alternate by layer parity: a job for layer l+2 cannot start before stage(l+2), which
the compute stream orders after layer l's output was consumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import torch

from apex_grpc import _cpu_attention
from apex_grpc.attention.cpu_kernel import (CpuAttentionPool, DecodeLayers, JobHandle,
                                            LayerStaging, set_flag)
from apex_grpc.attention.cuda_runtime import (cuda_runtime_addresses, device_address_of_host,
                                              stream_memory_ops_supported)
from apex_grpc.attention.layout import BatchLayout
from apex_grpc.attention.torch_ref import write_kv
from apex_grpc.config import CUDA_LAYER_WAITS, EngineConfig
from apex_grpc.platform import pinned_empty

# --cuda-layer-wait (after "auto" is resolved) -> the native LayerWait code
# (kernels/cpu_attention/handoff.h).
_LAYER_WAIT_CODES = {"engine-thread": 0, "host-func": 1, "stream-wait": 2}
assert set(_LAYER_WAIT_CODES) | {"auto"} == set(CUDA_LAYER_WAITS)


@dataclasses.dataclass
class _PendingPrefillWrites:
    """Host-bound prefills' k/v on their way to a host tier in other memory: copied without
    blocking into one pinned buffer per step and written into the tier at end_step. A blocking
    copy per layer would stall the launching thread until the device caught up, every layer."""

    slots: torch.Tensor  # [rows] int64 host-tier slots (HostPrefillBatch.host_slot_mapping)
    staged: torch.Tensor  # pinned [num_layers, 2, rows, num_kv_heads, head_dim]
    layers: list[int]  # the layers staged so far
    copied: torch.cuda.Event  # recorded after the latest copy


class StepWatchdog:
    """Bounds a step's device-side waits for the CPU (stream-wait, host-func, and the waits
    recorded in decode graphs): when a step's jobs still run job_timeout_s after begin_step (a
    hung worker), it calls release(seq), which raises the step's done flags so the compute
    stream stops waiting; end_step then fails the step. A daemon thread looks once per poll
    interval, so arming a step costs a lock and two assignments, and no wake-up."""

    def __init__(self, release: Callable[[int], None], timeout_s: float,
                 poll_s: float = 0.5) -> None:
        self._release = release
        self._timeout_s = timeout_s
        self._poll_s = min(poll_s, timeout_s)
        self._lock = threading.Lock()
        self._armed: tuple[int, float] | None = None  # (step sequence number, deadline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apex-host-watchdog",
                                        daemon=True)
        self._thread.start()

    def arm(self, seq: int) -> None:
        with self._lock:
            self._armed = (seq, time.monotonic() + self._timeout_s)

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def fire(self) -> None:
        """Release the armed step now (its end_step found a job past the deadline)."""
        self._release_if(lambda deadline: True)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._release_if(lambda deadline: time.monotonic() >= deadline)

    def _release_if(self, due: Callable[[float], bool]) -> None:
        with self._lock:
            if self._armed is not None and due(self._armed[1]):
                self._release(self._armed[0])
                self._armed = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class HostAttention:
    """The HostSide (attention/base.py) over the native CPU pool."""

    def __init__(self, host_kv: torch.Tensor, pool: CpuAttentionPool, scale: float,
                 max_host_rows: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, layer_wait: str = CUDA_LAYER_WAITS[0],
                 host_scales: torch.Tensor | None = None,
                 row_dtype: torch.dtype | None = None,
                 job_timeout_s: float = EngineConfig.host_job_timeout_s) -> None:
        """host_scales: an int8 host tier's scales (kv_cache/quantized.py); row_dtype: the
        model's dtype, which q/k/v rows and outputs have (default: the host tier's);
        job_timeout_s: how long a layer waits for its CPU job before the step fails."""
        self.host_kv = host_kv  # [layers, 2, blocks, kv_heads, block_size, head_dim]
        self.host_scales = host_scales  # an int8 host tier's scales (kv_cache/quantized.py)
        self.pool = pool
        self.scale = scale
        self.device = device
        self.num_layers = host_kv.shape[0]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # The rows' dtype: the model's, which an int8 host tier does not share.
        self.row_dtype = dtype = row_dtype or host_kv.dtype
        # Sized once from max_num_seqs; nothing is allocated per layer or per step. Each
        # staged row is q|k|v, as the fused projection leaves it: one copy per layer.
        self._qkv = pinned_empty((2, max_host_rows, num_heads + 2 * num_kv_heads, head_dim),
                                 dtype, device)
        self._out = pinned_empty((2, max_host_rows, num_heads, head_dim), dtype, device)
        self._lse = torch.empty((2, max_host_rows, num_heads), dtype=torch.float32)
        # Per layer: [0] ready (staged) and [1] done; values are step sequence numbers.
        self._flags = pinned_empty((2, self.num_layers, 1), torch.int64, device)
        self._flags.zero_()
        self._on_cuda = device.type == "cuda"
        if layer_wait not in CUDA_LAYER_WAITS:
            raise ValueError(f"layer_wait must be one of {CUDA_LAYER_WAITS}, got {layer_wait!r}")
        device_index = (device.index if device.index is not None
                        else torch.cuda.current_device()) if self._on_cuda else 0
        memory_ops = self._on_cuda and stream_memory_ops_supported(device_index)
        if layer_wait == "auto":
            layer_wait = "stream-wait" if memory_ops else "host-func"
        elif self._on_cuda and layer_wait == "stream-wait" and not memory_ops:
            raise RuntimeError(f"CUDA device {device_index} does not support 64-bit stream "
                               "memory operations: use --cuda-layer-wait host-func or "
                               "engine-thread")
        # Without CUDA there is no stream to hold: the engine thread waits.
        self.layer_wait = layer_wait if self._on_cuda else "engine-thread"
        self.job_timeout_s = job_timeout_s
        # The engine thread's own wait is bounded natively; the device's needs a watchdog.
        self._watchdog = (StepWatchdog(self._release_device_waits, job_timeout_s)
                          if self.layer_wait != "engine-thread" else None)
        # Without stream memory operations (and in captured graphs) each ready flag is a copy
        # of this step's sequence number, kept on the device, behind the layer's rows.
        self._seq_device = torch.zeros(1, dtype=torch.int64, device=device) \
            if self._on_cuda else None
        self._memory_ops = memory_ops
        staging = [buffer[parity].data_ptr() for parity in range(2)
                   for buffer in (self._qkv, self._out)]
        element = self._qkv.element_size()
        # Where k and v start within a q|k|v row (stage checks its inputs against them).
        self._k_offset = num_heads * head_dim * element
        self._v_offset = self._k_offset + num_kv_heads * head_dim * element
        self._handoff = _cpu_attention.LayerHandoff(
            num_layers=self.num_layers, max_rows=max_host_rows,
            qkv_row_bytes=self._qkv[0, 0].numel() * element,
            out_row_bytes=num_heads * head_dim * element, staging=staging,
            flags=self._flags.data_ptr(),
            seq_on_device=self._seq_device.data_ptr() if self._seq_device is not None else 0,
            flags_on_device=device_address_of_host(self._flags.data_ptr()) if memory_ops else 0,
            cuda=cuda_runtime_addresses(memory_ops) if self._on_cuda else [],
            wait=_LAYER_WAIT_CODES[self.layer_wait],
            timeout_s=job_timeout_s)
        self._step_seq = 0
        self._step_deadline = 0.0
        self._layout: BatchLayout | None = None
        self._jobs: list[JobHandle] = []
        self._num_staged = 0
        self._prefill_writes: _PendingPrefillWrites | None = None
        # Per host row count: the step submission over staging views sliced to it, built once.
        self._submissions: dict[int, DecodeLayers] = {}

    @property
    def max_host_rows(self) -> int:
        return self._qkv.shape[1]

    @property
    def can_capture(self) -> bool:
        """Whether host rows can run inside a captured CUDA graph: the device must wait for
        the CPU (an engine-thread wait cannot sit inside a graph)."""
        return self._on_cuda and self.layer_wait != "engine-thread"

    @contextlib.contextmanager
    def capturing(self, staged_rows: int) -> Iterator[None]:
        """Record stage/fetch calls of `staged_rows` rows into the CUDA graph being captured
        on the current stream (no job runs: capture executes nothing)."""
        if not self.can_capture:
            raise RuntimeError("capturing host rows needs CUDA and --cuda-layer-wait "
                               "stream-wait or host-func")
        self._handoff.begin_capture(staged_rows, torch.cuda.current_stream().cuda_stream)
        try:
            yield
        finally:
            self._handoff.end_capture()
            self._num_staged = 0

    # -- per step -----------------------------------------------------------------------------
    def begin_step(self, layout: BatchLayout, graphed: bool = False) -> None:
        """Queue every layer's CPU job for this step's host decode rows (if any). graphed: a
        captured graph (capturing()) stages and fetches this step's rows; call
        staged_by_graph() once it is launched."""
        self._layout = layout
        self._jobs = []
        self._num_staged = 0
        host = layout.host_decode
        if host is None:
            return
        staged_rows = layout.num_staged_rows
        if staged_rows > self.max_host_rows:
            raise ValueError(f"{staged_rows} host rows exceed the staging capacity "
                             f"{self.max_host_rows} (max_num_seqs)")
        self._step_seq += 1
        seq = self._step_seq
        stream = torch.cuda.current_stream().cuda_stream if self._on_cuda else 0
        if self._seq_device is not None and (graphed or not self._memory_ops):
            self._seq_device.fill_(seq)  # queued before any layer's staging
        if graphed:  # the graph's waits pass on any raise: none may be left from a past step
            self._flags[1].zero_()
        self._handoff.begin_step(seq, staged_rows, stream)
        self._step_deadline = time.monotonic() + self.job_timeout_s
        if self._watchdog is not None:
            self._watchdog.arm(seq)
        n = host.num_tokens
        submission = self._submissions.get(n)
        if submission is None:
            heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
            staging = tuple(LayerStaging(*self._qkv[p, :n].split(heads, dim=1), self._out[p, :n],
                                         self._lse[p, :n]) for p in range(2))
            submission = self._submissions[n] = self.pool.prepare_decode_layers(
                staging, self.host_kv, self._flags, scale=self.scale, kv_scales=self.host_scales)
        self._jobs = submission.submit(host.block_tables, host.seq_lens_tensor,
                                       host.slot_mapping, seq)

    def staged_by_graph(self) -> None:
        """The step's graph is launched: it stages every layer (end_step releases none)."""
        self._num_staged = self.num_layers

    def end_step(self) -> None:
        """Write the step's staged prefill k/v and collect its jobs. After a failure
        mid-forward, release the jobs that never got their data so no worker waits forever;
        wait for every job, then raise the first worker error."""
        jobs, self._jobs = self._jobs, []
        self._layout = None
        # Layers are staged in order, so the ones never staged are the tail.
        # (A released job may read a parity buffer that a staged layer's copy still writes:
        # the failed step's outputs are discarded, and the buffers outlive every job.)
        for layer in range(self._num_staged, len(jobs)):
            set_flag(self._flags[0, layer], self._step_seq)
        errors = []
        for layer, job in enumerate(jobs):
            try:
                self.pool.wait(job, timeout_s=self._step_deadline - time.monotonic())
            except TimeoutError:
                if self._watchdog is not None:
                    self._watchdog.fire()  # the stream must not keep waiting for this job
                errors.append(RuntimeError(
                    f"CPU attention for layer {layer} did not finish within "
                    f"{self.job_timeout_s:.0f} s"))
            except RuntimeError as exc:
                errors.append(exc)
        if self._watchdog is not None:
            self._watchdog.disarm()
        if self._on_cuda and jobs:
            # After a failed step the stream may still hold this step's waits (all pass now
            # that every job is done): drain it, or a graphed step's zeroed done flags would
            # hold them forever. After sampling it is idle and this costs microseconds. A
            # broken device raises here too; the step's own error is the one to report.
            with contextlib.suppress(RuntimeError):
                torch.cuda.current_stream().synchronize()
        self._finish_prefill_writes()
        if errors:
            raise errors[0]

    def _release_device_waits(self, seq: int) -> None:
        """Raise every done flag to the step's sequence number: the device's waits pass (the
        step's outputs are then garbage, and end_step fails it)."""
        for layer in range(self.num_layers):
            set_flag(self._flags[1, layer], seq)

    def close(self) -> None:
        """Stop the CPU pool's worker threads (and the watchdog)."""
        if self._watchdog is not None:
            self._watchdog.close()
        self.pool.close()

    # -- per layer ----------------------------------------------------------------------------
    def write_prefill(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The layer's host_prefill rows of k/v [all rows, kv_heads, head_dim] into the host
        tier: in place when it shares their memory, else staged in pinned memory without
        blocking and written at end_step."""
        batch = self._layout.host_prefill
        rows = batch.rows
        if self.host_kv.device == k.device:
            write_kv(self.host_kv[layer_idx], batch.host_slot_mapping, k[rows], v[rows],
                     self._layer_scales(layer_idx))
            return
        pending = self._prefill_writes
        if pending is None:  # the step's first host-prefill layer
            staged = torch.empty((self.num_layers, 2, batch.num_tokens, *k.shape[1:]),
                                 dtype=k.dtype, pin_memory=True)
            pending = self._prefill_writes = _PendingPrefillWrites(
                batch.host_slot_mapping, staged, [], torch.cuda.Event())
        pending.staged[layer_idx, 0].copy_(k[rows], non_blocking=True)
        pending.staged[layer_idx, 1].copy_(v[rows], non_blocking=True)
        pending.layers.append(layer_idx)
        pending.copied.record()

    def _finish_prefill_writes(self) -> None:
        """Write the step's staged prefill k/v into the host tier once the copies have landed
        (by the end of a step the device has usually finished them already)."""
        pending, self._prefill_writes = self._prefill_writes, None
        if pending is None:
            return
        pending.copied.synchronize()
        for layer in pending.layers:
            write_kv(self.host_kv[layer], pending.slots, pending.staged[layer, 0],
                     pending.staged[layer, 1], self._layer_scales(layer))

    def _layer_scales(self, layer_idx: int) -> torch.Tensor | None:
        return None if self.host_scales is None else self.host_scales[layer_idx]

    def stage(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              row_start: int) -> None:
        """Hand rows [row_start, row_start + host decode rows) of q [n, heads, head_dim] and
        k/v [n, kv_heads, head_dim] (on the compute device) to the layer's job. q, k and v must be views of one
        buffer whose rows hold q|k|v contiguously (LlamaDecoderLayer's pre_attention): one
        copy moves all three. Checked on layer 0: every layer of a step comes from the same
        projection layout."""
        q_at = q.data_ptr()
        if layer_idx == 0 and (
                k.data_ptr() != q_at + self._k_offset or v.data_ptr() != q_at + self._v_offset
                or not q.stride(0) == k.stride(0) == v.stride(0)
                or q.stride(1) != self.head_dim or q.stride(2) != 1):
            raise ValueError("host rows need q, k and v as views of one q|k|v buffer; got "
                             f"strides {q.stride()}, {k.stride()}, {v.stride()}")
        self._handoff.stage(layer_idx, q_at, q.stride(0) * q.element_size(), row_start)
        self._num_staged += 1

    def fetch(self, layer_idx: int, out: torch.Tensor, row_start: int) -> None:
        """The layer's CPU attention output into rows [row_start, ...) of out. On CUDA, unless
        layer_wait is "engine-thread", the compute stream, not this thread, waits for it."""
        row_bytes = out.stride(0) * out.element_size()
        self._handoff.fetch(layer_idx, out.data_ptr() + row_start * row_bytes, row_bytes)
