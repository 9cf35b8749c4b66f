"""ServeOptions -> a running AsyncEngine: loads the model, sizes both KV tiers, derives the
EngineConfig (engine_config), wires the scheduler, the runner, the attention backends and the CPU
pool."""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass

import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.gpu_backend import make_device_attention
from apex_grpc.attention.host import HostAttention
from apex_grpc.config import (CUDA_KV_MEMORY_FRACTION, CUDA_LAYER_WAITS,
                              DEFAULT_HOST_KV_GB_ON_CUDA, DEFAULT_KV_GB_ON_CPU, EngineConfig,
                              ModelConfig, Policy, SchedulingOptions, ServeOptions)
from apex_grpc.engine.async_engine import AsyncEngine
from apex_grpc.engine.core import EngineCore
from apex_grpc.kv_cache.manager import KVCacheManager
from apex_grpc.kv_cache.quantized import checked_host_kv_dtype, resolve_host_kv_dtype
from apex_grpc.kv_cache.storage import KVStorage, bytes_per_block, host_bytes_per_block
from apex_grpc.model.loader import load_model
from apex_grpc.perf.host_kv_costs import with_host_kv_dtype
from apex_grpc.perf.perf_model import PerfModel, Profile
from apex_grpc.platform import (default_cpu_attention_threads, device_name, resolve_device,
                                resolve_dtype, share_cores_with_pool)
from apex_grpc.runner.decode_graphs import DecodeBuckets
from apex_grpc.runner.model_runner import ModelRunner
from apex_grpc.scheduler.apex_chooser import make_chooser
from apex_grpc.scheduler.chooser import SimpleChooser
from apex_grpc.scheduler.host_gate import make_host_gate
from apex_grpc.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

_GIB = 1 << 30
# A server that cannot capture its decode steps still serves, eagerly (and says so).
_GRAPHS_FAILED = ("capturing the decode steps as CUDA graphs failed: they run eagerly "
                  "(--enforce-eager skips the capture)")


def _num_blocks(gib: float, block_bytes: int) -> int:
    return int(gib * _GIB) // block_bytes


def size_kv_tiers(opts: ServeOptions, model: ModelConfig, dtype: torch.dtype,
                  device: torch.device, reserved_bytes: int = 0) -> tuple[int, int]:
    """(GPU blocks, host blocks). reserved_bytes: device memory start-up still needs beside
    the free memory's share (the decode graphs' pool)."""
    block_bytes = bytes_per_block(model, opts.block_size, dtype)
    host_block_bytes = host_bytes_per_block(
        model, opts.block_size, resolve_host_kv_dtype(opts.host_kv_dtype, dtype))
    if opts.gpu_kv_blocks is not None:
        num_gpu = opts.gpu_kv_blocks
    elif opts.gpu_kv_gb is not None:
        num_gpu = _num_blocks(opts.gpu_kv_gb, block_bytes)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Less one block: the padding block of graphed steps (kv_cache/storage.py).
        num_gpu = int(free * CUDA_KV_MEMORY_FRACTION - reserved_bytes) // block_bytes - 1
    else:
        num_gpu = _num_blocks(DEFAULT_KV_GB_ON_CPU, block_bytes)
    if opts.policy == Policy.GPU_ONLY:
        num_host = 0
    else:
        host_gib = opts.host_kv_gb if opts.host_kv_gb is not None else (
            DEFAULT_HOST_KV_GB_ON_CUDA if device.type == "cuda" else DEFAULT_KV_GB_ON_CPU)
        num_host = _num_blocks(host_gib, host_block_bytes)
    if num_gpu < 1:
        raise ValueError(f"the GPU KV budget holds no block of {block_bytes} bytes")
    log.info("KV cache: GPU tier %d blocks (%.3f GiB, %d tokens), host tier %d blocks "
             "(%.3f GiB, %d tokens), block size %d", num_gpu, num_gpu * block_bytes / _GIB,
             num_gpu * opts.block_size, num_host, num_host * host_block_bytes / _GIB,
             num_host * opts.block_size, opts.block_size)
    return num_gpu, num_host


def engine_config(opts: ServeOptions, model_config: ModelConfig, num_gpu_blocks: int,
                  num_host_blocks: int, cpu_attention_threads: int) -> EngineConfig:
    """The engine's config: the scheduling options as given, the KV tiers as sized, the context
    limit the GPU tier allows."""
    scheduling = {field.name: getattr(opts, field.name)
                  for field in dataclasses.fields(SchedulingOptions)}
    return EngineConfig(
        **scheduling, num_gpu_blocks=num_gpu_blocks, num_host_blocks=num_host_blocks,
        max_model_len=servable_model_len(opts, model_config, num_gpu_blocks),
        cpu_attention_threads=cpu_attention_threads)


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
    graph_max_batch, graph_bytes = plan_decode_graphs(opts, model, model_config, tokenizer,
                                                      dtype, device, threads)
    num_gpu_blocks, num_host_blocks = size_kv_tiers(opts, model_config, dtype, device,
                                                    reserved_bytes=graph_bytes)
    config = engine_config(opts, model_config, num_gpu_blocks, num_host_blocks, threads)
    core = build_core(config, model, model_config, tokenizer, dtype, device, perf_model,
                      opts.tpot_slo_ms, cuda_layer_wait=opts.cuda_layer_wait,
                      cuda_graph_max_batch=graph_max_batch)
    if graph_max_batch is not None:
        try:
            core.runner.capture_decode_graphs()
        except RuntimeError:
            log.exception(_GRAPHS_FAILED)
            core.runner.decode_graphs = None
    return BuiltCore(core, model_config, name, tokenizer, dtype, device)


