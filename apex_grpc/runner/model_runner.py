"""Executes a StepPlan: KV moves, the forward pass under the plan's strategy, then sampling.

GPU_ONLY and ASYNC_OVERLAP run one forward pass (the hybrid backend overlaps host rows inside
each layer); ASYMMETRIC_PIPELINE runs two sub-batches with a skewed layer schedule so the CPU
attends sub-batch B at layer i while the GPU runs sub-batch A's layer i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from apex_grpc.attention.base import AttentionMetadata
from apex_grpc.attention.hybrid import HybridAttention
from apex_grpc.kv_cache.storage import KVStorage
from apex_grpc.platform import synchronize
from apex_grpc.request import TokenLogprob
from apex_grpc.runner.input_batch import build_input_batch
from apex_grpc.sampler import Sampler
from apex_grpc.scheduler.plan import StepPlan, Strategy


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, storage: KVStorage, attention: HybridAttention,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.storage = storage
        self.attention = attention
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        moved = self.storage.apply_moves(plan.moves)
        if moved is not None:  # freed source blocks may be rewritten by this step
            moved.make_current_stream_wait()
        if plan.is_empty:
            return StepResult({}, {})
        batch = build_input_batch(plan, self.block_size, self.device)
        # The host jobs are collected only after sampling is enqueued (and has synchronised):
        # collecting them right after the forward would stall this thread until the CPU's last
        # layer, while the device sits idle waiting for the sampling launches.
        try:
            self.attention.begin_step(batch.meta.host_decode)
            if plan.strategy == Strategy.ASYMMETRIC_PIPELINE and batch.meta.host_decode is not None:
                hidden = self._forward_pipelined(batch.input_ids, batch.positions, batch.meta)
            else:
                hidden = self.model(batch.input_ids, batch.positions, self.attention, batch.meta)
            if not batch.sample_request_ids:
                synchronize(self.device)
                return StepResult({}, {})
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            seqs = {s.request_id: s for s in plan.all_seqs}
            rows = [seqs[rid] for rid in batch.sample_request_ids]
            out = self.sampler(logits, [r.sampling for r in rows], [r.generator for r in rows],
                               [r.prior_token_ids or [] for r in rows])
        finally:
            self.attention.end_step()
        sampled = dict(zip(batch.sample_request_ids, out.token_ids))
        logprobs = {rid: lp for rid, lp in zip(batch.sample_request_ids, out.logprobs)
                    if lp is not None}
        return StepResult(sampled, logprobs)

    def _forward_pipelined(self, input_ids: torch.Tensor, positions: torch.Tensor,
                           meta: AttentionMetadata) -> torch.Tensor:
        """Sub-batch A = GPU-attended rows, B = host decode rows (the tail)."""
        split = meta.host_decode.row_start
        meta_a = dataclasses.replace(meta, num_tokens=split, host_decode=None)
        layers = self.model.layers
        rope = self.model.rotary.angles(positions)
        rope_a, rope_b = rope.rows(slice(0, split)), rope.rows(slice(split, None))
        hidden_a, residual_a = self.model.embed(input_ids[:split]), None
        hidden_b, residual_b = self.model.embed(input_ids[split:]), None

        q, k, v, residual_b = layers[0].pre_attention(hidden_b, residual_b, rope_b)
        self.attention.stage_host(0, q, k, v)
        for i, layer in enumerate(layers):
            if split > 0:  # GPU work for A at layer i overlaps B's CPU attention at layer i
                q, k, v, residual_a = layer.pre_attention(hidden_a, residual_a, rope_a)
                attn_a = self.attention.gpu_backend.forward(i, q, k, v, meta_a)
                hidden_a, residual_a = layer.post_attention(attn_a, residual_a)
            hidden_b, residual_b = layer.post_attention(self.attention.wait_host(i), residual_b)
            if i + 1 < len(layers):
                q, k, v, residual_b = layers[i + 1].pre_attention(hidden_b, residual_b, rope_b)
                self.attention.stage_host(i + 1, q, k, v)
        out_b = self.model.final_norm(hidden_b, residual_b)
        if split == 0:
            return out_b
        return torch.cat([self.model.final_norm(hidden_a, residual_a), out_b])
