"""GGUF files written here from a tiny transformers checkpoint (the way converters write them:
q/k rows permuted, weights quantized) load back to exactly the dequantized weights, for every
supported tensor type, with a head_dim (48) that differs from hidden / heads; and a Llama-3.1
style file whose rope scaling is only a rope_freqs tensor matches transformers' llama3 rope."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from gguf_writing import llama3_rope_freqs, rope_parameters, write_llama_gguf

from apex_grpc.model import CheckpointError, load_model
from apex_grpc.model.greedy import GreedyGenerator


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tensors_load_as_their_dequantized_values(tiny_hf_checkpoint, tmp_path,
                                                       tensor_type):
    qtype = GGMLQuantizationType[tensor_type]
    hf_model = tiny_hf_checkpoint("head_dim_48").hf_model
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    write_llama_gguf(path, hf_model, qtype)
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


def test_rope_freqs_gguf_matches_transformers_llama3_rope(tiny_hf_checkpoint, tmp_path):
    hf_model = tiny_hf_checkpoint("llama3_rope").hf_model
    rope = rope_parameters(hf_model.config)
    assert rope["rope_type"] == "llama3"
    rope_freqs = llama3_rope_freqs(hf_model.config.head_dim, rope)
    # The tiny original context (32) puts pairs in all three bands: kept, smoothed, divided.
    assert rope_freqs.min() == 1.0 and rope_freqs.max() == rope["factor"]
    assert ((rope_freqs > 1.0) & (rope_freqs < rope["factor"])).any()
    path = tmp_path / "llama31.gguf"
    write_llama_gguf(path, hf_model, GGMLQuantizationType.F32, rope_freqs=rope_freqs)
    model, config, _, _ = load_model(str(path), "auto", "cpu", torch.float32)
    assert config.rope_theta == rope["rope_theta"]
    assert config.rope_scaling["frequency_factors"] == tuple(float(f) for f in rope_freqs)
    # 64 positions: twice the original context, so the scaled frequencies matter.
    prompt = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0]
    logits = GreedyGenerator(model, 1, len(prompt)).prefill(0, prompt, chunk_size=16)
    assert float((logits - expected).norm() / expected.norm()) < 1e-4


def test_rope_freqs_of_the_wrong_length_are_refused(tiny_hf_checkpoint, tmp_path):
    hf_model = tiny_hf_checkpoint("llama3_rope").hf_model
    path = tmp_path / "bad_rope_freqs.gguf"
    write_llama_gguf(path, hf_model, GGMLQuantizationType.F32,
                     rope_freqs=np.ones(5, dtype=np.float32))
    with pytest.raises(CheckpointError, match="rope_freqs.weight has 5 values; head_dim 24 "
                                              "needs 12"):
        load_model(str(path), "auto", "cpu", torch.float32)
