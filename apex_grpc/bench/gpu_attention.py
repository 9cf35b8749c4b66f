"""CUDA benchmark of paged decode attention at Llama-3.1-8B shapes (32 q heads, 8 kv heads,
head_dim 128, bf16 by default): the Triton kernel against the torch reference, with dense SDPA
over contiguous KV (no paging) as the ceiling. One layer; blocks shuffled as a long-running
server would leave them.

Reports effective KV read bandwidth (K and V bytes of every context token / time) and checks the
Triton output against the float32 reference before timing. Ends with one JSON line.

    python -m apex_grpc.bench.gpu_attention [--batch-sizes 1,16,64,256] [--context-lens 1024,4096]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from apex_grpc.attention.torch_ref import paged_attention_reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B attention
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def median_us(fn: Callable[[], object], iterations: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def run_case(kernels, case: DecodeCase, scale: float, iterations: int) -> dict:
    batch = case.q.shape[0]
    seq_lens_list = [case.context_len] * batch
    out = torch.empty_like(case.q)

    def triton_decode() -> None:
        kernels.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                       case.seq_lens, case.context_len, scale, out=out)

    def torch_reference() -> torch.Tensor:
        return paged_attention_reference(case.q, case.k_cache, case.v_cache, case.block_tables,
                                         seq_lens_list, [1] * batch, scale)

    k_dense, v_dense = dense_kv(case)
    q_dense = case.q.unsqueeze(2)  # [batch, num_heads, 1, d]

    def sdpa_dense() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q_dense, k_dense, v_dense, scale=scale, enable_gqa=True)

    triton_decode()
    expected = paged_attention_reference(case.q.float(), case.k_cache.float(),
                                         case.v_cache.float(), case.block_tables,
                                         seq_lens_list, [1] * batch, scale)
    rel_err = ((out.float() - expected).norm() / expected.norm()).item()
    if not rel_err < 2e-2:
        raise RuntimeError(f"Triton decode is wrong at batch {batch}, context "
                           f"{case.context_len}: relative error {rel_err:.3e}")
    result = {"batch": batch, "context_len": case.context_len, "rel_err": rel_err,
              "num_splits": kernels.plan_decode_splits(batch, NUM_KV_HEADS, case.context_len,
                                                       case.q.device)[1]}
    timed = (("triton", triton_decode, iterations), ("sdpa_dense", sdpa_dense, iterations),
             ("torch_ref", torch_reference, max(3, iterations // 10)))
    for name, fn, count in timed:
        micros = median_us(fn, count)
        result[f"{name}_us"] = round(micros, 2)
        result[f"{name}_kv_tb_s"] = round(case.kv_bytes / micros / 1e6, 3)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--context-lens", default="1024,4096")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--watchdog-s", type=float, default=300.0,
                        help="abort with a traceback if the run hangs this long")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_attention: this benchmark needs a CUDA device; none is available here")
    try:
        from apex_grpc.attention import triton_paged
    except ImportError as error:
        sys.exit(f"gpu_attention: triton is needed for the kernels under test ({error})")
    faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    scale = HEAD_DIM ** -0.5
    results = []
    for context_len in (int(n) for n in args.context_lens.split(",")):
        for batch in (int(n) for n in args.batch_sizes.split(",")):
            case = build_case(batch, context_len, args.block_size, dtype, device)
            result = run_case(triton_paged, case, scale, args.iterations)
            print(f"batch {batch:4d} context {context_len:6d}: triton {result['triton_us']:9.1f} "
                  f"us {result['triton_kv_tb_s']:6.3f} TB/s | sdpa dense "
                  f"{result['sdpa_dense_kv_tb_s']:6.3f} TB/s | torch ref "
                  f"{result['torch_ref_kv_tb_s']:6.3f} TB/s | rel err {result['rel_err']:.1e}",
                  flush=True)
            results.append(result)
            del case
            torch.cuda.empty_cache()
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"bench": "gpu_decode_attention", "device": torch.cuda.get_device_name(),
                      "dtype": args.dtype, "block_size": args.block_size,
                      "num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
                      "head_dim": HEAD_DIM, "results": results}))


if __name__ == "__main__":
    main()
