"""CUDA benchmark of paged decode attention at Llama-3.1-8B shapes (32 q heads, 8 kv heads,
head_dim 128, bf16 by default), timed inside CUDA graphs as a graphed decode step runs it.

Per (batch, context) case, one layer, blocks shuffled as a long-running server leaves them:
- the Triton paged decode kernel single-pass (num_splits=1, one program per sequence and kv
  head), split-KV with the split count serving picks (triton_paged.choose_num_splits), and every
  other split count of a sweep, to check that choice;
- dense SDPA over the same context gathered into contiguous [batch, kv_heads, context, d]: the
  reference the paged kernel should stay within 1.5x of.
Each variant is captured as one CUDA graph of calls cycling over enough copies of the KV that
they hold 4x the L2 cache (in a model step each layer's KV is cold), and timed with CUDA events
over graph replays (median per call), so no launch overhead is counted. Outputs are checked
against a float32 reference first. One JSON line per case (ratios to SDPA included).

    python -m apex_grpc.bench.gpu_attention [--batch-sizes 1,4,16] [--context-lens 512,2048,8192]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from apex_grpc.attention.torch_ref import paged_attention_reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B attention
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TARGET_RATIO = 1.5  # paged decode time / dense SDPA time, batch 1-16 (issue 15)
SWEEP_SPLITS = (2, 4, 8, 16, 32, 64)
MAX_KV_COPIES = 64
DEFAULT_L2_BYTES = 50 << 20  # H100/H200, if torch does not report it


@dataclass
class DecodeCase:
    q: torch.Tensor  # [batch, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [batch, blocks_per_seq] int32, shuffled block ids
    seq_lens: torch.Tensor  # [batch] int32
    context_len: int

    @property
    def kv_bytes(self) -> int:
        num_tokens = self.q.shape[0] * self.context_len
        return 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM * self.k_cache.element_size()


def build_case(batch: int, context_len: int, block_size: int, dtype: torch.dtype,
               device: torch.device) -> DecodeCase:
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, NUM_KV_HEADS, block_size, HEAD_DIM)
    order = torch.randperm(num_blocks, device=device).to(torch.int32)
    return DecodeCase(
        q=torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device, dtype=dtype),
        k_cache=torch.randn(shape, device=device, dtype=dtype),
        v_cache=torch.randn(shape, device=device, dtype=dtype),
        block_tables=order.view(batch, blocks_per_seq),
        seq_lens=torch.full((batch,), context_len, dtype=torch.int32, device=device),
        context_len=context_len)


def dense_kv(case: DecodeCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The same context gathered once into contiguous [batch, num_kv_heads, context_len, d]."""
    def gather(cache: torch.Tensor) -> torch.Tensor:
        blocks = cache[case.block_tables.long()]  # [batch, blocks, kv_heads, block_size, d]
        dense = blocks.permute(0, 2, 1, 3, 4).flatten(2, 3)
        return dense[:, :, :case.context_len].contiguous()
    return gather(case.k_cache), gather(case.v_cache)


