"""Benchmark of the native CPU decode-attention kernel: python -m apex_grpc.bench.cpu_attention.

Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, block 16), bf16 q, KV in the memory
a server's host tier has on this machine (platform.host_kv_copy). For each kernel
set (--isa: the best one, a list, or `all` this CPU runs) and KV dtype (--kv-dtype bf16, int8:
8-bit rows plus a float32 scale per token and kv head), per case: KV bytes read per second
(an int8 cache's scales included), the ratio to this machine's streaming-read bandwidth
(multi-threaded torch fp32 sum, same thread count, measured again before each reference case),
context tokens attended per second (the figure that compares across KV dtypes) and the ratio
to torch SDPA on the same values (best of fp32 and bf16 torch, contiguous bf16 KV: generous to
torch). One JSON line per kernel set and KV dtype for batch 32, context 2048; with both KV
dtypes, one line per (bf16, int8) pair of kernel sets with their context-tokens ratio timed in
alternation (what a server picks, and each forced --isa that runs both). Then the slowdown
of a Python loop of small torch ops while the pool runs on all but one core, and
handoff_us_p50: set_flag -> worker runs a tiny flag-gated job -> wait_flag returns (the job is
queued first, as the engine does for a whole step), as a last JSON line.
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

from apex_grpc.attention.cpu_kernel import (CpuAttentionPool, best_isa, runs_isa, set_flag,
                                            wait_flag)
from apex_grpc.kv_cache.quantized import quantize_rows
from apex_grpc.platform import host_kv_copy, usable_cores

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
REFERENCE_CASE = (32, 2048)


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # [batch, NUM_HEADS, HEAD_DIM]
    k_cache: torch.Tensor  # [num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [batch, blocks_per_seq] int32, shuffled blocks
    seq_lens: torch.Tensor  # [batch] int32
    k_scales: torch.Tensor | None = None  # int8 caches: [num_blocks, NUM_KV_HEADS, BLOCK_SIZE]
    v_scales: torch.Tensor | None = None

    @property
    def context_tokens(self) -> int:
        return int(self.seq_lens.sum())

    @property
    def kv_bytes(self) -> int:
        row_bytes = HEAD_DIM * self.k_cache.element_size() + (4 if self.k_scales is not None else 0)
        return 2 * self.context_tokens * NUM_KV_HEADS * row_bytes

    def quantized(self) -> Inputs:
        """The same values in an int8 cache (kv_cache/quantized.py)."""
        (k, k_scales), (v, v_scales) = quantize_rows(self.k_cache), quantize_rows(self.v_cache)
        return Inputs(self.q, host_kv_copy(k), host_kv_copy(v), self.block_tables, self.seq_lens,
                      host_kv_copy(k_scales), host_kv_copy(v_scales))

    def decode(self, pool: CpuAttentionPool, out: torch.Tensor, lse: torch.Tensor) -> None:
        pool.decode(self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, out,
                    lse, k_scales=self.k_scales, v_scales=self.v_scales)


def make_inputs(batch: int, context_len: int, dtype: torch.dtype) -> Inputs:
    blocks_per_seq = math.ceil(context_len / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    tables = torch.randperm(num_blocks, dtype=torch.int32).reshape(batch, blocks_per_seq)
    return Inputs(torch.randn(batch, NUM_HEADS, HEAD_DIM).to(dtype),
                  host_kv_copy(torch.randn(shape).to(dtype)),
                  host_kv_copy(torch.randn(shape).to(dtype)), tables,
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
                    inputs.decode(pool, out, lse)

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


VECTOR_ISAS = ("avx512bf16", "avx512vnni", "avx512", "avx2")
KV_DTYPES = ("bf16", "int8")


def available_isas() -> list[str]:
    """The vector kernel sets this CPU runs (the scalar one is only named explicitly)."""
    return [isa for isa in VECTOR_ISAS if runs_isa(isa)]


def parse_list(value: str, choices: tuple[str, ...], field: str) -> list[str]:
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise SystemExit(f"{field}: unknown {unknown or value!r}; choose from {', '.join(choices)}")
    return names


def run_kernel_set(isa: str | None, kv_dtype: str, args: argparse.Namespace,
                   torch_times: dict[tuple[int, int], tuple[float, str]]) -> dict[str, object]:
    """The case table of one kernel set and KV dtype; returns its reference-case JSON record."""
    repeats = 3 if args.quick else 5
    record: dict[str, object] = {}
    with CpuAttentionPool(args.threads, isa=isa) as pool:
        name = pool.isa(torch.int8 if kv_dtype == "int8" else torch.bfloat16)
        print(f"-- isa {name}, KV {kv_dtype}")
        for batch, context_len in cases(args.quick):
            inputs = make_inputs(batch, context_len, torch.bfloat16)
            if (batch, context_len) not in torch_times:
                torch_times[(batch, context_len)] = torch_sdpa_time(inputs, args.threads, 2)
            torch_seconds, torch_dtype = torch_times[(batch, context_len)]
            if kv_dtype == "int8":
                inputs = inputs.quantized()
            out, lse = torch.empty_like(inputs.q), torch.empty(inputs.q.shape[:2])
            reference = (batch, context_len) == REFERENCE_CASE
            stream = stream_read_gbps(args.threads, args.stream_bytes) if reference else None
            seconds = best_time(lambda: inputs.decode(pool, out, lse), repeats)
            kv_gbps = inputs.kv_bytes / seconds / 1e9
            tokens_per_s = inputs.context_tokens / seconds
            ratio = f"{kv_gbps / stream:>8.2f}" if stream else f"{'':>8}"
            print(f"{batch:>6} {context_len:>8} {seconds * 1e3:>8.2f} {kv_gbps:>8.1f} {ratio} "
                  f"{tokens_per_s / 1e6:>8.1f} {torch_seconds / seconds:>8.1f} {torch_dtype}")
            if reference:
                record = dict(case="batch 32 context 2048", isa=name, kv_dtype=kv_dtype,
                              threads=args.threads, stream_read_gbps=round(stream, 2),
                              kv_gbps=round(kv_gbps, 2), ratio_to_stream=round(kv_gbps / stream, 3),
                              context_tokens_per_s=round(tokens_per_s),
                              ratio_to_torch=round(torch_seconds / seconds, 2),
                              torch_best_dtype=torch_dtype)
    return record


def kernel_set_pairs(isas: list[str | None]) -> list[tuple[str, str]]:
    """(bf16 kernel set, int8 kernel set) pairs to compare side by side: what a server on this
    CPU picks, and each forced --isa choice that serves both dtypes itself (avx512bf16 and
    avx512vnni serve one dtype each; their other dtype is plain avx512's, paired already)."""
    pairs: list[tuple[str, str]] = []
    for isa in [None] + [isa for isa in isas if isa is not None]:
        with CpuAttentionPool(1, isa=isa) as probe:
            pair = (probe.isa(torch.bfloat16), probe.isa(torch.int8))
        if (isa is None or pair == (isa, isa)) and pair not in pairs:
            pairs.append(pair)
    return pairs


def int8_over_bf16(pair: tuple[str, str], threads: int, rounds: int) -> dict[str, object]:
    """The reference case on bf16 KV and on the same values in int8 KV, timed in alternation
    (best of `rounds` each), so that drift in the machine's memory speed, which moves single
    figures by tens of percent, hits both alike."""
    bf16_inputs = make_inputs(*REFERENCE_CASE, torch.bfloat16)
    runs = [(pair[0], bf16_inputs), (pair[1], bf16_inputs.quantized())]
    out, lse = torch.empty_like(bf16_inputs.q), torch.empty(bf16_inputs.q.shape[:2])
    pools = [CpuAttentionPool(threads, isa=isa) for isa, _ in runs]
    best = [math.inf, math.inf]
    try:
        for _ in range(rounds):
            for index, (pool, (_, inputs)) in enumerate(zip(pools, runs)):
                inputs.decode(pool, out, lse)  # the other set's run left the caches cold alike
                start = time.perf_counter()
                inputs.decode(pool, out, lse)
                best[index] = min(best[index], time.perf_counter() - start)
    finally:
        for pool in pools:
            pool.close()
    return dict(case="int8 over bf16, batch 32 context 2048", bf16_isa=pair[0], int8_isa=pair[1],
                threads=threads, rounds=rounds, bf16_ms=round(best[0] * 1e3, 2),
                int8_ms=round(best[1] * 1e3, 2),
                context_tokens_ratio=round(best[0] / best[1], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (~20 s per kernel set)")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--isa", default="best",
                        help="best (what a server picks), all (every vector set this CPU "
                             f"runs) or a comma list of {', '.join(VECTOR_ISAS + ('scalar',))}")
    parser.add_argument("--kv-dtype", default=",".join(KV_DTYPES),
                        help=f"comma list of {', '.join(KV_DTYPES)}")
    args = parser.parse_args()
    args.stream_bytes = (128 if args.quick else 512) * 2**20
    if args.isa == "best":
        isas: list[str | None] = [None]
    elif args.isa == "all":
        isas = list(available_isas())
    else:
        isas = list(parse_list(args.isa, VECTOR_ISAS + ("scalar",), "--isa"))
        missing = [isa for isa in isas if isa not in available_isas() + ["scalar"]]
        if missing:
            raise SystemExit(f"--isa: this CPU cannot run {', '.join(missing)} "
                             f"(it runs {', '.join(available_isas() + ['scalar'])})")
    kv_dtypes = parse_list(args.kv_dtype, KV_DTYPES, "--kv-dtype")
    print(f"threads {args.threads}; streaming read (torch fp32 sum): "
          f"{stream_read_gbps(args.threads, args.stream_bytes):.1f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'ms':>8} {'kv_GB/s':>8} {'x_stream':>8} "
          f"{'Mtok/s':>8} {'x_torch':>8} torch_best")
    torch_times: dict[tuple[int, int], tuple[float, str]] = {}
    records = []
    for isa in isas:
        for kv_dtype in kv_dtypes:
            # avx512bf16 / avx512vnni serve one KV dtype each: the other is plain avx512.
            with CpuAttentionPool(1, isa=isa) as probe:
                name = probe.isa(torch.int8 if kv_dtype == "int8" else torch.bfloat16)
            if any(r["isa"] == name and r["kv_dtype"] == kv_dtype for r in records):
                continue
            records.append(run_kernel_set(isa, kv_dtype, args, torch_times))
    for record in records:
        print(json.dumps(record))
    if set(kv_dtypes) == set(KV_DTYPES):
        for pair in kernel_set_pairs(isas):
            print(json.dumps(int8_over_bf16(pair, args.threads, 6 if args.quick else 12)))
    reference_inputs = make_inputs(*REFERENCE_CASE, torch.bfloat16)
    with CpuAttentionPool(args.threads) as pool:
        handoff_p50, submit_p50 = handoff_latency_us(pool, 300 if args.quick else 2000)
    slowdown = launch_loop_slowdown(args.threads, reference_inputs, 2000 if args.quick else 5000)
    print(f"launch loop slowdown with the pool on {max(1, args.threads - 1)} threads: "
          f"{slowdown:.2f}x; handoff p50 {handoff_p50:.1f} us; submit p50 {submit_p50:.1f} us")
    print(json.dumps(dict(case="pool overheads", threads=args.threads,
                          best_isa=best_isa(torch.bfloat16),
                          launch_loop_slowdown=round(slowdown, 3),
                          handoff_us_p50=round(handoff_p50, 2),
                          submit_us_p50=round(submit_p50, 2))))


if __name__ == "__main__":
    main()
