"""--host-kv-dtype int8: every writer of the host tier quantizes (host-bound prefills, evictions,
per-step appends by the native kernel), restores dequantize, and generation through the
8-bit tier stays close to the 16/32-bit one. The default dtype's bit-identity is covered by
test_hybrid_equivalence.py, unchanged."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.config import ConfigError, EngineConfig, HostKVDtype, ModelConfig
from apex_grpc.engine.builder import build_core
from apex_grpc.kv_cache.manager import KVMove
from apex_grpc.kv_cache.quantized import checked_host_kv_dtype, dequantize_rows, quantize_rows
from apex_grpc.kv_cache.storage import KVStorage
from apex_grpc.request import Tier
from test_hybrid_equivalence import MODES, make_prompts, run_mode, tiny_gqa_model  # noqa: F401


def test_moves_quantize_to_the_host_and_dequantize_back():
    model = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=64,
                        intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        rope_theta=1e4, max_position_embeddings=64)
    storage = KVStorage(model, 4, 8, 8, torch.float32, torch.device("cpu"),
                        host_dtype=torch.int8)
    assert storage.host.dtype == torch.int8 and storage.host_scales.shape == (2, 2, 8, 2, 4)
    storage.gpu.normal_()
    original = storage.gpu.clone()
    storage.apply_moves((KVMove("r", Tier.GPU, Tier.HOST, (1, 2, 5), (3, 4, 0)),))
    expected_q, expected_scales = quantize_rows(original[:, :, [1, 2, 5]])
    assert torch.equal(storage.host[:, :, [3, 4, 0]], expected_q)
    assert torch.equal(storage.host_scales[:, :, [3, 4, 0]], expected_scales)
    storage.apply_moves((KVMove("r", Tier.HOST, Tier.GPU, (3, 4, 0), (6, 7, 1)),))
    restored = storage.gpu[:, :, [6, 7, 1]]
    assert torch.equal(restored, dequantize_rows(expected_q, expected_scales, torch.float32))
    step = expected_scales.unsqueeze(-1)
    assert bool(((restored - original[:, :, [1, 2, 5]]).abs() <= step / 2 + 1e-6).all())


def test_int8_refused_where_only_scalar_kernels_run():
    with pytest.raises(ValueError, match="host-kv-dtype int8 needs a CPU with AVX2"):
        checked_host_kv_dtype(HostKVDtype.INT8, torch.bfloat16, isa="scalar")
    assert checked_host_kv_dtype(HostKVDtype.AUTO, torch.bfloat16, isa="scalar") == torch.bfloat16
    assert checked_host_kv_dtype(HostKVDtype.INT8, torch.bfloat16, isa="avx2") == torch.int8


def test_engine_config_names_a_bad_host_kv_dtype():
    with pytest.raises(ConfigError, match=r"host_kv_dtype must be a HostKVDtype \(one of auto, "
                       r"int8\), got 'fp4'"):
        EngineConfig(host_kv_dtype="fp4")


@pytest.mark.parametrize("mode", ["apex_host", "apex_evictions", "neo_pipeline"])
def test_int8_host_tier_generates_close_to_full_precision(tiny_gqa_model, mode, monkeypatch):
    """Host-bound prefills, evictions and restores, the native per-step appends and the NEO
    pipeline all run over the int8 tier; greedy tokens mostly agree with GPU_ONLY and agreeing
    steps' logprobs stay close (a wrong scale or layout would scramble both)."""
    device, (model, model_config, tokenizer, _) = tiny_gqa_model
    prompts = make_prompts(model_config.vocab_size, seed=3)
    reference = run_mode(model, model_config, tokenizer, "gpu_only", prompts, 16, device)
    overrides = dict(MODES[mode][0], host_kv_dtype=HostKVDtype.INT8)
    monkeypatch.setitem(MODES, "int8", (overrides, MODES[mode][1]))
    quantized = run_mode(model, model_config, tokenizer, "int8", prompts, 16, device)
    agree = total = 0
    worst = 0.0
    for rid, ref in reference.items():
        got = quantized[rid]
        for step, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            total += 1
            if a != b:
                break  # later tokens follow a different prefix
            agree += 1
            worst = max(worst, abs(ref.logprobs[step] - got.logprobs[step]))
    assert agree / total > 0.8, f"only {agree}/{total} greedy tokens agree with GPU_ONLY"
    assert worst < 0.1, f"int8 host KV moved a greedy token's logprob by {worst:.3f}"


