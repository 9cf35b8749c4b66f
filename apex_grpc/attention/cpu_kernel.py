"""Python face of the native CPU decode-attention kernel (extension apex_grpc._cpu_attention).

Owns: CpuAttentionPool (the native thread pool; every call validated first by
attention/cpu_kernel_checks.py, before any pointer reaches C++), JobHandle (keeps
every tensor of an in-flight job alive until it is waited on), the flag helpers used by
flag-gated jobs, append_kv, and paged_decode_attention on a lazily created default pool.

KV layout per layer: k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim],
contiguous; slot = block_id * block_size + offset (apex_grpc/attention/base.py). An 8-bit
(torch.int8) cache comes with k_scales, v_scales [num_blocks, num_kv_heads, block_size] float32
(apex_grpc/kv_cache/quantized.py); q, out and the appended rows keep the model's dtype.
"""

from __future__ import annotations

import atexit
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from apex_grpc import _cpu_attention as _native
from apex_grpc.attention.cpu_kernel_checks import (DTYPE_CODES, DecodeSizes, check_append,
                                                   check_decode, check_decode_buffers,
                                                   check_decode_metadata, check_flag,
                                                   require_shape, require_tensor)
from apex_grpc.platform import usable_cores

__all__ = [
    "CpuAttentionPool",
    "DecodeLayers",
    "DecodeSizes",
    "JobHandle",
    "LayerStaging",
    "append_kv",
    "best_isa",
    "runs_isa",
    "paged_decode_attention",
    "set_flag",
    "wait_flag",
]


@dataclass(slots=True)
class JobHandle:
    """One submitted decode job; the tensors stay referenced until wait() returns."""

    native: Any  # _cpu_attention.Job
    out: torch.Tensor  # [num_seqs, num_heads, head_dim]
    lse: torch.Tensor  # [num_seqs, num_heads] float32
    keepalive: tuple[object, ...]

    @property
    def done(self) -> bool:
        return self.native.done()


@dataclass(frozen=True, slots=True)
class LayerStaging:
    """The per-step buffers of the layers of one parity (layer % 2) in prepare_decode_layers:
    q, out [num_seqs, num_heads, head_dim], new_k/new_v [num_seqs, num_kv_heads, head_dim]
    (q/new_k/new_v may be views into one q|k|v buffer), lse [num_seqs, num_heads] float32."""

    q: torch.Tensor
    new_k: torch.Tensor
    new_v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


