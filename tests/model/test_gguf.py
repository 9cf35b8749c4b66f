"""The GGUF path on the embedded SmolLM2 model, checked against transformers' GGUF loader,
and the loader's handling of GGUF files it cannot serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from apex_grpc.model import CheckpointError, load_model
from apex_grpc.model.gguf_loader import unpermute_rows
from apex_grpc.model.greedy import GreedyGenerator

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_prompt(tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)


def test_logits_match_transformers_gguf_load(smollm2, hf_gguf_model):
    model, _, tokenizer = smollm2
    prompt = _chat_prompt(tokenizer) + tokenizer.encode(" The answer, in 12 words: Paris! ü🙂")
    with torch.no_grad():
        reference = hf_gguf_model(torch.tensor([prompt])).logits[0]
    ours = GreedyGenerator(model, 1, len(prompt)).prefill(0, prompt, chunk_size=16)
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


def test_greedy_chat_answer_names_paris(smollm2):
    model, config, tokenizer = smollm2
    assert tokenizer.has_chat_template and config.eos_token_ids == tokenizer.eos_token_ids
    output = GreedyGenerator(model, 1, 128).generate(
        [_chat_prompt(tokenizer)], 40, stop_token_ids=tokenizer.eos_token_ids)[0]
    assert "Paris" in tokenizer.decode(output)


def test_config_from_metadata(smollm2):
    _, config, tokenizer = smollm2
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (576, 30, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.vocab_size == tokenizer.vocab_size == 49152


def test_unpermute_inverts_the_converter_permutation():
    num_heads, head_dim, cols = 3, 8, 5
    weight = torch.arange(num_heads * head_dim * cols, dtype=torch.float32).reshape(-1, cols)
    # What GGUF converters do: per head, interleave the two rotate-half halves.
    permuted = (weight.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2)
                .reshape(-1, cols))
    assert torch.equal(unpermute_rows(permuted, num_heads), weight)
    bias = torch.arange(num_heads * head_dim, dtype=torch.float32)
    permuted_bias = bias.reshape(num_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)
    assert torch.equal(unpermute_rows(permuted_bias, num_heads), bias)


def _write_gguf(path, arch: str, tensor_type: GGMLQuantizationType) -> None:
    writer = GGUFWriter(str(path), arch)
    for key, value in (("vocab_size", 8), ("block_count", 1), ("embedding_length", 256),
                       ("feed_forward_length", 256), ("attention.head_count", 4)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    if tensor_type == GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((8, 256), dtype=np.float32))
    else:  # Q6_K: 210 bytes per 256 values
        writer.add_tensor("token_embd.weight", np.zeros((8, 210), dtype=np.uint8),
                          raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "phi3.gguf"
    _write_gguf(path, "phi3", GGMLQuantizationType.F32)
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'phi3'; "
                                              "supported: 'llama', 'qwen2', 'qwen3'"):
        load_model(str(path), "auto", "cpu", torch.float32)


def test_unsupported_quantization_is_named(tmp_path):
    path = tmp_path / "q6k.gguf"
    _write_gguf(path, "llama", GGMLQuantizationType.Q6_K)
    with pytest.raises(CheckpointError, match="token_embd.weight.*unsupported quantization "
                                              "type Q6_K"):
        load_model(str(path), "auto", "cpu", torch.float32)


def test_missing_tensor_is_named(tmp_path):
    path = tmp_path / "partial.gguf"
    _write_gguf(path, "llama", GGMLQuantizationType.F32)
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_model(str(path), "auto", "cpu", torch.float32)


def test_truncated_gguf_is_reported(tmp_path, embedded_gguf_path):
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf_path, "rb") as source:
        path.write_bytes(source.read(4096))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(str(path), "auto", "cpu", torch.float32)