def test_build_core_gives_the_host_tier_its_dtype(tiny_gqa_model):
    device, (model, model_config, tokenizer, _) = tiny_gqa_model
    config = EngineConfig(block_size=4, num_gpu_blocks=64, num_host_blocks=32,
                          host_kv_dtype=HostKVDtype.INT8)
    core = build_core(config, model, model_config, tokenizer, torch.float32,
                      torch.device(device))
    storage = core.runner.storage
    assert storage.host.dtype == torch.int8 and storage.gpu.dtype == torch.float32
    assert storage.host_scales is not None


def test_host_side_writes_and_attends_an_int8_tier():
    """The host side quantizes host-bound prefill rows into an int8 tier exactly as
    quantize_rows does, and its native decode attends the tier (with the step's new row
    appended quantized) like float attention over the dequantized values."""
    from apex_grpc.attention.cpu_kernel import CpuAttentionPool
    from apex_grpc.attention.host import HostAttention
    from apex_grpc.attention.layout import host_prefill_batch, make_layout, paged_batch
    from apex_grpc.attention.torch_ref import paged_attention_reference

    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    host_kv = torch.zeros((1, 2, 6, kv_heads, block_size, head_dim), dtype=torch.int8)
    scales = torch.zeros(host_kv.shape[:-1])
    k, v = torch.randn(9, kv_heads, head_dim), torch.randn(9, kv_heads, head_dim)
    q_new, k_new, v_new = (torch.randn(1, n, head_dim) for n in (heads, kv_heads, kv_heads))
    table = [3, 0, 5]
    with CpuAttentionPool(1) as pool:
        host = HostAttention(host_kv, pool, 0.25, 2, heads, kv_heads, head_dim,
                             torch.device("cpu"), host_scales=scales, row_dtype=torch.float32)
        host.begin_step(make_layout(host_prefill=host_prefill_batch(0, [table], [9],
                                                                    block_size)))
        host.write_prefill(0, k, v)
        host.end_step()
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(9)])
        stored = host_kv[0, 0].permute(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)[slots]
        assert torch.equal(stored, quantize_rows(k)[0])

        decode = paged_batch(0, [table], [9], [1], block_size, "cpu")
        qkv = torch.cat([q_new, k_new, v_new], dim=1)
        q, k_row, v_row = qkv.split((heads, kv_heads, kv_heads), dim=1)
        out = torch.full_like(q, float("nan"))
        host.begin_step(make_layout(host_decode=decode))
        host.stage(0, q, k_row, v_row, 0)
        host.fetch(0, out, 0)
        host.end_step()
    dequantized = dequantize_rows(host_kv[0], scales[0], torch.float32)
    expected = paged_attention_reference(q, dequantized[0], dequantized[1],
                                         decode.block_tables, [10], [1], 0.25)
    # On AVX512-VNNI q is quantized too: a little more than float rounding apart.
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


def test_serve_flag_reaches_the_options_and_refuses_unknown_names(capsys):
    from apex_grpc import cli

    options = cli.serve_options(cli.build_parser().parse_args(
        ["serve", "--host-kv-dtype", "int8"]))
    assert options.host_kv_dtype is HostKVDtype.INT8
    assert cli.serve_options(cli.build_parser().parse_args(["serve"])).host_kv_dtype \
        is HostKVDtype.AUTO
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--host-kv-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
