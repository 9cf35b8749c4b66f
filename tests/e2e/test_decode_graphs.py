"""Decode steps over fixed, padded buffers (runner/decode_graphs.py): the buckets, what the
padding may touch, and the same tokens as eager steps; captured as CUDA graphs where CUDA is.
The token equivalence over whole workloads is in test_hybrid_equivalence.py (*_graphs modes)."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.config import ConfigError, EngineConfig, Policy
from apex_grpc.engine.builder import build_core, build_engine_core
from apex_grpc.model.loader import load_model
from apex_grpc.request import Tier
from apex_grpc.runner.decode_graphs import DecodeBuckets, bucket_sizes
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy

from tiny_options import tiny_serve_options

BLOCK_SIZE = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_bucket_sizes_cover_every_batch_up_to_the_largest():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert bucket_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert bucket_sizes(3) == (1, 2, 3)
    with pytest.raises(ConfigError, match="--cuda-graph-max-batch"):
        DecodeBuckets.for_engine(0, 8)


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    buckets = DecodeBuckets.for_engine(16, max_host_rows=8)
    assert buckets.host == (0, 1, 2, 4, 8)
    assert buckets.pick(3, 0) == (4, 0)
    assert buckets.pick(0, 3) == (0, 4)  # host rows only: no GPU row is padded in
    assert buckets.pick(9, 5) == (16, 8)
    assert buckets.pick(17, 0) is None and buckets.pick(1, 9) is None
    assert buckets.pick(0, 0) is None
    pairs = buckets.all()
    assert pairs[0] == (16, 8) and (0, 0) not in pairs
    assert len(pairs) == len(set(pairs)) == 6 * 5 - 1
    assert DecodeBuckets.for_engine(8, max_host_rows=0).host == (0,)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("tiny_decode_graphs")
    hf_model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_core(path: str, device: str, graphs: bool):
    model, model_config, tokenizer, _ = load_model(path, "auto", device, torch.float32)
    config = EngineConfig(block_size=BLOCK_SIZE, num_gpu_blocks=64, num_host_blocks=64,
                          max_num_seqs=16, max_batched_tokens=256, max_model_len=128,
                          policy=Policy.APEX, cpu_attention_threads=1)
    core = build_core(config, model, model_config, tokenizer, torch.float32,
                      torch.device(device), cuda_graph_max_batch=8 if graphs else None)
    generator = torch.Generator().manual_seed(1)  # the same random "context" in both cores
    storage = core.runner.storage
    storage.gpu.copy_(torch.randn(storage.gpu.shape, generator=generator))
    storage.host.copy_(torch.randn(storage.host.shape, generator=generator))
    return core


def decode_plan(num_gpu: int, num_host: int, context: int = 9) -> StepPlan:
    """Decodes of `context` cached tokens: GPU sequence i in blocks [4i, 4i + 4), host
    sequence j in host blocks [4j, 4j + 4); contexts differ so every length matters."""
    def seq(tier: Tier, i: int) -> ScheduledSeq:
        cached = context + i
        blocks = tuple(range(4 * i, 4 * i + -(-(cached + 1) // BLOCK_SIZE)))
        return ScheduledSeq(f"{tier.name}{i}", (5 + i,), cached, blocks, tier, True)

    strategy = Strategy.ASYNC_OVERLAP if num_host else Strategy.GPU_ONLY
    return StepPlan(strategy, tuple(seq(Tier.GPU, i) for i in range(num_gpu)), (),
                    tuple(seq(Tier.HOST, j) for j in range(num_host)), ())


def written_blocks(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Blocks (dim 2 of a KV tier) whose contents changed."""
    changed = (before != after).flatten(3).any(dim=3).any(dim=0).any(dim=0)  # [blocks]
    return set(changed.nonzero().flatten().tolist())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_gpu,num_host", [(3, 0), (3, 3), (0, 5), (8, 8)])
