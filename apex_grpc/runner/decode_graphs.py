"""Decode steps as CUDA graphs: one graph per bucket of (GPU rows, host rows), captured at
start-up, replayed for every decode-only step that fits one.

Eager decoding launches a few hundred small kernels per step from Python, so on a GPU the step
is bound by launches, not by the weights it reads. A graph launches them all at once. What a
graph reads must sit at fixed addresses: the step's inputs are copied into StaticDecodeInputs
(runner/input_batch.py), padded to the bucket, and its output is the graph's own tensor.

- Which steps: GPU_ONLY and ASYNC_OVERLAP steps whose rows are all decodes (prefill chunks and
  the NEO pipeline stay eager) and whose GPU and host rows fit the largest bucket.
- Host rows: their per-layer hand-off (q|k|v copy to pinned staging, ready flag, the wait for
  the CPU's output and the copy back) is recorded into the graph (attention/host.py,
  capturing()), so one replay runs the whole hybrid step; the engine thread only queues the CPU
  jobs before launching it. A wait on the engine thread cannot be captured: with
  --cuda-layer-wait engine-thread host rows stay eager.
- Without CUDA nothing is captured: the same padded fixed-buffer path runs eagerly (tests use
  it to check that the padding and the static inputs give the same tokens).

Buckets: GPU rows 1, 2, 4, 8, then multiples of 16 up to --cuda-graph-max-batch; host rows 0
and the same sizes up to the staging capacity (max_num_seqs) when the policy can place rows on
the host. A step takes the smallest bucket that holds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from apex_grpc.attention.host import HostAttention
from apex_grpc.attention.layout import paged_batch
from apex_grpc.config import ConfigError
from apex_grpc.runner.executors import StepExecutor
from apex_grpc.runner.input_batch import InputBatch, StaticDecodeInputs
from apex_grpc.scheduler.plan import StepPlan, Strategy

log = logging.getLogger(__name__)

_SMALL_SIZES = (1, 2, 4, 8)
_SIZE_STEP = 16


def bucket_sizes(largest: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 16, up to and including `largest`."""
    if largest < 1:
        raise ValueError(f"the largest bucket must be >= 1, got {largest}")
    sizes = {size for size in _SMALL_SIZES if size < largest}
    sizes.update(range(_SIZE_STEP, largest, _SIZE_STEP))
    sizes.add(largest)
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class DecodeBuckets:
    gpu: tuple[int, ...]  # GPU-row bucket sizes, ascending
    host: tuple[int, ...]  # host-row bucket sizes, ascending, starting at 0

    @classmethod
    def for_engine(cls, max_batch: int, max_host_rows: int) -> DecodeBuckets:
        """max_batch: --cuda-graph-max-batch; max_host_rows: 0 when no row can be on the host."""
        if max_batch < 1:
            raise ConfigError(f"--cuda-graph-max-batch must be >= 1, got {max_batch}")
        host = (0,) + (bucket_sizes(min(max_batch, max_host_rows)) if max_host_rows else ())
        return cls(bucket_sizes(max_batch), host)

    def all(self) -> list[tuple[int, int]]:
        """Every (gpu_rows, host_rows) bucket, largest first (later captures reuse the memory
        of earlier ones); a step of host rows only has gpu_rows 0."""
        pairs = [(g, h) for g in (0,) + self.gpu for h in self.host if g + h > 0]
        return sorted(pairs, key=lambda pair: (pair[0] + pair[1], pair), reverse=True)

    def pick(self, gpu_rows: int, host_rows: int) -> tuple[int, int] | None:
        """The smallest bucket holding the rows, or None when they exceed the largest."""
        gpu = 0 if gpu_rows == 0 else next((g for g in self.gpu if g >= gpu_rows), None)
        host = next((h for h in self.host if h >= host_rows), None)
        if gpu is None or host is None or gpu + host == 0:
            return None
        return gpu, host


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output: final hidden states of every row


