"""The machine the server runs on: the only module that asks whether CUDA exists, and how many
cores this process may use.

Streams and events are real on CUDA and no-ops on the CPU, so every code path runs in CI.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
from typing import Iterator

import torch

from apex_grpc.config import DEVICES, DTYPES

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; use {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if has_cuda() else "cpu")
    if name == "cuda" and not has_cuda():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves KV and weight traffic on GPUs; fp32 is the fast, exact choice on CPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    return getattr(torch, name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform as _platform

    return f"cpu ({_platform.processor() or _platform.machine()})"


def usable_cores() -> int:
    """Cores this process may run on (a container's cpuset, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def default_cpu_attention_threads() -> int:
    """All cores but two: the engine thread and the asyncio loop need theirs."""
    return max(1, usable_cores() - 2)


def share_cores_with_pool(device: torch.device, pool_threads: int) -> None:
    """Without CUDA the model's own torch ops run on the cores too: give them the cores the
    attention pool does not use, so the two do not oversubscribe (spinning pool workers and
    OpenMP barriers slow each other badly when they share cores)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() - pool_threads))
        log.info("CPU device: %d torch threads beside %d CPU attention threads",
                 torch.get_num_threads(), pool_threads)


class Stream:
    """A CUDA stream, or a no-op stand-in on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        if self.cuda_stream is None:
            yield
        else:
            with torch.cuda.stream(self.cuda_stream):
                yield

    def wait_current(self) -> None:
        """Make this stream wait for the work already queued on the current stream."""
        if self.cuda_stream is not None:
            self.cuda_stream.wait_stream(torch.cuda.current_stream())


class Event:
    """A CUDA event, or an always-complete stand-in on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda_event = torch.cuda.Event() if device.type == "cuda" else None

    def record(self, stream: Stream | None = None) -> None:
        if self.cuda_event is not None:
            s = stream.cuda_stream if stream is not None else torch.cuda.current_stream()
            self.cuda_event.record(s)

    def wait_host(self) -> None:
        """Block the calling thread until the event's work is done."""
        if self.cuda_event is not None:
            self.cuda_event.synchronize()

    def make_current_stream_wait(self) -> None:
        """Work queued on the current stream after this runs waits for the event (no host
        block)."""
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host memory for staging buffers: pinned when a GPU will copy it."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def host_kv_zeros(shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Zeroed host memory for the host KV tier (and its scales): pinned when a GPU copies it;
    otherwise an anonymous mapping that asks for transparent huge pages (MADV_HUGEPAGE, what
    THP's common "madvise" mode needs). The CPU attention reads the tier in runs of one kv
    head of one block (4 KiB for bf16 at head_dim 128) at random blocks: with 4 KiB pages
    each run is a TLB miss. Batch 32 x 2048 on a 2-core EPYC (2026-12-07): 12% faster bf16,
    15-30% int8. Pinned memory comes from the CUDA driver, which picks its own pages."""
    if device.type == "cuda":
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    nbytes = numel * dtype.itemsize
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only
        region.madvise(mmap.MADV_HUGEPAGE)
    tier = torch.frombuffer(region, dtype=dtype, count=numel).view(shape)  # holds the mapping
    # Anonymous pages read as zeros, but writing them now commits the memory at start-up (a
    # host tier too big for the machine fails here, not mid-serve) and faults them in as huge
    # pages, after the advice.
    return tier.zero_()


def host_kv_copy(values: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor values in the memory a server on this machine gives its host tier
    (pinned where CUDA exists, else huge pages), for measurements (the kernel bench, the
    profiler) that must read the pages the server's CPU attention reads."""
    device = torch.device("cuda" if has_cuda() else "cpu")
    return host_kv_zeros(tuple(values.shape), values.dtype, device).copy_(values)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
