"""ServeOptions -> a running AsyncEngine: loads the model, sizes both KV tiers, wires the
scheduler, the runner, the attention backends and the CPU pool."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from apex_grpc.attention.base import AttentionBackend
from apex_grpc.attention.cpu_device import NativeCpuPagedAttention
from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.gpu_backend import make_gpu_attention_backend
from apex_grpc.attention.hybrid import HybridAttention
from apex_grpc.config import CUDA_LAYER_WAITS, EngineConfig, ModelConfig, Policy, ServeOptions
from apex_grpc.engine.async_engine import AsyncEngine
from apex_grpc.engine.core import EngineCore
from apex_grpc.kv_cache.manager import KVCacheManager
from apex_grpc.kv_cache.host_kv_costs import with_host_kv_dtype
from apex_grpc.kv_cache.quantized import checked_host_kv_dtype, resolve_host_kv_dtype
from apex_grpc.kv_cache.storage import KVStorage, bytes_per_block, host_bytes_per_block
from apex_grpc.model.loader import load_model
from apex_grpc.platform import device_name, resolve_device, resolve_dtype
from apex_grpc.runner.model_runner import ModelRunner
from apex_grpc.scheduler.apex_chooser import make_chooser
from apex_grpc.scheduler.chooser import SimpleChooser
from apex_grpc.scheduler.perf_model import PerfModel, Profile
from apex_grpc.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

_GIB = 1 << 30
# Without a GPU the "GPU tier" is ordinary memory: keep its default modest.
_CPU_DEFAULT_GPU_KV_GIB = 0.5
_CPU_DEFAULT_HOST_KV_GIB = 0.5
_CUDA_DEFAULT_HOST_KV_GIB = 8.0
# Share of free device memory (after weights) given to the GPU KV tier when not told.
_CUDA_KV_MEMORY_FRACTION = 0.85
# Bound on the start-up profile's measuring time.
_STARTUP_PROFILE_BUDGET_S = 20.0


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


def _num_blocks(gib: float, block_bytes: int) -> int:
    return int(gib * _GIB) // block_bytes


def size_kv_tiers(opts: ServeOptions, model: ModelConfig, dtype: torch.dtype,
                  device: torch.device) -> tuple[int, int]:
    block_bytes = bytes_per_block(model, opts.block_size, dtype)
    host_block_bytes = host_bytes_per_block(
        model, opts.block_size, resolve_host_kv_dtype(opts.host_kv_dtype, dtype))
    if opts.gpu_kv_blocks is not None:
        num_gpu = opts.gpu_kv_blocks
    elif opts.gpu_kv_gb is not None:
        num_gpu = _num_blocks(opts.gpu_kv_gb, block_bytes)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num_gpu = int(free * _CUDA_KV_MEMORY_FRACTION) // block_bytes
    else:
        num_gpu = _num_blocks(_CPU_DEFAULT_GPU_KV_GIB, block_bytes)
    if opts.policy == Policy.GPU_ONLY:
        num_host = 0
    else:
        host_gib = opts.host_kv_gb if opts.host_kv_gb is not None else (
            _CUDA_DEFAULT_HOST_KV_GIB if device.type == "cuda" else _CPU_DEFAULT_HOST_KV_GIB)
        num_host = _num_blocks(host_gib, host_block_bytes)
    if num_gpu < 1:
        raise ValueError(f"the GPU KV budget holds no block of {block_bytes} bytes")
    log.info("KV cache: GPU tier %d blocks (%.3f GiB, %d tokens), host tier %d blocks "
             "(%.3f GiB, %d tokens), block size %d", num_gpu, num_gpu * block_bytes / _GIB,
             num_gpu * opts.block_size, num_host, num_host * host_block_bytes / _GIB,
             num_host * opts.block_size, opts.block_size)
    return num_gpu, num_host


def build_engine(opts: ServeOptions) -> AsyncEngine:
    """Load the model and start the engine thread."""
    built = build_engine_core(opts)
    return AsyncEngine(built.core, built.model_config, built.core.config, built.model_name,
                       str(built.dtype).removeprefix("torch."), device_name(built.device),
                       built.tokenizer)


@dataclass(frozen=True)
class BuiltCore:
    core: EngineCore
    model_config: ModelConfig  # with the EOS ids the engine stops on
    model_name: str
    tokenizer: object | None
    dtype: torch.dtype
    device: torch.device


def build_engine_core(opts: ServeOptions) -> BuiltCore:
    """Everything build_engine does but start a thread (tests and benchmarks drive the core)."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    torch.manual_seed(opts.seed)
    model, model_config, tokenizer, name = load_model(
        opts.model, opts.load_format, device, dtype, dummy_config=opts.dummy_config)
    if tokenizer is not None:  # one EOS set for stopping and for GetModelInfo
        model_config = model_config.replace(eos_token_ids=tuple(tokenizer.eos_token_ids))
    threads = opts.cpu_attention_threads or default_cpu_attention_threads()
    share_cores_with_pool(device, threads)
    # Profile first: its allocations are released before free memory sizes the GPU KV tier.
    perf_model = load_perf_model(opts, model, model_config, dtype, device, threads)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    num_gpu_blocks, num_host_blocks = size_kv_tiers(opts, model_config, dtype, device)
    config = EngineConfig(
        block_size=opts.block_size, num_gpu_blocks=num_gpu_blocks,
        num_host_blocks=num_host_blocks, max_num_seqs=opts.max_num_seqs,
        max_batched_tokens=opts.max_batched_tokens,
        max_model_len=servable_model_len(opts, model_config, num_gpu_blocks),
        policy=opts.policy, kv_placement=opts.kv_placement, cpu_attention_threads=threads,
        max_waiting=opts.max_waiting, max_step_stretch=opts.max_step_stretch,
        host_kv_dtype=opts.host_kv_dtype)
    core = build_core(config, model, model_config, tokenizer, dtype, device, perf_model,
                      opts.tpot_slo_ms, cuda_layer_wait=opts.cuda_layer_wait)
    return BuiltCore(core, model_config, name, tokenizer, dtype, device)