def plan_decode_graphs(opts: ServeOptions, model: torch.nn.Module, model_config: ModelConfig,
                       tokenizer, dtype: torch.dtype, device: torch.device,
                       threads: int) -> tuple[int | None, int]:
    """(the decode graphs' largest bucket, or None for eager decoding; the device memory to
    set aside for their pool before the GPU KV tier is sized from free memory)."""
    if device.type != "cuda":
        return None, 0  # padding buys nothing without capture
    if opts.enforce_eager:
        log.info("decode steps run eagerly (--enforce-eager)")
        return None, 0
    if opts.gpu_kv_blocks is not None or opts.gpu_kv_gb is not None:
        return opts.cuda_graph_max_batch, 0  # the KV tier's size is given, not derived
    try:
        pool_bytes = measure_decode_graphs(opts, model, model_config, tokenizer, dtype, device,
                                           threads)
    except RuntimeError:
        log.exception(_GRAPHS_FAILED)
        return None, 0
    log.info("%.1f MiB set aside for the decode graphs before sizing the GPU KV tier",
             pool_bytes / 2**20)
    return opts.cuda_graph_max_batch, pool_bytes


def measure_decode_graphs(opts: ServeOptions, model: torch.nn.Module, model_config: ModelConfig,
                          tokenizer, dtype: torch.dtype, device: torch.device,
                          threads: int) -> int:
    """The decode graphs' memory pool in bytes, estimated by capturing the largest ones over a
    one-block GPU tier (the pool does not depend on the KV tier's size) and releasing them,
    so the GPU KV tier is sized with it set aside."""
    config = engine_config(opts, model_config, 1, 1 if opts.policy != Policy.GPU_ONLY else 0,
                           threads)
    config = config.replace(max_model_len=servable_model_len(opts, model_config, 1 << 30))
    core = build_core(config, model, model_config, tokenizer, dtype, device,
                      cuda_layer_wait=opts.cuda_layer_wait,
                      cuda_graph_max_batch=opts.cuda_graph_max_batch)
    try:
        pool_bytes = core.runner.decode_graphs.estimate_pool_bytes()
    finally:
        core.runner.close()
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return pool_bytes


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
        from apex_grpc.perf.profiler import QUICK_GRID, profile_quick

        log.info("profiling the performance model (at most %.0f s)", QUICK_GRID.budget_s)
        profile = profile_quick(model, model_config, dtype, device, threads,
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
               cuda_layer_wait: str = CUDA_LAYER_WAITS[0],
               cuda_graph_max_batch: int | None = None) -> EngineCore:
    """The synchronous engine over an already loaded model (tests build it directly). Without
    a performance model each policy follows its fixed rule (chooser.SimpleChooser).
    cuda_graph_max_batch: run decode-only steps over fixed buffers padded to buckets up to
    this size (runner/decode_graphs.py); on CUDA, runner.capture_decode_graphs() then makes
    them graphs."""
    storage = KVStorage(model_config, config.block_size, config.num_gpu_blocks,
                        config.num_host_blocks, dtype, device,
                        host_dtype=checked_host_kv_dtype(config.host_kv_dtype, dtype))
    scale = model_config.head_dim ** -0.5
    pool = CpuAttentionPool(config.cpu_attention_threads)
    host = HostAttention(storage.host, pool, scale, config.max_num_seqs,
                         model_config.num_attention_heads, model_config.num_key_value_heads,
                         model_config.head_dim, device, cuda_layer_wait,
                         host_scales=storage.host_scales, row_dtype=dtype,
                         job_timeout_s=config.host_job_timeout_s)
    buckets = None
    if cuda_graph_max_batch is not None:
        hybrid = config.policy != Policy.GPU_ONLY and config.num_host_blocks > 0
        buckets = DecodeBuckets.for_engine(min(cuda_graph_max_batch, config.max_num_seqs),
                                           config.max_num_seqs if hybrid else 0)
    runner = ModelRunner(model, storage, make_device_attention(storage.gpu, scale, pool), host,
                         config.block_size, device, decode_buckets=buckets,
                         max_model_len=config.max_model_len)
    kv = KVCacheManager(config.block_size, config.num_gpu_blocks, config.num_host_blocks)
    eos = tokenizer.eos_token_ids if tokenizer is not None else model_config.eos_token_ids
    if perf_model is None:
        chooser, host_gate = SimpleChooser(config.policy), None
    else:
        chooser = make_chooser(config.policy, perf_model, config, tpot_slo_ms)
        host_gate = make_host_gate(config.policy, perf_model, config, tpot_slo_ms)
    scheduler = Scheduler(config, kv, chooser, host_gate, eos_token_ids=eos)
    return EngineCore(config, scheduler, runner, tokenizer, device, perf_model)

