"""Executes a StepPlan: KV moves, the forward pass through the plan's strategy executor, then
sampling. The runner owns the step's bracket (the host side's begin_step/end_step) and picks
the executor; each executor (runner/executors/) owns its layer loop. With decode buckets a
decode-only step runs over fixed buffers instead, as a CUDA graph once captured
(runner/decode_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_grpc.attention.base import DeviceAttention
from apex_grpc.attention.host import HostAttention
from apex_grpc.kv_cache.storage import KVStorage
from apex_grpc.model.llama import LlamaForCausalLM
from apex_grpc.platform import synchronize
from apex_grpc.request import TokenLogprob
from apex_grpc.runner.decode_graphs import DecodeBuckets, DecodeGraphs
from apex_grpc.runner.executors import EXECUTORS, StepExecutor
from apex_grpc.runner.input_batch import InputBatch, StaticDecodeInputs, build_input_batch
from apex_grpc.sampler import Sampler
from apex_grpc.scheduler.plan import StepPlan, Strategy


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, int]
    logprobs: dict[str, TokenLogprob]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, storage: KVStorage,
                 device_attention: DeviceAttention, host: HostAttention, block_size: int,
                 device: torch.device, decode_buckets: DecodeBuckets | None = None,
                 max_model_len: int = 0) -> None:
        """decode_buckets: run decode-only steps over fixed, padded buffers (as CUDA graphs
        after capture_decode_graphs()); max_model_len sizes their block tables."""
        self.model = model
        self.storage = storage
        self.host = host
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.executors: dict[Strategy, StepExecutor] = {
            strategy: executor(model, device_attention, host)
            for strategy, executor in EXECUTORS.items()}
        self.decode_graphs: DecodeGraphs | None = None
        if decode_buckets is not None:
            inputs = StaticDecodeInputs(
                decode_buckets.gpu[-1], decode_buckets.host[-1],
                -(-max_model_len // block_size), storage.padding_block, block_size, device)
            self.decode_graphs = DecodeGraphs(self.executors, host, inputs, decode_buckets,
                                              max_model_len)

    def capture_decode_graphs(self) -> int:
        """Capture the decode buckets' CUDA graphs -> the bytes their memory pool holds."""
        if self.decode_graphs is None:
            raise RuntimeError("the runner has no decode buckets to capture")
        return self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        moved = self.storage.apply_moves(plan.moves)
        if moved is not None:  # freed source blocks may be rewritten by this step
            moved.make_current_stream_wait()
        if plan.is_empty:
            return StepResult({}, {})
        bucket = self.decode_graphs.bucket_for(plan) if self.decode_graphs else None
        # The host jobs are collected only after sampling is enqueued (and has synchronised):
        # collecting them right after the forward would stall this thread until the CPU's last
        # layer, while the device sits idle waiting for the sampling launches.
        try:
            if bucket is None:
                batch = build_input_batch(plan, self.block_size, self.device)
                self.host.begin_step(batch.layout)
                hidden = self.forward(plan.strategy, batch)
            else:
                graphs = self.decode_graphs
                batch = graphs.inputs.fill(plan, *bucket)
                self.host.begin_step(batch.layout, graphed=graphs.is_captured(bucket))
                hidden = graphs.run(bucket, batch)
            rows = batch.sample_seqs
            if not rows:
                synchronize(self.device)
                return StepResult({}, {})
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            out = self.sampler(logits, [r.sampling for r in rows], [r.generator for r in rows],
                               [r.prior_token_ids or [] for r in rows])
        finally:
            self.host.end_step()
        ids = [r.request_id for r in rows]
        sampled = dict(zip(ids, out.token_ids))
        logprobs = {rid: lp for rid, lp in zip(ids, out.logprobs) if lp is not None}
        return StepResult(sampled, logprobs)

    def forward(self, strategy: Strategy, batch: InputBatch) -> torch.Tensor:
        """The batch's forward pass (host side's step begun) -> final hidden states. A step
        without host decode rows runs GPU_ONLY whatever the plan's strategy."""
        if batch.layout.host_decode is None:
            strategy = Strategy.GPU_ONLY
        return self.executors[strategy].run(batch)

    def close(self) -> None:
        """Release the host side's native CPU pool (its worker threads)."""
        self.host.close()
