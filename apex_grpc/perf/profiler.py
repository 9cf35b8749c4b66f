"""`apex-grpc profile`: measures the performance-model tables on the actual device.

Times the real pieces: a decoder layer's pre_attention/post_attention vs token count (T_lin),
the GPU tier's attention backend as served (Triton on CUDA) for prefill and decode (on CUDA the
layer and the decode attention are timed as CUDA-graph replays, as decode steps are served), the
native CpuAttentionPool for CPU decode attention over (requests, context tokens), torch copies
for the PCIe link, a tiny pool round trip for the per-layer sync, and the LM head. Every point
gets a share of a time budget, so profiling at server start-up is bounded.
apex_grpc/perf/profiles/derive.py builds the shipped profiles for hardware we cannot measure here.
Its flags for what to load and where are serve's (config.ModelOptions).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.gpu_backend import make_device_attention
from apex_grpc.attention.layout import contiguous_block_ids, make_layout, paged_batch
from apex_grpc.config import ModelConfig, ModelOptions
from apex_grpc.flags import add_flags, from_args
from apex_grpc.perf.host_kv_costs import host_kv_caches
from apex_grpc.perf.perf_model import Link, ModelShape, Profile, Table1D, Table2D
from apex_grpc.platform import (default_cpu_attention_threads, device_name, resolve_device,
                                resolve_dtype)

_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Grid:
    linear_tokens: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    gpu_ctx_tokens: tuple[int, ...]
    cpu_reqs: tuple[int, ...]
    cpu_ctx_tokens: tuple[int, ...]
    copy_bytes: tuple[int, ...]
    head_rows: tuple[int, ...]
    budget_s: float  # the default bound on measuring time

    @property
    def num_points(self) -> int:
        return (len(self.linear_tokens) + len(self.prefill_lens) + len(self.gpu_ctx_tokens)
                + len(self.cpu_reqs) * len(self.cpu_ctx_tokens) + 2 * len(self.copy_bytes)
                + len(self.head_rows) + 1)


# The start-up profile's grid (and `apex-grpc profile --quick`).
QUICK_GRID = Grid((1, 16, 64, 256, 512), (64, 256, 1024), (256, 2048, 8192), (1, 8, 32),
                  (512, 4096, 16384), (1 << 16, 1 << 22), (1, 32, 256), budget_s=20.0)
FULL_GRID = Grid((1, 8, 32, 64, 128, 256, 512, 1024, 2048), (64, 256, 1024, 2048, 4096),
                 (256, 1024, 4096, 16384, 65536), (1, 4, 16, 64, 256),
                 (512, 4096, 16384, 65536, 262144), (1 << 16, 1 << 20, 1 << 24, 1 << 26),
                 (1, 16, 64, 256, 512), budget_s=300.0)


class _Timer:
    """Median wall time of a callable within a per-point share of the remaining budget."""

    def __init__(self, device: torch.device, budget_s: float, num_points: int,
                 progress: tqdm) -> None:
        self.device = device
        self.deadline = time.perf_counter() + budget_s
        self.points_left = num_points
        self.progress = progress

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], object], max_repeats: int = 20, graphed: bool = False) -> float:
        """graphed: on CUDA, time fn captured as a CUDA graph, as served decode steps run it
        (runner/decode_graphs.py), so the table holds no eager launch overhead."""
        share = max(0.0, self.deadline - time.perf_counter()) / max(1, self.points_left)
        stop = time.perf_counter() + share
        fn()  # warm-up: allocator, kernel selection
        self._sync()
        if graphed and self.device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        samples: list[float] = []
        while len(samples) < max_repeats and (not samples or time.perf_counter() < stop):
            start = time.perf_counter()
            fn()
            self._sync()
            samples.append((time.perf_counter() - start) * 1e3)
        self.points_left -= 1
        self.progress.update(1)
        return statistics.median(samples)


def _monotone(values: list[float]) -> tuple[float, ...]:
    """Timing noise must not make a bigger batch predict faster than a smaller one."""
    out: list[float] = []
    for value in values:
        out.append(max(value, out[-1]) if out else value)
    return tuple(out)


def _linear_table(model, config: ModelConfig, grid: Grid, timer: _Timer) -> Table1D:
    layer = model.layers[0]
    dtype, device = model.dtype, model.device
    times = []
    for num_tokens in grid.linear_tokens:
        hidden = torch.randn(num_tokens, config.hidden_size, dtype=dtype, device=device)
        residual = torch.randn_like(hidden)
        rope = model.rotary.angles(
            torch.arange(num_tokens, device=device) % config.max_position_embeddings)

        def run() -> None:
            q, _, _, res = layer.pre_attention(hidden, residual.clone(), rope)
            layer.post_attention(q, res)
        with torch.inference_mode():
            times.append(timer.ms(run, graphed=True))
    return Table1D(tuple(map(float, grid.linear_tokens)), _monotone(times))


def _paged_ms(config: ModelConfig, dtype: torch.dtype, device: torch.device, num_seqs: int,
              ctx_len: int, query_len: int, timer: _Timer) -> float:
    """One layer of the GPU tier's attention backend (Triton on CUDA, as served) over num_seqs
    sequences of ctx_len tokens."""
    blocks_per_seq = -(-ctx_len // _BLOCK_SIZE)
    kv = torch.randn(1, 2, num_seqs * blocks_per_seq, config.num_key_value_heads, _BLOCK_SIZE,
                     config.head_dim, dtype=dtype, device=device)
    ids = [contiguous_block_ids(i, blocks_per_seq) for i in range(num_seqs)]
    batch = paged_batch(0, ids, [ctx_len - query_len] * num_seqs, [query_len] * num_seqs,
                        _BLOCK_SIZE, device)
    is_decode = query_len == 1 and ctx_len > 1
    layout = make_layout(gpu_decode=batch) if is_decode else make_layout(gpu_prefill=batch)
    rows = num_seqs * query_len
    q = torch.randn(rows, config.num_attention_heads, config.head_dim, dtype=dtype, device=device)
    k = torch.randn(rows, config.num_key_value_heads, config.head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    # The pool serves only a CPU device's decode rows (one thread: the profile's CPU figures
    # come from _cpu_attention_table).
    with CpuAttentionPool(1) as pool:
        backend = make_device_attention(kv, config.head_dim ** -0.5, pool)
        # Decode steps are served as CUDA graphs, prefill chunks eagerly.
        return timer.ms(lambda: backend.forward(0, q, k, k, layout, out), graphed=is_decode)


def _cpu_attention_table(config: ModelConfig, dtype: torch.dtype, threads: int, grid: Grid,
                         timer: _Timer, host_kv_dtype: str = "auto") -> tuple[Table2D, float, str]:
    """CPU decode attention of one layer over a host tier of host_kv_dtype; also the pool's
    round trip for a tiny job."""
    table = []
    with CpuAttentionPool(threads) as pool:
        for num_reqs in grid.cpu_reqs:
            table.append(_monotone([_pool_ms(pool, config, dtype, num_reqs,
                                             max(1, ctx // num_reqs), timer, host_kv_dtype)
                                    for ctx in grid.cpu_ctx_tokens]))
        sync_ms = _pool_ms(pool, config, dtype, 1, 1, timer)
    return (Table2D(tuple(map(float, grid.cpu_reqs)), tuple(map(float, grid.cpu_ctx_tokens)),
                    tuple(table)), sync_ms, "CPU attention: native CpuAttentionPool")


def _pool_ms(pool, config: ModelConfig, dtype: torch.dtype, num_reqs: int, ctx_len: int,
             timer: _Timer, host_kv_dtype: str = "auto") -> float:
    blocks_per_seq = -(-ctx_len // _BLOCK_SIZE)
    shape = (num_reqs * blocks_per_seq, config.num_key_value_heads, _BLOCK_SIZE, config.head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    tables = torch.arange(num_reqs * blocks_per_seq, dtype=torch.int32).reshape(num_reqs, -1)
    seq_lens = torch.full((num_reqs,), ctx_len, dtype=torch.int32)
    q = torch.randn(num_reqs, config.num_attention_heads, config.head_dim, dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(num_reqs, config.num_attention_heads, dtype=torch.float32)
    scale = config.head_dim ** -0.5
    k_cache, v_cache, scales = host_kv_caches(host_kv_dtype, k_cache, v_cache)
    return timer.ms(lambda: pool.wait(pool.submit_decode(q, k_cache, v_cache, tables, seq_lens,
                                                         out, lse, scale=scale, **scales)))


def _link(device: torch.device, to_host: bool, grid: Grid, timer: _Timer) -> Link:
    """Bandwidth from the largest copy, latency from what the smallest adds beyond it
    (robust to a noisy small sample, unlike a two-point slope)."""
    times = []
    for num_bytes in grid.copy_bytes:
        dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        host = torch.empty(num_bytes, dtype=torch.uint8,
                           pin_memory=device.type == "cuda")
        src, dst = (dev, host) if to_host else (host, dev)
        times.append(timer.ms(lambda: dst.copy_(src, non_blocking=True)))
    small, large = grid.copy_bytes[0], grid.copy_bytes[-1]
    gb_per_s = large / (max(times[-1], 1e-6) * 1e6)
    return Link(latency_ms=max(0.0, times[0] - small / (gb_per_s * 1e6)), gb_per_s=gb_per_s)


def _head_table(model, config: ModelConfig, grid: Grid, timer: _Timer) -> Table1D:
    times = []
    for num_rows in grid.head_rows:
        hidden = torch.randn(num_rows, config.hidden_size, dtype=model.dtype, device=model.device)
        times.append(timer.ms(lambda: model.compute_logits(
            model.final_norm(hidden, hidden)).argmax(dim=-1)))
    return Table1D(tuple(map(float, grid.head_rows)), _monotone(times))


def measure(model, config: ModelConfig, dtype: torch.dtype, device: torch.device,
            threads: int, grid: Grid, budget_s: float, name: str = "",
            host_kv_dtype: str = "auto") -> Profile:
    """Every table of the Profile, measured within about budget_s seconds."""
    torch.manual_seed(0)
    with tqdm(total=grid.num_points, desc="profiling", unit="pt") as progress:
        timer = _Timer(device, budget_s, grid.num_points, progress)
        linear = _linear_table(model, config, grid, timer)
        prefill = Table1D(tuple(map(float, grid.prefill_lens)), _monotone(
            [_paged_ms(config, dtype, device, 1, n, n, timer) for n in grid.prefill_lens]))
        # Eight sequences share the context: decode attention work is per context token.
        gpu = Table1D(tuple(map(float, grid.gpu_ctx_tokens)), _monotone(
            [_paged_ms(config, dtype, device, 8, max(1, c // 8), 1, timer)
             for c in grid.gpu_ctx_tokens]))
        cpu, sync_ms, cpu_note = _cpu_attention_table(config, dtype, threads, grid, timer,
                                                      host_kv_dtype)
        d2h = _link(device, True, grid, timer)
        h2d = _link(device, False, grid, timer)
        head = _head_table(model, config, grid, timer)
    dtype_name = str(dtype).removeprefix("torch.")
    return Profile(ModelShape.of(config), dtype_name, device_name(device), threads, linear,
                   prefill, gpu, cpu, d2h, h2d, layer_launch_ms=0.0, layer_sync_ms=sync_ms,
                   head=head, host_kv_dtype=host_kv_dtype,
                   name=name or f"{config.name} on {device_name(device)}",
                   notes=f"measured by apex-grpc profile; launches inside T_lin; {cpu_note}")


def profile_quick(model, model_config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  threads: int, budget_s: float = QUICK_GRID.budget_s,
                  host_kv_dtype: str = "auto") -> Profile:
    """The start-up profile: the quick grid within budget_s seconds."""
    return measure(model, model_config, dtype, device, threads, QUICK_GRID, budget_s,
                   host_kv_dtype=host_kv_dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-grpc profile",
                                     description="measure the performance-model tables")
    # The model and hardware flags of `apex-grpc serve`: a profile holds for exactly these.
    add_flags(parser.add_argument_group("model and hardware"), ModelOptions)
    group = parser.add_argument_group("profile")
    group.add_argument("--output", required=True, help="where to write the profile JSON")
    group.add_argument("--quick", action="store_true",
                       help="the coarse grid start-up profiling uses, in about "
                            f"{QUICK_GRID.budget_s:.0f} s")
    group.add_argument("--budget-s", type=float, default=None,
                       help=f"time budget (default {QUICK_GRID.budget_s:.0f} with --quick, "
                            f"else {FULL_GRID.budget_s:.0f})")
    group.add_argument("--host-kv-dtype", choices=("auto", "int8"), default="auto",
                       help="the host KV tier the CPU attention table is measured over")
    return parser


def main(argv: list[str] | None = None) -> int:
    from apex_grpc.model.loader import load_model

    args = build_parser().parse_args(argv)
    opts = from_args(ModelOptions, args)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    torch.manual_seed(opts.seed)
    model, model_config, _, name = load_model(opts.model, opts.load_format, device, dtype,
                                              dummy_config=opts.dummy_config)
    threads = opts.cpu_attention_threads or default_cpu_attention_threads()
    grid = QUICK_GRID if args.quick else FULL_GRID
    budget = args.budget_s if args.budget_s is not None else grid.budget_s
    profile = measure(model, model_config, dtype, device, threads, grid, budget,
                      name=f"{name} on {device_name(device)}", host_kv_dtype=args.host_kv_dtype)
    profile.save(args.output)
    print(f"wrote {args.output}: {profile.name}, {threads} CPU attention threads")
    return 0
