"""Hybrid execution benchmark: the runtime's hand-off cost and decode throughput of GPU-only
versus hybrid execution, measured side by side in one process.

Figures (one JSON line at the end):
- handoff_us_p50: stage a layer's host rows -> native job runs -> done flag seen (on CUDA: ->
  output back on the device), through the real host side (HostAttention) (tiny job), median over
  many layers; engine_us_per_layer: what the engine thread spends in those calls.
- overhead_us_per_layer: (decode step with G GPU rows + 1 host row of tiny context) minus
  (G GPU rows alone), per layer: the hybrid runtime's fixed cost (the median of the
  differences of steps run back to back).
- tok_s_*: decode tokens/s of G GPU-resident rows alone (GPU_ONLY), and of G GPU-resident + C
  host-resident rows (context ctx each) under ASYNC_OVERLAP and ASYMMETRIC_PIPELINE; the runner
  executes fixed decode plans, so the three are measured on identical batches.
- split_ms_per_layer: linear+GPU attention (from the GPU-only step), the host rows' copies and
  CPU attention measured alone, and what the overlap left over.
- workload: a decode-heavy load under a small GPU KV budget, output tokens/s for
  --policy gpu-only and for apex with forced host placement and with auto placement.

    python -m apex_grpc.bench.hybrid                 # CUDA: Llama-3.1-8B shapes, dummy weights
    python -m apex_grpc.bench.hybrid --dummy-config PATH --ctx 128   # smaller, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from apex_grpc.attention.layout import make_layout
from apex_grpc.config import CUDA_LAYER_WAITS, EngineConfig, KVPlacement, Policy, ServeOptions
from apex_grpc.engine.builder import build_core
from apex_grpc.engine.core import EngineCore
from apex_grpc.engine.offline import run_to_completion
from apex_grpc.model.loader import load_model
from apex_grpc.platform import default_cpu_attention_threads, share_cores_with_pool, synchronize
from apex_grpc.request import SamplingParams, StoppingParams, Tier
from apex_grpc.runner.input_batch import paged_batch_of
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy

BLOCK_SIZE = 16


def bench_core(model, cfg, tok, dtype, device, threads: int,
               cuda_layer_wait: str = CUDA_LAYER_WAITS[0],
               cuda_graph_max_batch: int | None = None, **overrides) -> EngineCore:
    """An engine core for step benchmarks; with cuda_graph_max_batch its decode buckets are
    captured as CUDA graphs on CUDA (run eagerly over their fixed buffers elsewhere)."""
    fields = dict(block_size=BLOCK_SIZE, num_gpu_blocks=4096, num_host_blocks=4096,
                  max_num_seqs=64, max_batched_tokens=4096, max_model_len=8192,
                  cpu_attention_threads=threads)
    fields.update(overrides)
    core = build_core(EngineConfig(**fields), model, cfg, tok, dtype, device,
                      cuda_layer_wait=cuda_layer_wait, cuda_graph_max_batch=cuda_graph_max_batch)
    if cuda_graph_max_batch is not None and device.type == "cuda":
        core.runner.capture_decode_graphs()
    return core


def decode_plan(num_gpu: int, num_host: int, ctx: int, strategy: Strategy) -> StepPlan:
    """One decode step: num_gpu GPU-resident and num_host host-resident rows of ctx context."""
    blocks = -(-(ctx + 1) // BLOCK_SIZE)

    def seqs(prefix: str, count: int, tier: Tier) -> tuple[ScheduledSeq, ...]:
        return tuple(ScheduledSeq(f"{prefix}{i}", (7,), ctx,
                                  tuple(range(i * blocks, (i + 1) * blocks)), tier, True)
                     for i in range(count))

    return StepPlan(strategy, seqs("g", num_gpu, Tier.GPU), (), seqs("h", num_host, Tier.HOST),
                    ())


def time_plans(core: EngineCore, plans: dict[str, StepPlan], num_steps: int
               ) -> dict[str, list[float]]:
    """Times (ms) of executing each plan (forward + sampling), num_steps each after two warm-up
    rounds. The plans take turns step by step, so a drift in the machine's speed (clocks,
    other load) hits them all alike and sample i of each plan is comparable. Re-running a plan
    rewrites the same KV slots, so the cache stays the same size."""
    times: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(num_steps + 2):
        for name, plan in plans.items():
            start = time.perf_counter()
            core.runner.execute(plan)
            synchronize(core.device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: samples[2:] for name, samples in times.items()}


def gpu_vs_hybrid(core: EngineCore, num_gpu: int, num_host: int, ctx: int,
                  num_steps: int) -> dict[str, float]:
    layers = core.runner.host.num_layers
    samples = time_plans(core, {
        "gpu": decode_plan(num_gpu, 0, ctx, Strategy.GPU_ONLY),
        "overlap": decode_plan(num_gpu, num_host, ctx, Strategy.ASYNC_OVERLAP),
        "pipeline": decode_plan(num_gpu, num_host, ctx, Strategy.ASYMMETRIC_PIPELINE),
        # The runtime's fixed cost: one host row of tiny context.
        "tiny": decode_plan(num_gpu, 1, 1, Strategy.ASYNC_OVERLAP)}, num_steps)
    ms = {name: statistics.median(times) for name, times in samples.items()}
    # Paired: each tiny step against the GPU-only step of the same round.
    tiny_minus_gpu = statistics.median(t - g for t, g in zip(samples["tiny"], samples["gpu"]))
    rows = num_gpu + num_host
    return {
        "gpu_only_step_ms": ms["gpu"], "async_overlap_step_ms": ms["overlap"],
        "asymmetric_pipeline_step_ms": ms["pipeline"],
        f"tok_s_gpu_only_G{num_gpu}": num_gpu / ms["gpu"] * 1e3,
        f"tok_s_async_overlap_G{num_gpu}_plus_C{num_host}": rows / ms["overlap"] * 1e3,
        f"tok_s_asymmetric_pipeline_G{num_gpu}_plus_C{num_host}": rows / ms["pipeline"] * 1e3,
        "async_overlap_over_gpu_only": rows / ms["overlap"] / (num_gpu / ms["gpu"]),
        "overhead_us_per_layer": tiny_minus_gpu * 1e3 / layers,
    }


def handoff_figures(core: EngineCore, iterations: int) -> dict[str, object]:
    """Through the real host side (HostAttention) with a one-row, one-token host job:
    handoff_us_p50, the median stage -> done flag time per layer (on CUDA until the output is
    back on the device); and what the engine thread itself spends per layer: the stage and
    fetch calls (unless the engine thread waits, fetch only enqueues) and begin/end of step."""
    host_side = core.runner.host
    host = paged_batch_of(decode_plan(0, 1, 0, Strategy.ASYNC_OVERLAP).host_decode_seqs, 0,
                            BLOCK_SIZE, torch.device("cpu"))
    q, k, v, out = _host_rows(core, 1)
    layers = host_side.num_layers
    handoff, stage, fetch, begin_end = [], [], [], []
    for _ in range(max(1, iterations // layers)):
        start = time.perf_counter()
        host_side.begin_step(make_layout(host_decode=host))
        step_start = time.perf_counter()
        for layer in range(layers):
            staged = time.perf_counter()
            host_side.stage(layer, q, k, v, 0)
            fetched = time.perf_counter()
            host_side.fetch(layer, out, 0)
            returned = time.perf_counter()
            synchronize(core.device)  # on CUDA: until the output has landed on the device
            handoff.append((time.perf_counter() - staged) * 1e6)
            stage.append((fetched - staged) * 1e6)
            fetch.append((returned - fetched) * 1e6)
        end = time.perf_counter()
        host_side.end_step()
        begin_end.append(((step_start - start) + (time.perf_counter() - end)) * 1e6 / layers)
    return {"handoff_us_p50": statistics.median(handoff),
            "engine_us_per_layer": {"stage_call": statistics.median(stage),
                                    "fetch_call": statistics.median(fetch),
                                    "begin_and_end_step": statistics.median(begin_end)}}


def _host_rows(core: EngineCore, num_rows: int) -> tuple[torch.Tensor, ...]:
    """Zero q, k, v of num_rows rows, laid out as the model's projection leaves them, and an
    attention output buffer for them."""
    host_side = core.runner.host
    heads = (host_side.num_heads, host_side.num_kv_heads, host_side.num_kv_heads)
    qkv = torch.zeros((num_rows, sum(heads), host_side.head_dim),
                      dtype=host_side.row_dtype, device=core.device)
    out = torch.empty((num_rows, host_side.num_heads, host_side.head_dim), dtype=qkv.dtype,
                      device=core.device)
    return (*qkv.split(heads, dim=1), out)


def split_per_layer(core: EngineCore, num_host: int, ctx: int,
                    figures: dict[str, float]) -> dict[str, float]:
    """Per-layer split of the ASYNC_OVERLAP step: the host rows' copies down and their CPU
    attention (with the upload) measured alone, the rest from the step times."""
    host_side = core.runner.host
    layers = host_side.num_layers
    host = paged_batch_of(decode_plan(0, num_host, ctx, Strategy.ASYNC_OVERLAP)
                            .host_decode_seqs, 0, BLOCK_SIZE, torch.device("cpu"))
    q, k, v, out = _host_rows(core, num_host)
    copies, cpu = [], []
    for _ in range(3):
        host_side.begin_step(make_layout(host_decode=host))
        for layer in range(layers):
            start = time.perf_counter()
            host_side.stage(layer, q, k, v, 0)
            synchronize(core.device)
            staged = time.perf_counter()
            host_side.fetch(layer, out, 0)
            synchronize(core.device)
            copies.append((staged - start) * 1e3)
            cpu.append((time.perf_counter() - staged) * 1e3)
        host_side.end_step()
    gpu_layer = figures["gpu_only_step_ms"] / layers
    hybrid_layer = figures["async_overlap_step_ms"] / layers
    copy_ms, cpu_ms = statistics.median(copies), statistics.median(cpu)
    return {"linear_and_gpu_attention": gpu_layer, "copies_down": copy_ms,
            "cpu_attention_and_upload": cpu_ms, "hybrid_layer": hybrid_layer,
            # What the overlap did not hide, beyond the CPU path itself.
            "wait_beyond_cpu_path": hybrid_layer - gpu_layer - copy_ms - cpu_ms}


def workload(model, cfg, tok, dtype, device, threads, gpu_kv_tokens: int, num_requests: int,
             input_len: int, output_len: int, cuda_layer_wait: str) -> dict[str, float]:
    """Decode-heavy load under a small GPU KV budget: output tokens/s per configuration."""
    prompts = {f"w{i}": [7 + (i * 31 + j) % 200 for j in range(input_len)]
               for i in range(num_requests)}
    stopping = StoppingParams(max_new_tokens=output_len, ignore_eos=True)
    figures = {}
    for label, overrides in (
            ("gpu_only", dict(policy=Policy.GPU_ONLY, num_host_blocks=0)),
            ("apex_host", dict(policy=Policy.APEX, kv_placement=KVPlacement.HOST)),
            ("apex_auto", dict(policy=Policy.APEX))):
        core = bench_core(model, cfg, tok, dtype, device, threads, cuda_layer_wait,
                          num_gpu_blocks=max(2, gpu_kv_tokens // BLOCK_SIZE), **overrides)
        start = time.perf_counter()
        results = run_to_completion(core, prompts, SamplingParams(), stopping)
        synchronize(device)
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results.values())
        figures[f"workload_tok_s_{label}"] = tokens / elapsed
    figures["workload_apex_host_over_gpu_only"] = \
        figures["workload_tok_s_apex_host"] / figures["workload_tok_s_gpu_only"]
    return figures


def step_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every step benchmark shares: the dummy model, the device, the CPU pool."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dummy-config", default=None,
                        help="config name or path (default: llama-3.1-8b on CUDA, "
                             "smollm2-135m on the CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=default_cpu_attention_threads())
    return parser


def load_bench_model(args: argparse.Namespace):
    """(model, model config, tokenizer, config name) of step_bench_parser's flags: dummy
    weights, bf16 on CUDA, float32 on the CPU; the CPU pool's cores set aside."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = args.dummy_config or ("llama-3.1-8b" if device.type == "cuda" else "smollm2-135m")
    share_cores_with_pool(device, args.threads)
    model, cfg, tok, _ = load_model(None, "dummy", device, dtype, dummy_config=config)
    return model, cfg, tok, config