def test_padded_step_matches_the_eager_step_and_touches_only_its_own_blocks(
        tiny_model, device, num_gpu, num_host):
    eager, padded = make_core(tiny_model, device, False), make_core(tiny_model, device, True)
    graphs = padded.runner.decode_graphs
    if device == "cuda":
        padded.runner.capture_decode_graphs()
    plan = decode_plan(num_gpu, num_host)
    assert graphs.bucket_for(plan) == graphs.buckets.pick(num_gpu, num_host)
    gpu_before = padded.runner.storage.gpu.clone()
    expected = eager.runner.execute(plan)
    got = padded.runner.execute(plan)
    assert got.sampled == expected.sampled
    assert graphs.replays + graphs.padded_steps == 1
    # The GPU rows' new k/v went to their own last block; padding only to the padding block.
    storage = padded.runner.storage
    own = {s.block_table[s.num_computed_tokens // BLOCK_SIZE] for s in plan.gpu_seqs}
    padding = {storage.padding_block} if graphs.bucket_for(plan)[0] > num_gpu else set()
    assert written_blocks(gpu_before, storage.gpu) == own | padding
    torch.testing.assert_close(storage.gpu[:, :, :storage.padding_block],
                               eager.runner.storage.gpu[:, :, :storage.padding_block])
    torch.testing.assert_close(storage.host, eager.runner.storage.host)
    eager.close()
    padded.close()


def test_steps_with_prefill_rows_or_the_pipeline_stay_eager(tiny_model):
    core = make_core(tiny_model, "cpu", True)
    graphs = core.runner.decode_graphs
    prefill = ScheduledSeq("p", (3, 4, 5), 0, (0,), Tier.GPU, True)
    assert graphs.bucket_for(StepPlan(Strategy.GPU_ONLY, (prefill,), (), (), ())) is None
    neo = decode_plan(2, 2)
    neo = StepPlan(Strategy.ASYMMETRIC_PIPELINE, neo.gpu_seqs, (), neo.host_decode_seqs, ())
    assert graphs.bucket_for(neo) is None
    assert graphs.bucket_for(decode_plan(9, 0)) is None  # past the largest bucket (8)
    core.runner.execute(neo)
    assert graphs.padded_steps == 0
    core.close()


def test_capture_needs_cuda(tiny_model):
    core = make_core(tiny_model, "cpu", True)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        core.runner.capture_decode_graphs()
    core.close()


def test_a_cpu_server_decodes_eagerly(tiny_config_path):
    """Padding buys nothing without graph capture: serve builds no decode buckets on a CPU."""
    core = build_engine_core(tiny_serve_options(tiny_config_path)).core
    assert core.runner.decode_graphs is None
    core.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("kv_sizing", [{}, {"gpu_kv_blocks": 64}], ids=["free-memory", "blocks"])
def test_a_cuda_server_captures_its_decode_steps_unless_told_not_to(tiny_config_path, kv_sizing):
    options = dict(device="cuda", dtype="bfloat16", policy="apex", max_num_seqs=8, **kv_sizing)
    options.setdefault("gpu_kv_blocks", None)
    core = build_engine_core(tiny_serve_options(tiny_config_path, **options)).core
    graphs = core.runner.decode_graphs
    assert graphs is not None and graphs.captured
    assert graphs.buckets.gpu[-1] == 8 and graphs.buckets.host[-1] == 8
    plan = decode_plan(3, 2)
    core.runner.execute(plan)
    assert graphs.replays == 1 and core.stats().steps_graphed == 1
    core.close()
    eager = build_engine_core(tiny_serve_options(tiny_config_path, enforce_eager=True,
                                                 **options)).core
    assert eager.runner.decode_graphs is None
    eager.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_hybrid_step_failing_midway_leaves_the_next_graphed_step_working(tiny_config_path,
                                                                           monkeypatch):
    """The failed eager step's pending waits drain before a graphed step zeroes the done
    flags they read (else the two would wait on each other)."""
    options = tiny_serve_options(tiny_config_path, device="cuda", policy="apex", max_num_seqs=8)
    core = build_engine_core(options).core
    runner = core.runner
    plan = decode_plan(2, 2)
    reference = runner.execute(plan).sampled
    pipeline = StepPlan(Strategy.ASYMMETRIC_PIPELINE, plan.gpu_seqs, (), plan.host_decode_seqs,
                        ())
    assert runner.decode_graphs.bucket_for(pipeline) is None  # eager
    monkeypatch.setattr(runner.model.layers[-1], "post_attention",  # every layer staged
                        lambda *args: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        runner.execute(pipeline)
    monkeypatch.undo()
    assert runner.execute(plan).sampled == reference
    assert runner.decode_graphs.replays == 2
    core.close()
