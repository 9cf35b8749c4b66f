"""GGUF files written here from a tiny transformers checkpoint (the way converters write them:
q/k rows permuted, weights quantized) load back to exactly the dequantized weights, for every
supported tensor type, with a head_dim (48) that differs from hidden / heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from apex_grpc.model import load_model
from apex_grpc.model.greedy import GreedyGenerator

_LAYER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (rotate-half -> interleaved pairs)."""
    rows, cols = weight.shape
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def _write(path, hf_model, tensor_type: GGMLQuantizationType) -> None:
    config = hf_model.config
    writer = GGUFWriter(str(path), "llama")
    for key, value in (("vocab_size", config.vocab_size), ("context_length", 512),
                       ("embedding_length", config.hidden_size),
                       ("feed_forward_length", config.intermediate_size),
                       ("block_count", config.num_hidden_layers),
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads),
                       ("attention.key_length", config.head_dim),
                       ("rope.dimension_count", config.head_dim)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    for name, tensor in hf_model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = _permute(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, config.num_key_value_heads)
        if array.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), array)
        else:
            writer.add_tensor(_gguf_name(name), quants.quantize(array, tensor_type),
                              raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tensors_load_as_their_dequantized_values(tiny_hf_checkpoint, tmp_path,
                                                       tensor_type):
    qtype = GGMLQuantizationType[tensor_type]
    hf_model = tiny_hf_checkpoint("head_dim_48").hf_model
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    _write(path, hf_model, qtype)
    model, config, tokenizer, _ = load_model(str(path), "auto", "cpu", torch.float32)
    assert tokenizer is None and config.head_dim == 48
    ours = model.layers[1]
    reference = hf_model.model.layers[1]
    for hf_linear, rows in ((reference.self_attn.q_proj, slice(0, 192)),
                            (reference.self_attn.k_proj, slice(192, 288))):
        weight = hf_linear.weight.detach().numpy()
        if qtype != GGMLQuantizationType.F32:
            weight = quants.dequantize(quants.quantize(weight, qtype), qtype)
        torch.testing.assert_close(ours.qkv_proj.weight[rows], torch.from_numpy(weight),
                                   rtol=0, atol=0)
    if qtype == GGMLQuantizationType.F32:
        prompt = list(range(5, 69))
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        logits = GreedyGenerator(model, 1, len(prompt)).prefill(0, prompt)
        assert float((logits - expected).norm() / expected.norm()) < 1e-4
