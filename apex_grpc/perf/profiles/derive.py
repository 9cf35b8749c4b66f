"""Builds the shipped profiles from published hardware figures, scaled by the efficiencies
measured on the H200 machine (MEASUREMENTS.md). Run `python -m apex_grpc.perf.profiles.derive` to
regenerate the JSON files beside this script; README.md explains every number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apex_grpc.perf.perf_model import Link, ModelShape, Profile, Table1D, Table2D

# Efficiencies measured on the H200 machine (bf16, Llama-3.1-8B, see README.md).
WEIGHT_READ_EFFICIENCY = 0.61  # 15.0 GB of weights in 5.1 ms (CUDA graph, B=1) of 4.8 TB/s
MATMUL_EFFICIENCY = 0.54  # 2 * 8.0e9 * 512 FLOP in 15.5 ms (B=512) of 989 TFLOPS
GPU_ATTENTION_EFFICIENCY = 0.63  # 3.0 TB/s effective KV read of 4.8 TB/s
CPU_ATTENTION_EFFICIENCY = 0.78  # 74 GB/s attention of a 95 GB/s streaming read
LAUNCH_MS_PER_LAYER = 0.07  # eager minus CUDA-graph step (7.4 - 5.1 ms) over 32 layers
GPU_ATTENTION_LAUNCH_MS = 0.015
CPU_CALL_MS = 0.010  # pool wake-up and hand-out per call
SAMPLING_MS = 0.1

LLAMA_2_7B = ModelShape(32, 4096, 32, 32, 128, 11008, 32000)
LLAMA_31_8B = ModelShape(32, 4096, 32, 8, 128, 14336, 128256)


@dataclass(frozen=True)
class Hardware:
    device_name: str
    hbm_gb_s: float
    tflops: float  # dense fp16/bf16 tensor throughput
    pcie_gb_s: float
    pcie_latency_ms: float
    host_read_gb_s: float  # streaming read of the whole host with all cores
    cpu_threads: int  # CPU attention threads (cores minus two for the engine and the loop)
    sync_ms: float  # per-layer wait on the CPU pool (wake-up + launch of the next segment)


H200 = Hardware("NVIDIA H200", 4800, 989, 54, 0.012, 95, 14, 0.03)
T4 = Hardware("Tesla T4", 320, 65, 12, 0.02, 40, 14, 0.05)
A10 = Hardware("NVIDIA A10", 600, 125, 24, 0.015, 40, 14, 0.04)

# H200 linear work per layer measured eagerly (all 32 layers + LM head, minus the head).
H200_MEASURED_LINEAR = {1: 0.217, 64: 0.217, 128: 0.250, 256: 0.283, 512: 0.475}


def _layer_params(shape: ModelShape) -> int:
    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return (shape.hidden_size * (q_size + 2 * kv_size) + q_size * shape.hidden_size
            + 3 * shape.hidden_size * shape.intermediate_size)


def _matmul_ms(params: int, num_tokens: float, hw: Hardware, dtype_bytes: int) -> float:
    """Weight-bound or compute-bound, whichever is slower (roofline)."""
    read_ms = params * dtype_bytes / (hw.hbm_gb_s * WEIGHT_READ_EFFICIENCY * 1e6)
    compute_ms = 2 * params * num_tokens / (hw.tflops * MATMUL_EFFICIENCY * 1e9)
    return max(read_ms, compute_ms)


def derive(hw: Hardware, shape: ModelShape, dtype: str, name: str, notes: str) -> Profile:
    dtype_bytes = 2
    params = _layer_params(shape)
    tokens = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)
    linear = [_matmul_ms(params, n, hw, dtype_bytes) + LAUNCH_MS_PER_LAYER for n in tokens]
    q_size = shape.num_heads * shape.head_dim
    prompt_lens = (16, 128, 512, 1024, 2048, 4096, 8192)
    # Causal attention: 2 matmuls of n*n/2*q_size multiply-adds.
    prefill = [GPU_ATTENTION_LAUNCH_MS + 2 * n * n * q_size /
               (hw.tflops * MATMUL_EFFICIENCY * 1e9) for n in prompt_lens]
    kv_token_bytes = 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes  # one layer
    ctx = (256, 1024, 4096, 16384, 65536, 262144, 1048576)
    gpu_attention = [GPU_ATTENTION_LAUNCH_MS + c * kv_token_bytes /
                     (hw.hbm_gb_s * GPU_ATTENTION_EFFICIENCY * 1e6) for c in ctx]
    reqs = (1, 2, 4, 8, 16, 64, 256)
    cpu_gb_s = hw.host_read_gb_s * CPU_ATTENTION_EFFICIENCY
    # The pool parallelises over (request, kv head): few requests leave threads idle.
    cpu_rows = tuple(tuple(CPU_CALL_MS + c * kv_token_bytes /
                           (cpu_gb_s * min(1.0, r * shape.num_kv_heads / hw.cpu_threads) * 1e6)
                           for c in ctx) for r in reqs)
    head_params = shape.vocab_size * shape.hidden_size
    rows = (1, 16, 64, 256, 512, 1024)
    head = [_matmul_ms(head_params, r, hw, dtype_bytes) + SAMPLING_MS for r in rows]
    link = Link(hw.pcie_latency_ms, hw.pcie_gb_s)
    return Profile(shape, dtype, hw.device_name, hw.cpu_threads,
                   Table1D(tuple(map(float, tokens)), tuple(linear)),
                   Table1D(tuple(map(float, prompt_lens)), tuple(prefill)),
                   Table1D(tuple(map(float, ctx)), tuple(gpu_attention)),
                   Table2D(tuple(map(float, reqs)), tuple(map(float, ctx)), cpu_rows),
                   link, link, layer_launch_ms=0.0, layer_sync_ms=hw.sync_ms,
                   head=Table1D(tuple(map(float, rows)), tuple(head)), name=name, notes=notes)


def h200_profile() -> Profile:
    """The roofline, with T_lin replaced by the measured eager points where they exist."""
    derived = derive(H200, LLAMA_31_8B, "bfloat16", "h200-llama-3.1-8b",
                     "from MEASUREMENTS.md (H200 machine, 2026-11-26); see README.md")
    measured_max = max(H200_MEASURED_LINEAR)
    points = dict(H200_MEASURED_LINEAR)
    for n, ms in zip(derived.linear.xs, derived.linear.ms):
        if n > measured_max:
            points[int(n)] = ms
    xs = tuple(float(n) for n in sorted(points))
    linear = Table1D(xs, tuple(points[int(x)] for x in xs))
    return Profile(**{**derived.__dict__, "linear": linear})


def shipped_profiles() -> list[Profile]:
    return [
        h200_profile(),
        derive(T4, LLAMA_2_7B, "float16", "t4-llama-2-7b",
               "derived: T4 (320 GB/s, 65 TFLOPS fp16, PCIe Gen3 x16) and a 16-vCPU host "
               "(40 GB/s), scaled by H200-machine efficiencies; see README.md"),
        derive(A10, LLAMA_31_8B, "bfloat16", "a10-llama-3.1-8b",
               "derived: A10 (600 GB/s, 125 TFLOPS bf16, PCIe Gen4 x16) and a 16-vCPU host "
               "(40 GB/s), scaled by H200-machine efficiencies; see README.md"),
    ]


def main() -> None:
    for profile in shipped_profiles():
        path = Path(__file__).resolve().parent / f"{profile.name}.json"
        profile.save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