def sdpa_dense(q: torch.Tensor, k_dense: torch.Tensor, v_dense: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Decode attention of q [batch, heads, d] over contiguous k/v [batch, kv_heads, context,
    d]; [batch, heads, d] like the paged kernel's output."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k_dense, v_dense, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def kv_copies(kv_bytes: int, l2_bytes: int, l2_factor: float) -> int:
    """Copies of one case's KV so that a graph cycling over them reads l2_factor x L2 (1 copy
    for l2_factor 0: the L2-hot figure)."""
    return max(1, min(MAX_KV_COPIES, math.ceil(l2_factor * l2_bytes / kv_bytes)))


def graph_us_per_call(calls: list[Callable[[], object]], replays: int) -> float:
    """Median time per call of one CUDA graph holding every call once, over `replays` replays.
    The calls run once eagerly first (on a side stream, as capture requires) to compile."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / len(calls))
    del graph
    return statistics.median(times)


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected).norm() / expected.norm()).item()


def run_case(kernels, cases: list[DecodeCase], scale: float, replays: int) -> dict:
    """Times every variant over `cases` (copies of one shape); checks them on cases[0]."""
    case = cases[0]
    batch, context_len = case.q.shape[0], case.context_len
    dense = [dense_kv(c) for c in cases]
    outs = [torch.empty_like(c.q) for c in cases]

    def paged_calls(num_splits: int) -> list[Callable[[], object]]:
        return [lambda c=c, o=o: kernels.paged_decode_attention(
                    c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens, context_len, scale,
                    out=o, num_splits=num_splits)
                for c, o in zip(cases, outs)]

    expected = paged_attention_reference(case.q.float(), case.k_cache.float(),
                                         case.v_cache.float(), case.block_tables,
                                         [context_len] * batch, [1] * batch, scale)
    chosen = kernels.plan_decode_splits(batch, NUM_KV_HEADS, context_len, case.q.device)
    sweep = sorted({kernels.plan_decode_splits(batch, NUM_KV_HEADS, context_len,
                                               case.q.device, s) for s in SWEEP_SPLITS}
                   | {1, chosen})
    result = {"bench": "gpu_decode_attention", "batch": batch, "context_len": context_len,
              "num_splits": chosen, "kv_copies": len(cases)}
    errors = {"sdpa": _relative_error(sdpa_dense(case.q, *dense[0], scale), expected)}
    timed = {}
    for num_splits in sweep:
        calls = paged_calls(num_splits)
        calls[0]()
        errors[f"splits_{num_splits}"] = _relative_error(outs[0], expected)
        timed[num_splits] = graph_us_per_call(calls, replays)
    bad = {name: err for name, err in errors.items() if not err < 2e-2}
    if bad:
        raise RuntimeError(f"wrong output at batch {batch}, context {context_len}: relative "
                           f"errors {bad}")
    sdpa_us = graph_us_per_call([lambda c=c, kv=kv: sdpa_dense(c.q, *kv, scale)
                                 for c, kv in zip(cases, dense)], replays)
    best = min(timed, key=timed.get)
    result.update({
        "sdpa_us": round(sdpa_us, 2), "paged_single_us": round(timed[1], 2),
        "paged_split_us": round(timed[chosen], 2), "best_num_splits": best,
        "best_split_us": round(timed[best], 2),
        "single_over_sdpa": round(timed[1] / sdpa_us, 3),
        "split_over_sdpa": round(timed[chosen] / sdpa_us, 3),
        "target_ratio": TARGET_RATIO, "within_target": timed[chosen] / sdpa_us <= TARGET_RATIO,
        "split_kv_tb_s": round(case.kv_bytes / timed[chosen] / 1e6, 3),
        "sdpa_kv_tb_s": round(case.kv_bytes / sdpa_us / 1e6, 3),
        "sweep_us": {str(s): round(us, 2) for s, us in timed.items()},
        "max_rel_err": float(f"{max(errors.values()):.2e}")})
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--context-lens", default="512,2048,8192")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--replays", type=int, default=20, help="graph replays per variant")
    parser.add_argument("--l2-factor", type=float, default=4.0,
                        help="KV copies cycled per graph hold this many L2 caches (0: one "
                             "copy, L2-hot)")
    parser.add_argument("--watchdog-s", type=float, default=110.0,
                        help="abort with a traceback if the run hangs this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_attention: this benchmark needs a CUDA device; none is available here "
                 "(nothing measured)")
    try:
        from apex_grpc.attention import triton_paged
    except ImportError as error:
        sys.exit(f"gpu_attention: triton is needed for the kernels under test ({error})")
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    try:
        run_cases(triton_paged, args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_cases(kernels, args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    scale = HEAD_DIM ** -0.5
    properties = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(properties, "L2_cache_size", 0) or DEFAULT_L2_BYTES
    for context_len in (int(n) for n in args.context_lens.split(",")):
        for batch in (int(n) for n in args.batch_sizes.split(",")):
            first = build_case(batch, context_len, args.block_size, dtype, device)
            count = kv_copies(first.kv_bytes, l2_bytes, args.l2_factor)
            cases = [first] + [build_case(batch, context_len, args.block_size, dtype, device)
                               for _ in range(count - 1)]
            result = run_case(kernels, cases, scale, args.replays)
            result.update({"device": properties.name, "dtype": args.dtype,
                           "block_size": args.block_size})
            print(f"# batch {batch:3d} context {context_len:5d}: sdpa {result['sdpa_us']:7.1f} "
                  f"us | paged single {result['paged_single_us']:7.1f} us "
                  f"({result['single_over_sdpa']:.2f}x) | split x{result['num_splits']} "
                  f"{result['paged_split_us']:7.1f} us ({result['split_over_sdpa']:.2f}x) | "
                  f"best x{result['best_num_splits']} {result['best_split_us']:.1f} us",
                  flush=True)
            print(json.dumps(result), flush=True)
            del cases, first
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
