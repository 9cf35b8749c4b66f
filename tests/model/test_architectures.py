"""The architecture table: what each config.json means (transformers' defaults included), which
settings are refused at load because serving them would change the tokens (sliding windows that
cut the context, quantized safetensors, partial rotary, unknown rope types, unknown GGUF tensors
or pre-tokenizers), and Qwen3's tokenizer and chat template from an HF directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf_writing import byte_level_bpe_metadata, write_gguf, write_llama_gguf

from apex_grpc.config import SUPPORTED_ARCHITECTURES
from apex_grpc.model import CheckpointError, load_model
from apex_grpc.model.architectures import ARCHITECTURES
from apex_grpc.model.hf_loader import read_hf_model_config

SHAPE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SHAPE}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **SHAPE}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SHAPE}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE}

# (config.json, None if it loads else the refusal's text)
WINDOW_CASES = {
    # Qwen2.5/Qwen3 as published: a window in the config, switched off.
    "qwen2_window_off": ({**QWEN2, "use_sliding_window": False, "sliding_window": 4096},
                         None),
    "qwen3_window_null": ({**QWEN3, "use_sliding_window": False, "sliding_window": None}, None),
    "qwen2_window_on": ({**QWEN2, "use_sliding_window": True, "sliding_window": 64,
                         "max_window_layers": 0, "max_position_embeddings": 512},
                        "window 64 < 512"),
    # Switched on, but only layers from max_window_layers (default 28) on would slide.
    "qwen2_window_no_layer": ({**QWEN2, "use_sliding_window": True, "sliding_window": 64},
                              None),
    "qwen3_layer_types": ({**QWEN3, "use_sliding_window": True, "sliding_window": 64,
                           "layer_types": ["full_attention", "sliding_attention"]},
                          "sliding-window attention"),
    # Mistral-7B-v0.1.
    "mistral_v01": ({**MISTRAL, "sliding_window": 4096, "max_position_embeddings": 32768},
                    "window 4096 < 32768"),
    # transformers' MistralConfig assumes a 4096 window when the key is absent.
    "mistral_no_key": ({**MISTRAL, "max_position_embeddings": 32768}, "window 4096"),
    "mistral_null": ({**MISTRAL, "sliding_window": None, "max_position_embeddings": 32768},
                     None),
    # A window as long as the context never cuts anything.
    "mistral_window_covers": ({**MISTRAL, "sliding_window": 4096,
                               "max_position_embeddings": 4096}, None),
    # Llama has no sliding window: transformers ignores the key.
    "llama_stray_key": ({**LLAMA, "sliding_window": 16}, None),
}


def test_config_validation_names_exactly_the_table_rows():
    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(arch.hf_class for arch in ARCHITECTURES)


def _config_dir(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_sliding_window_loads_only_where_it_never_applies(tmp_path, case):
    cfg, refusal = WINDOW_CASES[case]
    if refusal is None:
        assert read_hf_model_config(str(_config_dir(tmp_path, cfg))).architecture == \
            cfg["architectures"][0]
    else:
        with pytest.raises(CheckpointError, match=refusal):
            read_hf_model_config(str(_config_dir(tmp_path, cfg)))


def test_transformers_defaults_per_architecture(tmp_path):
    qwen3 = read_hf_model_config(str(_config_dir(tmp_path, QWEN3)))
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.rms_norm_eps) == (
        128, True, False, 1e-6)
    qwen3_bias = read_hf_model_config(str(_config_dir(tmp_path, {**QWEN3,
                                                                 "attention_bias": True})))
    assert qwen3_bias.qkv_bias and qwen3_bias.o_bias
    qwen2 = read_hf_model_config(str(_config_dir(tmp_path, {**QWEN2, "attention_bias": True})))
    assert (qwen2.head_dim, qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (16, True, False,
                                                                             False)
    mistral = read_hf_model_config(str(_config_dir(tmp_path, {**MISTRAL, "sliding_window": None,
                                                              "attention_bias": True})))
    assert not (mistral.qkv_bias or mistral.o_bias)
    by_type = {key: value for key, value in QWEN3.items() if key != "architectures"}
    assert read_hf_model_config(str(_config_dir(tmp_path, by_type))).qk_norm


@pytest.mark.parametrize("extra, refusal", [
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized safetensors.*fp8"),
    ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_options_that_change_the_output_are_refused(tmp_path, extra, refusal):
    with pytest.raises(CheckpointError, match=refusal):
        read_hf_model_config(str(_config_dir(tmp_path, {**QWEN3, **extra})))


def test_gguf_sliding_window_and_unknown_tensors_are_refused(tiny_hf_checkpoint, tmp_path):
    hf_model = tiny_hf_checkpoint("llama_gqa").hf_model
    windowed = tmp_path / "windowed.gguf"
    write_llama_gguf(windowed, hf_model, GGMLQuantizationType.F32, add_tokenizer=lambda w:
                     w.add_uint32("llama.attention.sliding_window", 64))
    with pytest.raises(CheckpointError, match="windowed.gguf: this GGUF file asks for "
                                              "sliding-window attention"):
        load_model(str(windowed), "auto", "cpu", torch.float32)
    # A llama file with q/k norms: dropping them would serve other tokens.
    extra = tmp_path / "extra.gguf"
    write_llama_gguf(extra, hf_model, GGMLQuantizationType.F32, add_tokenizer=lambda w:
                     w.add_tensor("blk.0.attn_q_norm.weight", np.ones(24, np.float32)))
    with pytest.raises(CheckpointError, match="tensor 'blk.0.attn_q_norm.weight' is not used"):
        load_model(str(extra), "auto", "cpu", torch.float32)


def test_gguf_unknown_pre_tokenizer_is_refused(tiny_hf_checkpoint, tiny_bpe_tokenizer,
                                               tmp_path):
    hf_model = tiny_hf_checkpoint("qwen3_tied", vocab_size=336).hf_model
    path = tmp_path / "other-pre.gguf"
    write_gguf(path, hf_model, GGMLQuantizationType.F32, arch="qwen3",
               add_tokenizer=byte_level_bpe_metadata(tiny_bpe_tokenizer, 336,
                                                     pre="deepseek-llm"))
    with pytest.raises(CheckpointError, match="pre-tokenizer 'deepseek-llm'.*not supported"):
        load_model(str(path), "auto", "cpu", torch.float32)


def test_qwen3_directory_tokenizer_and_chat_template(tiny_qwen_checkpoint, tiny_bpe_tokenizer):
    checkpoint = tiny_qwen_checkpoint("qwen3_tied")
    _, config, tokenizer, _ = load_model(str(checkpoint.path), "auto", "cpu", torch.float32)
    text = "def f(x):\n    return 'café' + \"東京\" + '🙂'  # 12345 <|im_start|><think>"
    assert tokenizer.encode(text) == tiny_bpe_tokenizer.encode(text)
    assert config.eos_token_ids == tokenizer.eos_token_ids == (tiny_bpe_tokenizer.eos_token_id,)
    messages = [{"role": "user", "content": "Hi 🙂"},
                {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
                {"role": "user", "content": "Again"}]
    assert tokenizer.apply_chat_template(messages) == tiny_bpe_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_mistral_checkpoint_as_llama_gguf_serves_its_greedy_tokens(tiny_hf_checkpoint, tmp_path):
    """llama.cpp writes Mistral (no sliding window) as the llama architecture, q/k permuted."""
    from apex_grpc.model.greedy import GreedyGenerator

    hf_model = tiny_hf_checkpoint("mistral", rope_theta=1e6).hf_model
    path = tmp_path / "mistral.gguf"
    write_llama_gguf(path, hf_model, GGMLQuantizationType.F32)
    model, config, _, _ = load_model(str(path), "auto", "cpu", torch.float32)
    assert config.architecture == "LlamaForCausalLM" and config.rope_theta == 1e6
    prompt = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert GreedyGenerator(model, 1, 72).generate([prompt], 32)[0] == ids[40:]


def test_dummy_qwen3_weights_keep_unit_norms(tmp_path):
    """Random weights for benchmarks: every RMSNorm, q/k norms included, starts at one."""
    path = _config_dir(tmp_path, QWEN3) / "config.json"
    model, config, _, _ = load_model(None, "dummy", "cpu", torch.float32,
                                     dummy_config=str(path))
    layer = model.layers[0]
    assert config.qk_norm and layer.q_norm.weight.shape == (128,)
    assert bool((layer.q_norm.weight == 1).all() and (layer.k_norm.weight == 1).all())
