"""Decode-step speed against its floor: graphed and eager steps side by side in one process.

    python -m apex_grpc.bench.decode_step      # CUDA: Llama-3.1-8B shapes, dummy weights, bf16
    python -m apex_grpc.bench.decode_step --dummy-config smollm2-135m --batch-sizes 1,2 \\
        --steps 3                              # a CPU smoke run

Per batch size B (GPU-resident decodes, --ctx tokens of context each), the medians of:
- step_ms_graphed: runner.execute of the plan on an engine with CUDA-graph decode buckets
  (inputs copied into the static buffers, the bucket's graph replayed, sampling);
- replay_ms: that bucket's graph replay alone;
- step_ms_eager: the same plan on an eager engine (--enforce-eager);
- floor_ms: the step's linear work alone (QKV, O, gate|up and down projections of every layer
  on B rows, then the LM head), captured as one CUDA graph and replayed: what no engine can go
  under without touching the weights less;
and the ratios graphed/floor and eager/graphed. Then the hybrid pair on the graphed engine:
G GPU rows alone against G GPU + C host rows under ASYNC_OVERLAP (--hybrid-ctx context each),
as tokens/s. The plans take turns step by step (bench/hybrid.py, time_plans), so a drift in the
machine hits them alike. Without CUDA nothing is captured: "graphed" is the padded fixed-buffer
path run eagerly and the floor is timed eagerly; only CUDA figures answer the question.
One JSON line at the end.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from apex_grpc.bench.hybrid import (BLOCK_SIZE, bench_core, decode_plan, load_bench_model,
                                    step_bench_parser, time_plans)
from apex_grpc.config import Policy
from apex_grpc.model.llama import LlamaForCausalLM
from apex_grpc.platform import synchronize
from apex_grpc.scheduler.plan import Strategy


def _linear_work(model: LlamaForCausalLM, batch: int):
    """A callable running the decode step's linear layers on `batch` rows (fixed buffers)."""
    config = model.config
    hidden = torch.randn(batch, config.hidden_size, dtype=model.dtype, device=model.device)
    attention = torch.randn(batch, config.q_size, dtype=model.dtype, device=model.device)

    def run() -> torch.Tensor:
        x = hidden
        for layer in model.layers:
            layer.qkv_proj(x)
            x = layer.o_proj(attention)
            gate_up = layer.mlp.gate_up_proj(x)
            x = layer.mlp.down_proj(gate_up[:, :layer.mlp.intermediate_size])
        return model.compute_logits(x)

    return run


def _median_ms(run, repeats: int, device: torch.device) -> float:
    """Median wall time of run() (synchronised each time), after one warm-up call."""
    run()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def floor_ms(model: LlamaForCausalLM, batch: int, repeats: int) -> float:
    """The linear work of one decode step, replayed as one CUDA graph (eagerly on a CPU)."""
    run = _linear_work(model, batch)
    if model.device.type != "cuda":
        return _median_ms(run, repeats, model.device)
    run()  # warm-up outside the capture: cuBLAS picks its kernels
    torch.cuda.synchronize(model.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return _median_ms(graph.replay, repeats, model.device)


def main(argv: list[str] | None = None) -> int:
    parser = step_bench_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--ctx", type=int, default=256, help="context of the batch sweep")
    parser.add_argument("--gpu-rows", type=int, default=2)
    parser.add_argument("--host-rows", type=int, default=6)
    parser.add_argument("--hybrid-ctx", type=int, default=900)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model, cfg, tok, config = load_bench_model(args)
    device, dtype = model.device, model.dtype

    def blocks(rows: int, ctx: int) -> int:
        return rows * -(-(ctx + 1) // BLOCK_SIZE)

    largest = max(batch_sizes + [args.gpu_rows + args.host_rows])
    sizes = dict(policy=Policy.APEX, max_num_seqs=largest,
                 num_gpu_blocks=max(blocks(max(batch_sizes), args.ctx),
                                    blocks(args.gpu_rows, args.hybrid_ctx)),
                 num_host_blocks=blocks(args.host_rows, args.hybrid_ctx))
    graphed = bench_core(model, cfg, tok, dtype, device, args.threads,
                         cuda_graph_max_batch=largest, **sizes)
    eager = bench_core(model, cfg, tok, dtype, device, args.threads, **sizes)
    graphs = graphed.runner.decode_graphs
    figures: dict[str, object] = {"device": str(device), "config": config, "ctx": args.ctx,
                                  "captured": graphs.captured}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    for batch in batch_sizes:
        plan = decode_plan(batch, 0, args.ctx, Strategy.GPU_ONLY)
        samples = {"graphed": [], "eager": []}
        for _ in range(args.steps + 2):  # taking turns; the first two rounds warm up
            for name, core in (("graphed", graphed), ("eager", eager)):
                start = time.perf_counter()
                core.runner.execute(plan)
                synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
        step_graphed = statistics.median(samples["graphed"][2:])
        step_eager = statistics.median(samples["eager"][2:])
        row = {"step_ms_graphed": step_graphed, "step_ms_eager": step_eager,
               "floor_ms": floor_ms(model, batch, args.steps)}
        bucket = graphs.bucket_for(plan)
        if graphs.captured:
            row["replay_ms"] = _median_ms(graphs.graph(bucket).replay, args.steps, device)
        row["graphed_over_floor"] = step_graphed / row["floor_ms"]
        row["eager_over_graphed"] = step_eager / step_graphed
        figures[f"B{batch}"] = row
        print(f"B={batch}: graphed {step_graphed:.2f} ms, eager {step_eager:.2f} ms, floor "
              f"{row['floor_ms']:.2f} ms (graphed/floor x{row['graphed_over_floor']:.2f}, "
              f"eager/graphed x{row['eager_over_graphed']:.2f})")
    g, c, ctx = args.gpu_rows, args.host_rows, args.hybrid_ctx
    ms = {name: statistics.median(times) for name, times in time_plans(graphed, {
        "gpu": decode_plan(g, 0, ctx, Strategy.GPU_ONLY),
        "overlap": decode_plan(g, c, ctx, Strategy.ASYNC_OVERLAP)}, args.steps).items()}
    figures["hybrid"] = {"ctx": ctx, f"step_ms_G{g}": ms["gpu"],
                         f"step_ms_G{g}_plus_C{c}": ms["overlap"],
                         "tok_s_ratio": (g + c) / ms["overlap"] / (g / ms["gpu"])}
    print(f"graphed G={g}: {ms['gpu']:.2f} ms; graphed G+C={g}+{c} (ctx {ctx}): "
          f"{ms['overlap']:.2f} ms; tokens/s x{figures['hybrid']['tok_s_ratio']:.2f}")
    graphed.close()
    eager.close()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