class CpuAttentionPool:
    """Persistent native worker threads running paged decode attention jobs outside the GIL."""

    def __init__(
        self, num_threads: int, pin_cores: list[int] | None = None, *, isa: str | None = None
    ) -> None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        cores = list(pin_cores) if pin_cores is not None else []
        if any(not isinstance(core, int) or core < 0 for core in cores):
            raise ValueError(f"pin_cores must be non-negative core ids, got {pin_cores!r}")
        # isa: None picks the fastest kernels for this CPU; "avx512bf16", "avx512", "avx2" or
        # "scalar" forces one (tests compare them).
        self._native = _native.Pool(num_threads, cores, isa or "")
        # Jobs whose handles the caller may have dropped: their tensors must outlive the job.
        self._in_flight: deque[JobHandle] = deque()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def num_threads(self) -> int:
        return self._native.num_threads

    def isa(self, dtype: torch.dtype) -> str:
        """The kernel set this pool uses for KV of the given dtype."""
        return self._native.isa(DTYPE_CODES[dtype])

    def submit_decode(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim]; rows may be strided
        k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
        seq_lens: torch.Tensor,  # [num_seqs] int32, including the new token
        out: torch.Tensor,  # [num_seqs, num_heads, head_dim], q's dtype
        lse: torch.Tensor,  # [num_seqs, num_heads] float32
        *,
        scale: float | None = None,
        new_k: torch.Tensor | None = None,  # [num_seqs, num_kv_heads, head_dim]; like q
        new_v: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,  # [num_seqs] int64
        k_scales: torch.Tensor | None = None,  # 8-bit KV: [num_blocks, num_kv_heads, block_size]
        v_scales: torch.Tensor | None = None,
        ready_flag: torch.Tensor | None = None,  # [1] int64: start once ready_flag[0] >= value
        ready_value: int = 0,
        done_flag: torch.Tensor | None = None,  # [1] int64: set to done_value when finished
        done_value: int = 0,
        check_values: bool = True,
    ) -> JobHandle:
        """Queue one layer's decode attention (with the fused append first, if new_k/new_v/
        slot_mapping are given); returns at once. Structure (types, shapes, dtypes, contiguity)
        is always checked here. check_values=False skips the checks that read tensor contents
        (lengths, block ids, slots), e.g. when the step's metadata was checked once for all
        layers: the kernel still rejects bad lengths at submit (ValueError) and bad block ids
        or slots at wait() (RuntimeError), so bad input never reads outside the cache."""
        if self._closed:
            raise RuntimeError("the CPU attention pool is closed")
        tensors = (q, k_cache, v_cache, block_tables, seq_lens, out, lse)
        appends = (new_k, new_v, slot_mapping)
        scales = (k_scales, v_scales)
        flags = (ready_flag, done_flag)
        sizes = check_decode(*tensors, *appends, check_values=check_values, k_scales=k_scales,
                             v_scales=v_scales)
        for name, flag in zip(("ready_flag", "done_flag"), flags):
            if flag is not None:
                check_flag(name, flag)
        scale = _resolve_scale(scale, sizes.head_dim)
        native_job = self._native.submit_decode(
            *(tensor.data_ptr() for tensor in tensors),
            *(tensor.data_ptr() if tensor is not None else 0 for tensor in appends),
            sizes.as_list(),
            DTYPE_CODES[q.dtype],
            DTYPE_CODES[k_cache.dtype],
            *(tensor.data_ptr() if tensor is not None else 0 for tensor in scales),
            scale,
            ready_flag.data_ptr() if ready_flag is not None else 0,
            int(ready_value),
            done_flag.data_ptr() if done_flag is not None else 0,
            int(done_value),
        )
        keepalive = tuple(t for t in (*tensors, *appends, *scales, *flags) if t is not None)
        handle = JobHandle(native_job, out, lse, keepalive)
        self._track([handle])
        return handle

    def _track(self, handles: list[JobHandle]) -> None:
        """Keep submitted jobs' tensors alive until they are done, even if the caller drops
        the handles."""
        with self._lock:
            while self._in_flight and self._in_flight[0].done:
                self._in_flight.popleft()
            self._in_flight.extend(handles)

    def prepare_decode_layers(
        self,
        staging: tuple[LayerStaging, LayerStaging],  # layer l uses staging[l % 2]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]
        flags: torch.Tensor,  # [2, num_layers, 1] int64: ready flags, then done flags
        *,
        scale: float | None = None,
        kv_scales: torch.Tensor | None = None,  # 8-bit kv_cache: [num_layers, 2, num_blocks,
                                                #   num_kv_heads, block_size] float32
    ) -> DecodeLayers:
        """The hybrid runtime's step submission with what stays the same from step to step
        (staging buffers, KV cache, flags) validated here, once; see DecodeLayers.submit."""
        require_tensor("kv_cache", kv_cache, ndim=6)
        num_layers = kv_cache.shape[0]
        require_tensor("flags", flags, ndim=3, dtype=torch.int64)
        require_shape("flags", flags, (2, num_layers, 1))
        if kv_scales is not None:
            require_tensor("kv_scales", kv_scales, ndim=5, dtype=torch.float32)
            require_shape("kv_scales", kv_scales, tuple(kv_cache.shape[:5]))
        layer_scales = (None, None) if kv_scales is None else (kv_scales[0, 0], kv_scales[0, 1])
        sizes = [check_decode_buffers(buffers.q, kv_cache[0, 0], kv_cache[0, 1], buffers.out,
                                      buffers.lse, buffers.new_k, buffers.new_v, *layer_scales)
                 for buffers in staging]
        if sizes[0] != sizes[1]:
            raise ValueError(f"the two staging parities differ: {sizes[0]} vs {sizes[1]}")
        if staging[0].new_k is None:
            raise ValueError("the staging needs new_k/new_v: every layer appends its new token")
        return DecodeLayers(self, staging, kv_cache, flags, sizes[0],
                            _resolve_scale(scale, sizes[0].head_dim), kv_scales)

    def wait(self, handle: JobHandle,
             timeout_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block (GIL released) until the job is done; a worker error raises RuntimeError,
        a job still running after timeout_s raises TimeoutError."""
        if not handle.native.wait(-1.0 if timeout_s is None else max(0.0, timeout_s)):
            raise TimeoutError(f"a CPU attention job is still running after {timeout_s:.1f} s")
        return handle.out, handle.lse

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        **options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """submit_decode + wait; allocates out and lse when they are not given."""
        require_tensor("q", q, ndim=3, contiguous=False)  # rows may be strided
        out = torch.empty_like(q) if out is None else out
        lse = torch.empty(q.shape[:2], dtype=torch.float32) if lse is None else lse
        handle = self.submit_decode(q, k_cache, v_cache, block_tables, seq_lens, out, lse, **options)
        return self.wait(handle)

    def close(self) -> None:
        """Stop the workers; jobs not yet started fail (their waiters get RuntimeError)."""
        self._closed = True
        self._native.close()
        with self._lock:
            self._in_flight.clear()

    def __enter__(self) -> CpuAttentionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def wait_flag(flag: torch.Tensor, value: int, timeout_s: float | None = None) -> bool:
    """Wait (GIL released, natively) until flag[0] >= value; False if timeout_s passes first."""
    check_flag("flag", flag)
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"timeout_s must be non-negative, got {timeout_s}")
    return _native.wait_flag(flag.data_ptr(), int(value), -1.0 if timeout_s is None else timeout_s)


def set_flag(flag: torch.Tensor, value: int) -> None:
    """Store value into flag[0] with release semantics (the CPU stand-in for a copy stream)."""
    check_flag("flag", flag)
    _native.set_flag(flag.data_ptr(), int(value))


def append_kv(
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,  # 8-bit caches: [num_blocks, num_kv_heads, block_size]
    v_scales: torch.Tensor | None = None,
) -> None:
    """Write each token's k/v rows into its cache slot (in the calling thread, GIL released);
    an 8-bit cache gets the rows quantized and their scales."""
    check_append(k_cache, v_cache, slot_mapping, k, v, k_scales, v_scales)
    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    _native.append_kv(
        k_cache.data_ptr(), v_cache.data_ptr(),
        *(t.data_ptr() if t is not None else 0 for t in (k_scales, v_scales)),
        slot_mapping.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[0], num_kv_heads,
        head_dim, block_size, num_blocks, DTYPE_CODES[k.dtype], DTYPE_CODES[k_cache.dtype],
    )


def runs_isa(isa: str) -> bool:
    """Whether this CPU runs the named kernel set (a pool refuses one it cannot run)."""
    try:
        CpuAttentionPool(1, isa=isa).close()
    except ValueError:
        return False
    return True


def best_isa(dtype: torch.dtype) -> str:
    """The kernel set a default pool uses on this CPU for KV of this dtype."""
    return _native.best_isa(DTYPE_CODES[dtype])


_default_pool: CpuAttentionPool | None = None
_default_pool_lock = threading.Lock()


def _get_default_pool() -> CpuAttentionPool:
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = CpuAttentionPool(usable_cores())
            atexit.register(_default_pool.close)
        return _default_pool


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    pool: CpuAttentionPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention for one layer: (out [num_seqs, num_heads, head_dim], lse float32)."""
    pool = pool if pool is not None else _get_default_pool()
    return pool.decode(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)



class DecodeLayers:
    """One hybrid step's decode jobs, a job per layer, submitted in one native call: made by
    CpuAttentionPool.prepare_decode_layers, which validated everything but the step's
    metadata."""

    def __init__(self, pool: CpuAttentionPool, staging: tuple[LayerStaging, LayerStaging],
                 kv_cache: torch.Tensor, flags: torch.Tensor, sizes: DecodeSizes,
                 scale: float, kv_scales: torch.Tensor | None = None) -> None:
        self._pool = pool
        self._kv_scales = kv_scales
        self._staging = staging
        self._kv_cache = kv_cache
        self._flags = flags
        self._sizes = sizes
        self._scale = scale
        element = kv_cache.element_size()
        self._addresses = [tensor.data_ptr() for buffers in staging
                           for tensor in (buffers.q, buffers.new_k, buffers.new_v, buffers.out,
                                          buffers.lse)]
        self._layer_bytes = kv_cache.stride(0) * element
        self._v_offset_bytes = kv_cache.stride(1) * element
        self._q_dtype_code = DTYPE_CODES[staging[0].q.dtype]
        # (address, layer bytes, v offset bytes) of an 8-bit cache's scales, else zeros.
        self._scales = (0, 0, 0) if kv_scales is None else (
            kv_scales.data_ptr(), kv_scales.stride(0) * 4, kv_scales.stride(1) * 4)

    def submit(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               slot_mapping: torch.Tensor, value: int) -> list[JobHandle]:
        """For every layer l a decode job (appending new_k/new_v first) that starts once
        flags[0, l] >= value and sets flags[1, l] to value when done. Only the metadata's
        structure is checked here; the native side refuses bad lengths before queueing any
        job (ValueError) and bad block ids or slots when a job runs (RuntimeError at wait),
        so bad metadata never reads outside the cache."""
        pool = self._pool
        if pool._closed:
            raise RuntimeError("the CPU attention pool is closed")
        sizes = check_decode_metadata(self._sizes, block_tables, seq_lens, slot_mapping,
                                      check_values=False)
        natives = pool._native.submit_decode_layers(
            self._kv_cache.shape[0], self._addresses, self._kv_cache.data_ptr(),
            self._layer_bytes, self._v_offset_bytes, *self._scales, block_tables.data_ptr(),
            seq_lens.data_ptr(), slot_mapping.data_ptr(), sizes.as_list(), self._q_dtype_code,
            DTYPE_CODES[self._kv_cache.dtype], self._scale, self._flags.data_ptr(), int(value))
        keepalive = (self._kv_cache, self._kv_scales, block_tables, seq_lens, slot_mapping,
                     self._flags, *self._staging)
        staging = self._staging
        handles = [JobHandle(native, staging[layer % 2].out, staging[layer % 2].lse, keepalive)
                   for layer, native in enumerate(natives)]
        pool._track(handles)
        return handles