def servable_model_len(opts: ServeOptions, model_config: ModelConfig, num_gpu_blocks: int) -> int:
    """The context limit: what the model supports, capped so that one request alone always fits
    the GPU tier (prefill runs there and gpu-only has nowhere else to put it)."""
    wanted = min(opts.max_model_len or model_config.max_position_embeddings,
                 model_config.max_position_embeddings)
    capacity = num_gpu_blocks * opts.block_size
    if wanted > capacity:
        log.warning("max_model_len %d exceeds the GPU KV tier (%d tokens): serving %d",
                    wanted, capacity, capacity)
    return min(wanted, capacity)


def load_perf_model(opts: ServeOptions, model: torch.nn.Module, model_config: ModelConfig,
                    dtype: torch.dtype, device: torch.device, threads: int) -> PerfModel | None:
    """The performance model the apex/neo choosers need, or None for fixed per-policy rules."""
    choice = opts.profile or ("auto" if device.type == "cuda" else "none")
    if opts.policy == Policy.GPU_ONLY or choice == "none":
        return None
    if choice == "auto":
        from apex_grpc.scheduler.profiler import profile_quick

        log.info("profiling the performance model (at most %.0f s)", _STARTUP_PROFILE_BUDGET_S)
        profile = profile_quick(model, model_config, dtype, device, threads,
                                budget_s=_STARTUP_PROFILE_BUDGET_S,
                                host_kv_dtype=opts.host_kv_dtype.value)
    else:
        profile = with_host_kv_dtype(Profile.load(choice), opts.host_kv_dtype.value)
        profile.check_matches(model_config, str(dtype).removeprefix("torch."),
                              device_name(device), threads)
    return PerfModel(profile)


def build_core(config: EngineConfig, model: torch.nn.Module, model_config: ModelConfig,
               tokenizer, dtype: torch.dtype, device: torch.device,
               perf_model: PerfModel | None = None,
               tpot_slo_ms: float | None = None,
               cuda_layer_wait: str = CUDA_LAYER_WAITS[0]) -> EngineCore:
    """The synchronous engine over an already loaded model (tests build it directly). Without
    a performance model each policy follows its fixed rule (chooser.SimpleChooser)."""
    storage = KVStorage(model_config, config.block_size, config.num_gpu_blocks,
                        config.num_host_blocks, dtype, device,
                        host_dtype=checked_host_kv_dtype(config.host_kv_dtype, dtype))
    scale = model_config.head_dim ** -0.5
    pool = CpuAttentionPool(config.cpu_attention_threads)
    attention = HybridAttention(
        make_device_attention(storage, scale, pool), storage.host, pool, scale,
        config.max_num_seqs,
        model_config.num_attention_heads, model_config.num_key_value_heads,
        model_config.head_dim, device, cuda_layer_wait, host_scales=storage.host_scales)
    runner = ModelRunner(model, storage, attention, config.block_size, device)
    kv = KVCacheManager(config.block_size, config.num_gpu_blocks, config.num_host_blocks)
    eos = tokenizer.eos_token_ids if tokenizer is not None else model_config.eos_token_ids
    chooser = SimpleChooser(config.policy) if perf_model is None else \
        make_chooser(config.policy, perf_model, config, tpot_slo_ms)
    return EngineCore(config, Scheduler(config, kv, chooser), runner, tokenizer, tuple(eos),
                      device, perf_model)


def make_device_attention(storage: KVStorage, scale: float,
                          pool: CpuAttentionPool) -> AttentionBackend:
    """Attention for the GPU tier: Triton on CUDA, the native kernel when the device is the CPU."""
    if storage.device.type == "cpu":
        return NativeCpuPagedAttention(storage.gpu, storage.host, scale, pool,
                                       storage.host_scales)
    return make_gpu_attention_backend(storage.gpu, storage.host, scale, storage.host_scales)
