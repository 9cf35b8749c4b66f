"""Benchmark of the native CPU decode-attention kernel: python -m apex_grpc.bench.cpu_attention.

Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, block 16). Per case: KV bytes read
per second, the ratio to this machine's streaming-read bandwidth measured in the same run
(multi-threaded torch fp32 sum, same thread count) and the ratio to torch SDPA on the same
data (best of fp32 and bf16 torch, contiguous KV: generous to torch). Then the slowdown of a
Python loop of small torch ops while the pool runs on all but one core, and handoff_us_p50:
set_flag -> worker runs a tiny flag-gated job -> wait_flag returns (the job is queued first,
as the engine does for a whole step). Ends with one JSON line for bf16, batch 32, context 2048.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apex_grpc.attention.cpu_kernel import CpuAttentionPool, set_flag, wait_flag
from apex_grpc.platform import usable_cores

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
REFERENCE_CASE = (32, 2048)


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # [batch, NUM_HEADS, HEAD_DIM]
    k_cache: torch.Tensor  # [num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [batch, blocks_per_seq] int32, shuffled blocks
    seq_lens: torch.Tensor  # [batch] int32

    @property
    def kv_bytes(self) -> int:
        tokens = int(self.seq_lens.sum())
        return 2 * tokens * NUM_KV_HEADS * HEAD_DIM * self.k_cache.element_size()


def make_inputs(batch: int, context_len: int, dtype: torch.dtype) -> Inputs:
    blocks_per_seq = math.ceil(context_len / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    tables = torch.randperm(num_blocks, dtype=torch.int32).reshape(batch, blocks_per_seq)
    return Inputs(torch.randn(batch, NUM_HEADS, HEAD_DIM).to(dtype), torch.randn(shape).to(dtype),
                  torch.randn(shape).to(dtype), tables,
                  torch.full((batch,), context_len, dtype=torch.int32))


def best_time(function, repeats: int) -> float:
    function()  # warm-up: page faults, scratch growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def stream_read_gbps(num_threads: int, num_bytes: int) -> float:
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return num_bytes / best_time(lambda: data.sum(), 5) / 1e9
    finally:
        torch.set_num_threads(previous)


def torch_sdpa_time(inputs: Inputs, num_threads: int, repeats: int) -> tuple[float, str]:
    """Best of torch fp32 / bf16 SDPA over the same values gathered into contiguous KV."""
    batch, blocks_per_seq = inputs.block_tables.shape

    def contiguous(cache: torch.Tensor) -> torch.Tensor:  # [batch, kv_heads, ctx, head_dim]
        rows = cache[inputs.block_tables.long()]  # [batch, blocks, kv_heads, block, dim]
        return rows.permute(0, 2, 1, 3, 4).reshape(batch, NUM_KV_HEADS, -1, HEAD_DIM)

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    results = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            q = inputs.q.to(dtype).unsqueeze(2)  # [batch, heads, 1, dim]
            k, v = contiguous(inputs.k_cache).to(dtype), contiguous(inputs.v_cache).to(dtype)
            run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            results.append((best_time(run, repeats), str(dtype).removeprefix("torch.")))
    finally:
        torch.set_num_threads(previous)
    return min(results)


def launch_loop_slowdown(num_threads: int, inputs: Inputs, num_iterations: int) -> float:
    """A Python loop of small torch ops (a stand-in for a GPU launch loop): its time while
    the pool runs on num_threads - 1 cores, over its time alone."""
    small = torch.ones(64)

    def loop() -> float:
        start = time.perf_counter()
        value = small
        for _ in range(num_iterations):
            value = value * 1.0001 + 0.5
        return time.perf_counter() - start

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = min(loop() for _ in range(3))
        stop = threading.Event()
        with CpuAttentionPool(max(1, num_threads - 1)) as pool:
            out, lse = torch.empty_like(inputs.q), torch.empty(inputs.q.shape[:2])

            def busy() -> None:
                while not stop.is_set():
                    pool.decode(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_tables,
                                inputs.seq_lens, out, lse)

            worker = threading.Thread(target=busy)
            worker.start()
            time.sleep(0.05)
            together = min(loop() for _ in range(3))
            stop.set()
            worker.join()
    finally:
        torch.set_num_threads(previous)
    return together / alone


def handoff_latency_us(pool: CpuAttentionPool, iterations: int) -> tuple[float, float]:
    """(p50 set_flag -> wait_flag of a queued tiny gated job, p50 submit_decode call) in us."""
    tiny = make_inputs(1, 1, torch.bfloat16)
    out, lse = torch.empty_like(tiny.q), torch.empty(tiny.q.shape[:2])
    ready, done = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    handoffs, submits = [], []
    for step in range(1, iterations + 1):
        start = time.perf_counter()
        handle = pool.submit_decode(tiny.q, tiny.k_cache, tiny.v_cache, tiny.block_tables,
                                    tiny.seq_lens, out, lse, ready_flag=ready, ready_value=step,
                                    done_flag=done, done_value=step)
        submitted = time.perf_counter()
        set_flag(ready, step)
        if not wait_flag(done, step, timeout_s=5.0):
            raise RuntimeError("a flag-gated job did not finish within 5 s")
        finished = time.perf_counter()
        pool.wait(handle)
        submits.append(submitted - start)
        handoffs.append(finished - submitted)
    return statistics.median(handoffs) * 1e6, statistics.median(submits) * 1e6


def cases(quick: bool) -> list[tuple[int, int]]:
    max_tokens = 32 * 1024 if quick else 128 * 1024  # caps the KV per case (4 KiB per token)
    batches = [1, 32, 256] if quick else [1, 8, 32, 64, 256]
    contexts = [128, 2048, 32768] if quick else [128, 512, 2048, 8192, 32768]
    chosen = [(b, c) for b in batches for c in contexts if b * c <= max_tokens]
    return chosen if REFERENCE_CASE in chosen else chosen + [REFERENCE_CASE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (~20 s on 2 cores)")
    parser.add_argument("--threads", type=int, default=usable_cores())
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    stream = stream_read_gbps(args.threads, (128 if args.quick else 512) * 2**20)
    print(f"threads {args.threads}; streaming read (torch fp32 sum): {stream:.1f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'ms':>8} {'kv_GB/s':>8} {'x_stream':>8} "
          f"{'x_torch':>8} torch_best")
    reference: dict[str, object] = {}
    with CpuAttentionPool(args.threads) as pool:
        for batch, context_len in cases(args.quick):
            inputs = make_inputs(batch, context_len, torch.bfloat16)
            out, lse = torch.empty_like(inputs.q), torch.empty(inputs.q.shape[:2])
            seconds = best_time(lambda: pool.decode(inputs.q, inputs.k_cache, inputs.v_cache,
                                                    inputs.block_tables, inputs.seq_lens,
                                                    out, lse), repeats)
            torch_seconds, torch_dtype = torch_sdpa_time(inputs, args.threads, 2)
            kv_gbps = inputs.kv_bytes / seconds / 1e9
            print(f"{batch:>6} {context_len:>8} {seconds * 1e3:>8.2f} {kv_gbps:>8.1f} "
                  f"{kv_gbps / stream:>8.2f} {torch_seconds / seconds:>8.1f} {torch_dtype}")
            if (batch, context_len) == REFERENCE_CASE:
                reference = dict(kv_gbps=round(kv_gbps, 2),
                                 ratio_to_stream=round(kv_gbps / stream, 3),
                                 ratio_to_torch=round(torch_seconds / seconds, 2),
                                 torch_best_dtype=torch_dtype, isa=pool.isa(torch.bfloat16))
                reference_inputs = inputs
        handoff_p50, submit_p50 = handoff_latency_us(pool, 300 if args.quick else 2000)
    slowdown = launch_loop_slowdown(args.threads, reference_inputs, 2000 if args.quick else 5000)
    print(f"launch loop slowdown with the pool on {max(1, args.threads - 1)} threads: "
          f"{slowdown:.2f}x; handoff p50 {handoff_p50:.1f} us; submit p50 {submit_p50:.1f} us")
    print(json.dumps(dict(case="bf16 batch 32 context 2048", threads=args.threads,
                          stream_read_gbps=round(stream, 2), **reference,
                          launch_loop_slowdown=round(slowdown, 3),
                          handoff_us_p50=round(handoff_p50, 2),
                          submit_us_p50=round(submit_p50, 2))))


if __name__ == "__main__":
    main()
