"""Greedy decoding speed of a model through TorchPagedAttention (no server, no scheduler).

    python -m apex_grpc.bench.model_decode [--model PATH] [--batch-sizes 1,4] [--new-tokens 64]

Loads the embedded SmolLM2 GGUF by default, prefills one chat prompt per sequence, then times
batched greedy decode steps. Prints one line per batch size and, last, one JSON line with all
figures. Numbers describe this machine only (see MEASUREMENTS.md for how claims are made).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from apex_grpc.model.greedy import GreedyGenerator
from apex_grpc.model.loader import load_model
from apex_grpc.platform import device_name, resolve_device, resolve_dtype

QUESTIONS = ["Write a short story about a lighthouse keeper.",
             "Explain how a bicycle gear works.",
             "List five facts about the Moon.",
             "Describe a walk through a forest in autumn."]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(tokenizer, batch_size: int, vocab_size: int) -> list[list[int]]:
    if tokenizer is None or not tokenizer.has_chat_template:
        return [[(7 * i + j) % vocab_size for j in range(32)] for i in range(batch_size)]
    return [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]), add_special_tokens=False)
        for i in range(batch_size)]


def bench_batch(model, tokenizer, batch_size: int, new_tokens: int) -> dict[str, float]:
    prompts = _prompts(tokenizer, batch_size, model.config.vocab_size)
    generator = GreedyGenerator(model, batch_size, max(map(len, prompts)) + new_tokens)
    start = time.perf_counter()
    last = [int(generator.prefill(i, p)[-1].argmax()) for i, p in enumerate(prompts)]
    _synchronize(model.device)
    prefill_s = time.perf_counter() - start
    seqs = list(range(batch_size))
    start = time.perf_counter()
    for _ in range(new_tokens):
        # Greedy ids feed the next step; EOS is ignored so every step has the full batch.
        last = generator.step(seqs, [[t] for t in last]).argmax(-1).tolist()
    _synchronize(model.device)
    decode_s = time.perf_counter() - start
    return {"batch_size": batch_size, "prompt_tokens": sum(map(len, prompts)),
            "prefill_ms": 1000 * prefill_s, "decode_step_ms": 1000 * decode_s / new_tokens,
            "decode_tokens_per_s": batch_size * new_tokens / decode_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--dummy-config", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    model, _, tokenizer, name = load_model(args.model, args.load_format, device, dtype,
                                           args.dummy_config)
    load_s = time.perf_counter() - start
    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        bench_batch(model, tokenizer, batch_size, 4)  # warm-up (allocator, kernels)
        result = bench_batch(model, tokenizer, batch_size, args.new_tokens)
        results.append(result)
        print(f"batch {batch_size}: {result['decode_tokens_per_s']:.1f} tok/s, "
              f"{result['decode_step_ms']:.2f} ms/step, prefill {result['prefill_ms']:.0f} ms",
              flush=True)
    print(json.dumps({"bench": "model_decode", "model": name, "device": device_name(device),
                      "dtype": str(dtype).removeprefix("torch."),
                      "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
                      "new_tokens": args.new_tokens,
                      "results": [{k: round(v, 3) if isinstance(v, float) else v
                                   for k, v in r.items()} for r in results]}))


if __name__ == "__main__":
    main()
