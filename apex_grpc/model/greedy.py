"""A minimal greedy generator over a real paged KV cache (TorchPagedAttention, GPU tier only).

Not the server's runner: it exists so model tests and the model benchmark can drive prefill
(optionally chunked) and batched decode through the same model + attention seam the runner
uses, with a trivial block allocation (sequence i owns a fixed run of blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apex_grpc.attention.layout import contiguous_block_ids, make_layout, paged_batch
from apex_grpc.attention.torch_ref import TorchPagedAttention
from apex_grpc.model.llama import LlamaForCausalLM


def allocate_kv_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> torch.Tensor:
    """[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] in the model's dtype."""
    config = model.config
    return torch.zeros(config.num_hidden_layers, 2, num_blocks, config.num_key_value_heads,
                       block_size, config.head_dim, dtype=model.dtype, device=model.device)


class GreedyGenerator:
    """Runs up to max_seqs sequences of at most max_seq_len tokens each."""

    def __init__(self, model: LlamaForCausalLM, max_seqs: int, max_seq_len: int,
                 block_size: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.blocks_per_seq = -(-max_seq_len // block_size)
        kv = allocate_kv_cache(model, max_seqs * self.blocks_per_seq, block_size)
        self.attention = TorchPagedAttention(kv, model.config.head_dim ** -0.5)
        self.num_cached = [0] * max_seqs

    def step(self, seq_indices: Sequence[int],
             new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append new_tokens[i] to sequence seq_indices[i]; returns float32 logits for every
        new row [total_new_tokens, vocab_size]."""
        query_lens = [len(tokens) for tokens in new_tokens]
        cached = [self.num_cached[i] for i in seq_indices]
        if any(c + n > self.max_seq_len for c, n in zip(cached, query_lens)):
            raise ValueError(f"a sequence would exceed max_seq_len {self.max_seq_len}")
        device = self.model.device
        batch = paged_batch(
            0, [contiguous_block_ids(i, self.blocks_per_seq) for i in seq_indices], cached,
            query_lens, self.block_size, device)
        is_decode = all(n == 1 for n in query_lens) and all(cached)
        layout = make_layout(gpu_decode=batch) if is_decode else make_layout(gpu_prefill=batch)
        out = torch.empty((batch.num_tokens, self.model.config.num_attention_heads,
                           self.model.config.head_dim), dtype=self.model.dtype, device=device)

        def attend(layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
            self.attention.forward(layer_idx, q, k, v, layout, out)
            return out

        input_ids = torch.tensor([t for tokens in new_tokens for t in tokens], device=device)
        positions = torch.tensor([c + j for c, n in zip(cached, query_lens) for j in range(n)],
                                 device=device)
        hidden = self.model(input_ids, positions, attend)
        for i, n in zip(seq_indices, query_lens):
            self.num_cached[i] += n
        return self.model.compute_logits(hidden)

    def prefill(self, seq_index: int, prompt: Sequence[int],
                chunk_size: int | None = None) -> torch.Tensor:
        """Prefill in chunks of chunk_size (all at once if None); logits [len(prompt), vocab]."""
        chunk_size = chunk_size or len(prompt)
        chunks = [self.step([seq_index], [prompt[s:s + chunk_size]])
                  for s in range(0, len(prompt), chunk_size)]
        return torch.cat(chunks)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 chunk_size: int | None = None,
                 stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy tokens per prompt: prefill each, then decode all together; a sequence that
        emits a stop token is finished (the stop token is kept in its output)."""
        if len(prompts) > len(self.num_cached):
            raise ValueError(f"{len(prompts)} prompts but room for {len(self.num_cached)}")
        self.num_cached = [0] * len(self.num_cached)
        outputs = [[int(self.prefill(i, p, chunk_size)[-1].argmax())]
                   for i, p in enumerate(prompts)]
        for _ in range(max_new_tokens - 1):
            active = [i for i, out in enumerate(outputs) if out[-1] not in stop_token_ids]
            if not active:
                break
            logits = self.step(active, [[outputs[i][-1]] for i in active])
            for row, i in enumerate(active):
                outputs[i].append(int(logits[row].argmax()))
        return outputs