class DecodeGraphs:
    """Runs decode-only steps over StaticDecodeInputs: replaying a captured CUDA graph per
    bucket on CUDA (after capture()), eagerly over the same padded buffers otherwise."""

    def __init__(self, executors: dict[Strategy, StepExecutor], host: HostAttention,
                 inputs: StaticDecodeInputs, buckets: DecodeBuckets, max_model_len: int) -> None:
        self.executors = executors
        self.host = host
        self.inputs = inputs
        self.buckets = buckets
        self.max_model_len = max_model_len
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._host_capture_failed = False
        self.replays = 0  # steps served by a captured graph
        self.padded_steps = 0  # steps run eagerly over the padded buffers

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket_for(self, plan: StepPlan) -> tuple[int, int] | None:
        """The bucket a plan runs in, or None when it runs eagerly."""
        if plan.strategy not in (Strategy.GPU_ONLY, Strategy.ASYNC_OVERLAP):
            return None
        if plan.host_prefill_seqs or not all(s.is_decode for s in plan.all_seqs):
            return None
        width = self.inputs.block_tables.shape[1]
        if any(len(s.block_table) > width for s in plan.gpu_seqs):
            return None
        bucket = self.buckets.pick(len(plan.gpu_seqs), len(plan.host_decode_seqs))
        if bucket is not None and self.captured and not self.is_captured(bucket):
            return None  # e.g. host rows under an engine-thread wait: never captured
        return bucket

    def is_captured(self, bucket: tuple[int, int]) -> bool:
        return bucket in self._graphs

    def run(self, bucket: tuple[int, int], batch: InputBatch) -> torch.Tensor:
        """The bucket's forward pass over its batch (inputs.fill; the host side's step begun,
        graphed when is_captured) -> final hidden states of its rows."""
        graph = self._graphs.get(bucket)
        if graph is None:
            self.padded_steps += 1
            return self._executor(bucket).run(batch)
        graph.graph.replay()
        self.host.staged_by_graph()
        self.replays += 1
        return graph.hidden

    def graph(self, bucket: tuple[int, int]) -> torch.cuda.CUDAGraph:
        """A captured bucket's graph (benchmarks time its replay alone)."""
        return self._graphs[bucket].graph

    def _executor(self, bucket: tuple[int, int]) -> StepExecutor:
        return self.executors[Strategy.ASYNC_OVERLAP if bucket[1] else Strategy.GPU_ONLY]

    # -- capture (CUDA) -------------------------------------------------------------------------
    def capture(self) -> int:
        """Capture every bucket's graph into one memory pool, largest first -> the bytes the
        pool holds. Host-row buckets are skipped when the host side cannot be captured
        (engine-thread wait)."""
        started = time.perf_counter()
        pool_bytes = self._capture(self._capturable())
        log.info("captured %d decode graphs (GPU rows up to %d, host rows up to %d) in %.1f s; "
                 "their memory pool holds %.1f MiB", len(self._graphs), self.buckets.gpu[-1],
                 max(h for _, h in self._graphs), time.perf_counter() - started,
                 pool_bytes / 2**20)
        return pool_bytes

    def estimate_pool_bytes(self) -> int:
        """What capture() would hold, for sizing the GPU KV tier first: the largest GPU-only
        and the largest hybrid bucket are captured (every smaller graph reuses their
        temporaries: one pool, largest first), plus every other graph's own output; then
        everything is released."""
        buckets = self._capturable()
        largest = sorted({max(b for b in buckets if b[1] == h) for h in (0, buckets[0][1])},
                         key=sum, reverse=True)
        try:
            pool_bytes = self._capture(largest)
        finally:
            self._graphs.clear()
        model = self.executors[Strategy.GPU_ONLY].model
        row_bytes = model.config.hidden_size * model.dtype.itemsize
        return pool_bytes + sum(g + h for g, h in buckets if (g, h) not in largest) * row_bytes

    def _capturable(self) -> list[tuple[int, int]]:
        if self.inputs.input_ids.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; on this one the decode buckets "
                               "run eagerly over their fixed buffers")
        return [b for b in self.buckets.all() if b[1] == 0 or self.host.can_capture]

    def _capture(self, buckets: list[tuple[int, int]]) -> int:
        """Capture the buckets (largest first) into one new pool -> the bytes it holds."""
        device = self.inputs.input_ids.device
        largest = max(g + h for g, h in buckets)
        for executor in set(self.executors.values()):
            executor.reserve_rows(largest)  # no output buffer may be allocated mid-capture
        # Warm-up, eagerly, on the stream that captures (its cuBLAS workspace too): Triton
        # compiles and cuBLAS picks its kernels outside any capture.
        capture_stream = torch.cuda.Stream(device)
        capture_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(capture_stream):
            for gpu_rows in sorted({g for g, _ in buckets if g}, reverse=True):
                self._run_padding(gpu_rows)
        torch.cuda.synchronize(device)
        # What the warm-up left cached must not be counted against the pool.
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        for bucket in buckets:
            if bucket[1] and self._host_capture_failed:
                continue
            try:
                self._graphs[bucket] = self._capture_one(bucket, pool, capture_stream)
            except RuntimeError:
                if not bucket[1]:
                    raise
                # The device-side wait may not be capturable on this driver: host rows then
                # run eagerly, GPU-only steps stay graphed.
                log.warning("capturing the hybrid hand-off failed (--cuda-layer-wait %s); steps "
                            "with host rows run eagerly", self.host.layer_wait, exc_info=True)
                self._host_capture_failed = True
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.memory_reserved(device) - reserved_before)

    def _capture_layout_batch(self, bucket: tuple[int, int]) -> InputBatch:
        """A bucket's batch for capture: every GPU row's launch sized for the longest context
        served, the host rows as one placeholder part (capture runs no CPU job)."""
        gpu_rows, host_rows = bucket
        host_decode = None
        if host_rows:
            padding = [self.inputs.padding_block]
            host_decode = paged_batch(gpu_rows, [padding] * host_rows, [0] * host_rows,
                                      [1] * host_rows, self.inputs.block_size, "cpu")
        layout = self.inputs.layout(gpu_rows, host_rows, (self.max_model_len,) * gpu_rows,
                                    host_decode)
        rows = gpu_rows + host_rows
        return InputBatch(self.inputs.input_ids[:rows], self.inputs.positions[:rows], layout,
                          sample_rows=self.inputs.input_ids[:0], sample_seqs=())

    def _run_padding(self, gpu_rows: int) -> None:
        """One eager GPU-only forward of padding rows only (they touch only the padding block)."""
        self.inputs.input_ids.zero_()
        self.inputs.positions.zero_()
        self.inputs.block_tables[:gpu_rows].fill_(self.inputs.padding_block)
        self.inputs.seq_lens[:gpu_rows].fill_(1)
        self.inputs.slot_mapping[:gpu_rows].fill_(self.inputs.padding_block
                                                  * self.inputs.block_size)
        self.executors[Strategy.GPU_ONLY].run(self._capture_layout_batch((gpu_rows, 0)))

    def _capture_one(self, bucket: tuple[int, int], pool,
                     stream: torch.cuda.Stream) -> _Graph:
        """One bucket's graph, captured on `stream` (the device is idle: nothing to order
        against). CUDAGraph's own calls, not torch.cuda.graph, which would collect garbage
        and empty the allocator's cache before every capture."""
        batch = self._capture_layout_batch(bucket)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                if bucket[1]:
                    with self.host.capturing(bucket[1]):
                        hidden = self._executor(bucket).run(batch)
                else:
                    hidden = self._executor(bucket).run(batch)
            finally:
                graph.capture_end()
        return _Graph(graph, hidden)

