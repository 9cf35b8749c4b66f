"""Serving benchmark for the embedded model on this machine.

Prints output tokens/s through the real gRPC server at 1 and at 16 concurrent streams, and the
engine overhead: the engine's decode step time (schedule + execute + update + outputs:
detokenize, stop checks) over the bare forward of the same batch (the runner executing the
plan: forward and sampling), measured side by side in this process. Ends with one JSON line of
its figures.

    python -m apex_grpc.bench.serving [--max-new-tokens 64] [--streams 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from apex_grpc.config import EngineConfig, Policy, ServeOptions
from apex_grpc.engine.builder import build_core, build_engine
from apex_grpc.model.loader import load_model
from apex_grpc.request import Request, SamplingParams, StoppingParams

PROMPT = "Write a long story about a lighthouse keeper who finds a map."


def engine_overhead(num_streams: int, prompt_len: int, num_steps: int, device: torch.device,
                    dtype: torch.dtype) -> dict[str, float]:
    """Median engine decode step vs the runner's execution of the same plan, alternating."""
    model, model_config, tokenizer, _ = load_model(None, "auto", device, dtype)
    config = EngineConfig(num_gpu_blocks=4096, max_num_seqs=num_streams, policy=Policy.GPU_ONLY,
                          max_model_len=2048)
    core = build_core(config, model, model_config, tokenizer, dtype, device)
    prompt = list(range(10, 10 + prompt_len))
    stopping = StoppingParams(max_new_tokens=num_steps * 3 + 8, ignore_eos=True)
    for i in range(num_streams):
        core.add_request(Request(f"r{i}", prompt, SamplingParams(), stopping))
    while any(r.is_prefilling for r in core.scheduler.requests.values()):
        core.step()
    core.step()  # warm the decode path
    step_ms, bare_ms = [], []
    for _ in range(num_steps):
        start = time.perf_counter()
        core.step()
        step_ms.append((time.perf_counter() - start) * 1e3)
        # The same batch, executed only. schedule() without update() is idempotent: the next
        # core.step() runs this plan for real; here it only rewrites the same KV slots.
        plan = core.scheduler.schedule()
        start = time.perf_counter()
        core.runner.execute(plan)  # returns sampled ids: the device has finished
        bare_ms.append((time.perf_counter() - start) * 1e3)
    step, bare = statistics.median(step_ms), statistics.median(bare_ms)
    return {"streams": num_streams, "engine_step_ms": step, "bare_forward_ms": bare,
            "engine_overhead": step / bare}


async def _stream_throughput(target: str, num_streams: int, max_new_tokens: int) -> float:
    from clients.client import AsyncApexClient

    async with AsyncApexClient(target) as client:
        async def one() -> int:
            tokens = 0
            async for delta in client.generate_stream(text=PROMPT, max_new_tokens=max_new_tokens,
                                                      ignore_eos=True, return_token_ids=True):
                tokens += len(delta.token_ids)
            return tokens

        await asyncio.gather(*(one() for _ in range(min(num_streams, 2))))  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(num_streams)))
        return sum(counts) / (time.perf_counter() - start)


def grpc_throughput(streams: list[int], max_new_tokens: int) -> dict[str, float]:
    from apex_grpc.server.app import ApexServer, ServerSettings

    async def run() -> dict[str, float]:
        opts = ServeOptions(max_num_seqs=max(streams), policy=Policy.GPU_ONLY)
        server = ApexServer(ServerSettings(port=0), lambda: build_engine(opts))
        await server.start()
        await server.load_engine()
        try:
            return {f"output_tok_s_{n}_streams":
                    await _stream_throughput(f"127.0.0.1:{server.port}", n, max_new_tokens)
                    for n in streams}
        finally:
            await server.stop()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16", help="concurrency levels, comma separated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    figures = grpc_throughput(streams, args.max_new_tokens)
    for n in streams:
        print(f"{n:3d} streams: {figures[f'output_tok_s_{n}_streams']:8.1f} output tokens/s")
    overhead = engine_overhead(max(streams), 32, args.overhead_steps, device, dtype)
    print(f"engine decode step {overhead['engine_step_ms']:.2f} ms vs bare forward "
          f"{overhead['bare_forward_ms']:.2f} ms at {overhead['streams']} streams: "
          f"overhead x{overhead['engine_overhead']:.3f}")
    figures.update(overhead)
    figures["device"] = str(device)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
