"""Checkpoint loading: sharded safetensors, dummy weights, and clear errors for broken input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from apex_grpc.model import CheckpointError, CheckpointFileNotFoundError, load_model
from apex_grpc.model.greedy import GreedyGenerator
from apex_grpc.model.loader import resolve_dummy_config, shipped_config_names


def _load(path, dtype=torch.float32):
    return load_model(str(path), "auto", "cpu", dtype)


def _logits(model, prompt):
    return GreedyGenerator(model, 1, len(prompt)).prefill(0, prompt)


def test_sharded_checkpoint_equals_single_file(tiny_hf_checkpoint, tmp_path):
    checkpoint = tiny_hf_checkpoint("qwen2_bias")
    checkpoint.hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompt = list(range(3, 40))
    torch.testing.assert_close(_logits(_load(tmp_path)[0], prompt),
                               _logits(_load(checkpoint.path)[0], prompt), rtol=0, atol=0)


def test_generation_config_eos_ids_win(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_gqa").path
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert _load(path)[1].eos_token_ids == (2, 7)


def test_missing_files_are_named(tiny_hf_checkpoint, tmp_path):
    with pytest.raises(CheckpointFileNotFoundError, match="does not exist"):
        _load(tmp_path / "nowhere")
    with pytest.raises(CheckpointFileNotFoundError, match="config.json"):
        _load(tmp_path)
    path = tiny_hf_checkpoint("llama_gqa").path
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        _load(path)


def test_missing_shard_is_named(tiny_hf_checkpoint, tmp_path):
    tiny_hf_checkpoint("llama_gqa").hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointFileNotFoundError, match=f"missing shard .*{shard}"):
        _load(tmp_path)


def test_truncated_safetensors_is_named(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_gqa").path
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        _load(path)


def test_missing_tensor_is_named(tiny_hf_checkpoint):
    from safetensors.torch import load_file, save_file

    path = tiny_hf_checkpoint("llama_gqa").path
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor.*layers.1.mlp.up_proj.weight"):
        _load(path)


def test_shape_mismatch_is_named(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_gqa").path
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 192  # the saved tensors have 160
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape .*160.*expects"):
        _load(path)


def test_unknown_architecture_is_named(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_gqa").path
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        _load(path)


def test_unsupported_features_are_named(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_gqa").path
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        _load(path)
    (path / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(CheckpointError, match="mlp_bias"):
        _load(path)


def test_unknown_load_format_is_named():
    with pytest.raises(CheckpointError, match="unknown load format 'pt'"):
        load_model(None, "pt", "cpu", torch.float32)


def test_shipped_configs_have_published_shapes():
    assert {"llama-2-7b", "llama-3.1-8b"} <= set(shipped_config_names())
    llama2 = resolve_dummy_config("llama-2-7b")
    llama31 = resolve_dummy_config("llama-3.1-8b")
    assert (llama2.num_key_value_heads, llama2.intermediate_size, llama2.vocab_size) == (
        32, 11008, 32000)
    assert (llama31.num_key_value_heads, llama31.intermediate_size, llama31.vocab_size) == (
        8, 14336, 128256)
    assert llama31.rope_scaling["rope_type"] == "llama3" and llama31.rope_theta == 500000.0
    # KV bytes per token in bf16: 128 KiB for Llama-3.1-8B (MEASUREMENTS.md).
    assert llama31.kv_bytes_per_token(2) == 128 * 1024
    # Qwen3: head_dim 128 whatever hidden / heads is (64 for the 0.6B), q/k norms, no biases.
    small, qwen3 = resolve_dummy_config("qwen3-0.6b"), resolve_dummy_config("qwen3-8b")
    assert (small.head_dim, small.hidden_size // small.num_attention_heads) == (128, 64)
    assert small.tie_word_embeddings and not qwen3.tie_word_embeddings
    assert qwen3.qk_norm and not (qwen3.qkv_bias or qwen3.o_bias)
    assert qwen3.kv_bytes_per_token(2) == 144 * 1024


def test_dummy_weights_from_a_config_path(tiny_hf_checkpoint):
    path = tiny_hf_checkpoint("llama_tied").path
    model, config, tokenizer, name = load_model(None, "dummy", "cpu", torch.bfloat16,
                                                dummy_config=str(path / "config.json"))
    assert name.startswith("dummy-") and config.tie_word_embeddings
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = _logits(model, list(range(10)))
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert tokenizer.decode(tokenizer.encode("dummy ✓")) == "dummy ✓"
    with pytest.raises(CheckpointFileNotFoundError, match="llama-9b"):
        load_model(None, "dummy", "cpu", torch.float32, dummy_config="llama-9b")
