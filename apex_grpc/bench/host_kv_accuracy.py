"""Accuracy of the 8-bit host KV tier: python -m apex_grpc.bench.host_kv_accuracy.

Runs SmolLM2-135M (the embedded GGUF) with every token's KV in the host tier, once per host KV
dtype (auto: the model's dtype; int8), through the serving paths: a host-bound prefill writes
the first tokens (quantizing into an int8 tier), then each decode step runs the native kernel
with its fused append (quantizing the new token) over the host tier. Reports
- the mean negative log-likelihood of a fixed text (bench/data/host_kv_text.md, a frozen copy
  of the design notes, ~2,000+ tokens) under teacher forcing, and its ratio to auto's;
- greedy continuations of 9 chat prompts (the France question first): tokens that agree with
  auto's at the same positions, and the texts.
Ends with one JSON line. Numbers from one machine; float32 weights take ~6-10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.attention.host import HostAttention
from apex_grpc.attention.layout import (BatchLayout, contiguous_block_ids, host_prefill_batch,
                                        make_layout, paged_batch)
from apex_grpc.attention.torch_ref import TorchPagedAttention
from apex_grpc.config import HostKVDtype
from apex_grpc.kv_cache.quantized import resolve_host_kv_dtype
from apex_grpc.model.loader import embedded_gguf_path, load_model
from apex_grpc.runner.executors.async_overlap import AsyncOverlapExecutor
from apex_grpc.runner.executors.gpu_only import GpuOnlyExecutor
from apex_grpc.runner.input_batch import InputBatch

TEXT_PATH = Path(__file__).with_name("data") / "host_kv_text.md"
PROMPTS = ["What is the capital of France?",
           "Name three primary colors.",
           "What is 12 times 12?",
           "Write one sentence about the ocean.",
           "Who wrote Romeo and Juliet?",
           "What is the boiling point of water in Celsius?",
           "Give me a synonym for happy.",
           "Translate 'thank you' into Spanish.",
           "What planet is known as the Red Planet?"]
BLOCK_SIZE = 16
PREFILL_TOKENS = 16  # the text's first tokens, written by a host-bound prefill


class HostTier:
    """Sequences whose KV lives in a host tier of one dtype; sequence i owns a fixed run of
    blocks. Steps run through the serving executors and the host side: prefills as host-bound
    prefills (GPU_ONLY executor), decodes as host decode rows (ASYNC_OVERLAP executor, native
    pool)."""

    def __init__(self, model, host_kv_dtype: HostKVDtype, num_seqs: int, max_len: int,
                 pool: CpuAttentionPool) -> None:
        config = model.config
        self.model = model
        self.blocks_per_seq = -(-max_len // BLOCK_SIZE)
        shape = (config.num_hidden_layers, 2, num_seqs * self.blocks_per_seq,
                 config.num_key_value_heads, BLOCK_SIZE, config.head_dim)
        self.kv = torch.zeros(shape, dtype=resolve_host_kv_dtype(host_kv_dtype, model.dtype))
        self.scales = torch.zeros(shape[:-1]) if self.kv.dtype == torch.int8 else None
        scale = config.head_dim ** -0.5
        # Host-bound prefills attend over their own k/v: the device side needs no GPU tier.
        no_gpu_tier = torch.zeros((1, 2, 1, *shape[3:]), dtype=model.dtype)
        device_attention = TorchPagedAttention(no_gpu_tier, scale)
        self.host = HostAttention(self.kv, pool, scale, num_seqs, config.num_attention_heads,
                                  config.num_key_value_heads, config.head_dim,
                                  torch.device("cpu"), host_scales=self.scales,
                                  row_dtype=model.dtype)
        self.prefill_executor = GpuOnlyExecutor(model, device_attention, self.host)
        self.decode_executor = AsyncOverlapExecutor(model, device_attention, self.host)
        self.lens = [0] * num_seqs

    def _run(self, executor, tokens: list[int], positions: list[int],
             layout: BatchLayout) -> torch.Tensor:
        batch = InputBatch(torch.tensor(tokens), torch.tensor(positions), layout,
                           torch.empty(0, dtype=torch.int64), ())
        self.host.begin_step(layout)
        try:
            return executor.run(batch)
        finally:
            self.host.end_step()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Whole prompts of sequences 0..n-1; float32 logits of each prompt's last row."""
        ids = [contiguous_block_ids(i, self.blocks_per_seq) for i in range(len(prompts))]
        layout = make_layout(host_prefill=host_prefill_batch(
            0, ids, [len(p) for p in prompts], BLOCK_SIZE))
        hidden = self._run(self.prefill_executor, [t for p in prompts for t in p],
                           [j for p in prompts for j in range(len(p))], layout)
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        self.lens = [len(p) for p in prompts]
        return self.model.compute_logits(hidden[ends])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One new token per sequence; float32 logits [num_seqs, vocab]. The native kernel
        appends each new k/v (quantizing for int8) and attends over the host tier."""
        n = len(tokens)
        ids = [contiguous_block_ids(i, self.blocks_per_seq) for i in range(n)]
        layout = make_layout(host_decode=paged_batch(0, ids, self.lens[:n], [1] * n,
                                                     BLOCK_SIZE, "cpu"))
        hidden = self._run(self.decode_executor, tokens, self.lens[:n], layout)
        self.lens[:n] = [length + 1 for length in self.lens[:n]]
        return self.model.compute_logits(hidden)


def text_nll(model, tokens: list[int], dtype: HostKVDtype, pool: CpuAttentionPool) -> float:
    """Mean NLL of tokens[PREFILL_TOKENS + 1:], each predicted by a decode step over the tier."""
    tier = HostTier(model, dtype, 1, len(tokens), pool)
    tier.prefill([tokens[:PREFILL_TOKENS]])
    total = 0.0
    for position in range(PREFILL_TOKENS, len(tokens) - 1):
        logits = tier.decode([tokens[position]])[0]
        total -= float(torch.log_softmax(logits.float(), dim=-1)[tokens[position + 1]])
    return total / (len(tokens) - 1 - PREFILL_TOKENS)


def greedy(model, prompts: list[list[int]], new_tokens: int, dtype: HostKVDtype,
           pool: CpuAttentionPool) -> list[list[int]]:
    tier = HostTier(model, dtype, len(prompts), max(map(len, prompts)) + new_tokens, pool)
    last = tier.prefill(prompts).argmax(-1).tolist()
    outputs = [[t] for t in last]
    for _ in range(new_tokens - 1):
        last = tier.decode(last).argmax(-1).tolist()
        for output, token in zip(outputs, last):
            output.append(token)
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype, which the auto host tier keeps (bfloat16 "
                             "matmuls are slow on most CPUs)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-text-tokens", type=int, default=None,
                        help="cut the text (quick checks; the measurement uses all of it)")
    parser.add_argument("--threads", type=int, default=2, help="native pool threads")
    parser.add_argument("--isa", default=None,
                        help="force a kernel set (e.g. avx2 on an AVX-512 machine: its int8 "
                             "kernels differ); default: the best this CPU runs")
    args = parser.parse_args(argv)
    model, _, tokenizer, name = load_model(embedded_gguf_path(), "auto", "cpu",
                                           getattr(torch, args.dtype))
    text = tokenizer.encode(TEXT_PATH.read_text(), add_special_tokens=False)
    text = text[:args.max_text_tokens] if args.max_text_tokens else text
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                add_special_tokens=False) for p in PROMPTS]
    results: dict[str, dict] = {}
    with CpuAttentionPool(args.threads, isa=args.isa) as pool, torch.inference_mode():
        for dtype in (HostKVDtype.AUTO, HostKVDtype.INT8):
            start = time.perf_counter()
            nll = text_nll(model, text, dtype, pool)
            outputs = greedy(model, prompts, args.new_tokens, dtype, pool)
            results[dtype.value] = dict(nll=nll, outputs=outputs,
                                        seconds=time.perf_counter() - start)
            print(f"{dtype.value}: mean NLL {nll:.4f} (ppl {math.exp(nll):.2f}) over "
                  f"{len(text) - 1 - PREFILL_TOKENS} tokens, "
                  f"{results[dtype.value]['seconds']:.0f} s", flush=True)
    base, int8 = results["auto"], results["int8"]
    agree = [sum(a == b for a, b in zip(x, y)) for x, y in zip(base["outputs"], int8["outputs"])]
    for prompt, x, y, same in zip(PROMPTS, base["outputs"], int8["outputs"], agree):
        print(f"\n{prompt}\n  auto: {tokenizer.decode(x)!r}\n  int8: {tokenizer.decode(y)!r}"
              f"\n  {same}/{len(x)} tokens agree")
    print(json.dumps(dict(bench="host_kv_accuracy", model=name, dtype=args.dtype,
                          text_tokens=len(text), nll_auto=round(base["nll"], 5),
                          nll_int8=round(int8["nll"], 5),
                          nll_ratio=round(int8["nll"] / base["nll"], 5),
                          greedy_tokens_agree=sum(agree),
                          greedy_tokens=sum(map(len, base["outputs"])),
                          greedy_agree_per_prompt=agree,
                          isa_int8=pool_isa(args.threads, args.isa))))


def pool_isa(threads: int, isa: str | None) -> str:
    with CpuAttentionPool(threads, isa=isa) as pool:
        return pool.isa(torch.int8)


if __name__ == "__main__":
    main()
