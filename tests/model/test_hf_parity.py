"""Our model, loaded from checkpoints transformers saved, matches transformers itself.

Every run goes through the real seam: a paged KV cache (block size 16) and TorchPagedAttention,
prefill (whole or chunked) followed by step-by-step batched decode.
"""

from __future__ import annotations

import pytest
import torch

from apex_grpc.model import load_model
from apex_grpc.model.greedy import GreedyGenerator
from hf_reference import hf_greedy, relative_error

PROMPT_LEN = 64
NUM_GREEDY = 32
MAX_RELATIVE_ERROR = 1e-4
# Every variant of tests/conftest.py TINY_VARIANTS (named here: parametrize needs them at
# collection time, and test modules should not import conftest).
VARIANTS = ["head_dim_48", "llama3_rope", "llama_gqa", "llama_tied", "mistral", "qwen2_bias",
            "qwen3_tied", "qwen3_untied"]


def _prompt(seed: int, vocab_size: int = 256) -> list[int]:
    return torch.randint(0, vocab_size, (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(seed)).tolist()



@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_logits_and_greedy_match_transformers(tiny_hf_checkpoint, variant, chunk_size):
    checkpoint = tiny_hf_checkpoint(variant)
    model, config, _, _ = load_model(str(checkpoint.path), "auto", "cpu", torch.float32)
    prompts = [_prompt(1), _prompt(2)]
    with torch.no_grad():
        reference = checkpoint.hf_model(torch.tensor(prompts[:1])).logits[0]
    generator = GreedyGenerator(model, max_seqs=2, max_seq_len=PROMPT_LEN + NUM_GREEDY)
    logits = generator.prefill(0, prompts[0], chunk_size)
    assert relative_error(logits, reference) < MAX_RELATIVE_ERROR

    # Two sequences decoded together: batched decode must not mix their contexts.
    ours = generator.generate(prompts, NUM_GREEDY, chunk_size=chunk_size)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(checkpoint.hf_model, prompt, NUM_GREEDY)


def test_config_reflects_variant_features(tiny_hf_checkpoint):
    tied = load_model(str(tiny_hf_checkpoint("llama_tied").path), "auto", "cpu",
                      torch.float32)[1]
    qwen = load_model(str(tiny_hf_checkpoint("qwen2_bias").path), "auto", "cpu",
                      torch.float32)[1]
    rope = load_model(str(tiny_hf_checkpoint("llama3_rope").path), "auto", "cpu",
                      torch.float32)[1]
    assert tied.tie_word_embeddings and not qwen.tie_word_embeddings
    assert qwen.qkv_bias and qwen.architecture == "Qwen2ForCausalLM"
    assert rope.rope_theta == 500000.0 and rope.rope_scaling["rope_type"] == "llama3"
    qwen3 = load_model(str(tiny_hf_checkpoint("qwen3_untied").path), "auto", "cpu",
                       torch.float32)[1]
    assert qwen3.architecture == "Qwen3ForCausalLM" and qwen3.qk_norm
    assert (qwen3.head_dim, qwen3.hidden_size // qwen3.num_attention_heads) == (40, 24)
    assert not (qwen3.qkv_bias or qwen3.o_bias or qwen3.tie_word_embeddings or qwen.qk_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_float32(tiny_hf_checkpoint, dtype):
    checkpoint = tiny_hf_checkpoint("llama_gqa")
    prompt = _prompt(3)
    results = {}
    for run_dtype in (torch.float32, dtype):
        model = load_model(str(checkpoint.path), "auto", "cpu", run_dtype)[0]
        results[run_dtype] = GreedyGenerator(model, 1, PROMPT_LEN).prefill(0, prompt)
    assert results[dtype].dtype == torch.float32
    assert relative_error(results[dtype], results[torch.float32]) < 5e-2


def test_piecewise_layers_equal_forward(tiny_hf_checkpoint):
    """The NEO pipeline calls embed / pre_attention / attention / post_attention / final_norm
    itself; the pieces must compose to exactly forward()."""
    from apex_grpc.attention.layout import make_layout, paged_batch
    from apex_grpc.attention.torch_ref import TorchPagedAttention
    from apex_grpc.model.greedy import allocate_kv_cache

    model = load_model(str(tiny_hf_checkpoint("llama_gqa").path), "auto", "cpu",
                       torch.float32)[0]
    input_ids = torch.tensor(_prompt(4)[:20])
    positions = torch.arange(20)
    outputs = []
    for piecewise in (False, True):
        attn = TorchPagedAttention(allocate_kv_cache(model, 2, 16), model.config.head_dim ** -0.5)
        layout = make_layout(gpu_prefill=paged_batch(0, [[0, 1]], [0], [20], 16, "cpu"))

        def attend(layer_idx, q, k, v):
            out = torch.empty_like(q)
            attn.forward(layer_idx, q, k, v, layout, out)
            return out

        if not piecewise:
            outputs.append(model(input_ids, positions, attend))
            continue
        hidden, residual, rope = model.embed(input_ids), None, model.rope(positions)
        for layer_idx, layer in enumerate(model.layers):
            q, k, v, residual = layer.pre_attention(hidden, residual, rope)
            hidden, residual = layer.post_attention(attend(layer_idx, q, k, v), residual)
        outputs.append(model.final_norm(hidden, residual))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