def main(argv: list[str] | None = None) -> int:
    parser = step_bench_parser(__doc__)
    parser.add_argument("--gpu-rows", type=int, default=2)
    parser.add_argument("--host-rows", type=int, default=6)
    parser.add_argument("--ctx", type=int, default=900)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workload-requests", type=int, default=16)
    parser.add_argument("--workload-input", type=int, default=512)
    parser.add_argument("--workload-output", type=int, default=128)
    parser.add_argument("--workload-gpu-kv-tokens", type=int, default=2048)
    parser.add_argument("--skip-workload", action="store_true")
    parser.add_argument("--cuda-layer-wait", choices=CUDA_LAYER_WAITS,
                        default=ServeOptions.cuda_layer_wait)
    args = parser.parse_args(argv)
    model, cfg, tok, config = load_bench_model(args)
    device, dtype = model.device, model.dtype
    blocks = -(-(args.ctx + 1) // BLOCK_SIZE)
    core = bench_core(model, cfg, tok, dtype, device, args.threads,
                 cuda_layer_wait=args.cuda_layer_wait, policy=Policy.APEX,
                 num_gpu_blocks=max(args.gpu_rows, 1) * blocks,
                 num_host_blocks=max(args.host_rows, 1) * blocks)
    figures: dict[str, object] = {"device": str(device), "config": config,
                                  "threads": args.threads,
                                  # "auto" resolved; without CUDA the engine thread waits
                                  "cuda_layer_wait": core.runner.host.layer_wait}
    figures.update(handoff_figures(core, 2000))
    print(f"hand-off (stage -> done flag) p50: {figures['handoff_us_p50']:.1f} us; engine "
          f"thread per layer (us): {json.dumps(figures['engine_us_per_layer'])}")
    figures.update(gpu_vs_hybrid(core, args.gpu_rows, args.host_rows, args.ctx, args.steps))
    print(f"G={args.gpu_rows}: {figures['gpu_only_step_ms']:.2f} ms/step; "
          f"G+C={args.gpu_rows}+{args.host_rows} (ctx {args.ctx}): overlap "
          f"{figures['async_overlap_step_ms']:.2f} ms/step (tokens/s x"
          f"{figures['async_overlap_over_gpu_only']:.2f}), pipeline "
          f"{figures['asymmetric_pipeline_step_ms']:.2f} ms/step; runtime overhead "
          f"{figures['overhead_us_per_layer']:.1f} us/layer")
    figures["split_ms_per_layer"] = split_per_layer(core, args.host_rows, args.ctx, figures)
    print("per-layer split (ms):", json.dumps(figures["split_ms_per_layer"]))
    if not args.skip_workload:
        figures.update(workload(model, cfg, tok, dtype, device, args.threads,
                                args.workload_gpu_kv_tokens, args.workload_requests,
                                args.workload_input, args.workload_output,
                                args.cuda_layer_wait))
        print(f"workload (GPU KV {args.workload_gpu_kv_tokens} tokens): apex-host / gpu-only "
              f"x{figures['workload_apex_host_over_gpu_only']:.2f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
