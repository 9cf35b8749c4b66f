"""Qwen2 and Qwen3 GGUF files, written here from tiny transformers checkpoints the way llama.cpp's
converter writes them (architectures qwen2/qwen3, NEOX RoPE rows left alone, q/k/v biases,
q/k norms, a byte-level BPE tokenizer with the "qwen2" pre-tokenizer and a chat template), serve
the same greedy tokens as their HF originals, and their tokenizer is the HF tokenizer's."""

from __future__ import annotations

import copy

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf_writing import byte_level_bpe_metadata, head_dim, quantize_round_trip, write_gguf

from apex_grpc.model import load_model
from apex_grpc.model.greedy import GreedyGenerator
from hf_reference import hf_greedy, relative_error

NUM_GREEDY = 32
# Code, accents (composed and decomposed: Qwen's tokenizer composes them), CJK, emoji, digits,
# special and added tokens in the text.
MIXED_TEXT = ("def f(x):\n    return x**2  # café naïve cafe\u0301 Ångström\n"
              "東京は日本の首都です。中文 한국어 🙂👍🏽 👨\u200d👩\u200d👧 12345 3.14\t"
              "<|im_start|>user <think>why?</think> It's done.\n\n")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And in 日本語? 🙂"}]
ARCHES = {"qwen2_bias": "qwen2", "qwen3_tied": "qwen3", "qwen3_untied": "qwen3"}




@torch.no_grad()
def _top_k(hf_model, ids: list[int], k: int = 5) -> list[int]:
    return hf_model(torch.tensor([ids])).logits[0, -1].topk(k).indices.tolist()


def _assert_close_greedy(ours: list[int], original, quantized, prompt: list[int]) -> None:
    """A quantized file may flip a near-tie of the original (random tiny models have many):
    the tokens agree up to the first difference, and there each side's token is in the other
    model's top 5 (vLLM's criterion)."""
    theirs = hf_greedy(original, prompt, len(ours))
    for step, (mine, their) in enumerate(zip(ours, theirs)):
        if mine != their:
            context = prompt + ours[:step]
            assert mine in _top_k(original, context) and their in _top_k(quantized, context)
            return


def _round_tripped(hf_model, tensor_type: GGMLQuantizationType):
    """hf_model with every matrix replaced by what the GGUF file holds after quantization."""
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for param in model.parameters():
            values = quantize_round_trip(param.detach().numpy(), tensor_type)
            param.copy_(torch.from_numpy(values.copy()))
    return model


def _write(checkpoint, tokenizer, path, tensor_type: GGMLQuantizationType) -> None:
    hf_model = checkpoint.hf_model
    write_gguf(path, hf_model, tensor_type, arch=hf_model.config.model_type,
               add_tokenizer=byte_level_bpe_metadata(tokenizer, hf_model.config.vocab_size,
                                                     pre="qwen2"))


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("variant", sorted(ARCHES))
def test_gguf_serves_the_hf_original_greedy_tokens(tiny_qwen_checkpoint, tiny_bpe_tokenizer,
                                                   tmp_path, variant, tensor_type):
    qtype = GGMLQuantizationType[tensor_type]
    checkpoint = tiny_qwen_checkpoint(variant)
    path = tmp_path / f"{variant}-{tensor_type}.gguf"
    _write(checkpoint, tiny_bpe_tokenizer, path, qtype)
    model, config, tokenizer, _ = load_model(str(path), "auto", "cpu", torch.float32)
    hf_config = checkpoint.hf_model.config
    assert config.architecture == type(checkpoint.hf_model).__name__
    assert (config.head_dim, config.tie_word_embeddings, config.qk_norm, config.qkv_bias) == (
        head_dim(hf_config), hf_config.tie_word_embeddings, variant.startswith("qwen3"),
        variant == "qwen2_bias")
    prompts = [tokenizer.encode(MIXED_TEXT), tokenizer.encode(
        tokenizer.apply_chat_template(CHAT), add_special_tokens=False)]
    # The exact reference is the HF model holding the file's (dequantized) weights (for F32
    # the original itself): the same logits and all greedy tokens identical.
    reference = _round_tripped(checkpoint.hf_model, qtype)
    generator = GreedyGenerator(model, max_seqs=2, max_seq_len=max(map(len, prompts)) + 40)
    with torch.no_grad():
        expected = reference(torch.tensor([prompts[0]])).logits[0]
        original = checkpoint.hf_model(torch.tensor([prompts[0]])).logits[0]
    logits = generator.prefill(0, prompts[0], chunk_size=16)
    assert relative_error(logits, expected) < 1e-4
    # Quantization moves the logits of these random weights by a few percent.
    assert relative_error(logits, original) < (1e-4 if tensor_type == "F32" else 5e-2)
    ours = GreedyGenerator(model, 2, max(map(len, prompts)) + NUM_GREEDY).generate(
        prompts, NUM_GREEDY, chunk_size=16)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(reference, prompt, NUM_GREEDY)
        if qtype == GGMLQuantizationType.F32:
            assert tokens == hf_greedy(checkpoint.hf_model, prompt, NUM_GREEDY)
        else:
            _assert_close_greedy(tokens, checkpoint.hf_model, reference, prompt)


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory, tiny_bpe_tokenizer):
    """A qwen3 GGUF (weights do not matter here) and the HF tokenizer it was written from."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=336, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16)
    path = tmp_path_factory.mktemp("qwen3_gguf") / "qwen3.gguf"
    write_gguf(path, transformers.Qwen3ForCausalLM(config).eval(), GGMLQuantizationType.F32,
               arch="qwen3", add_tokenizer=byte_level_bpe_metadata(tiny_bpe_tokenizer, 336,
                                                                   pre="qwen2"))
    return path


def test_gguf_tokenizer_matches_the_hf_tokenizer(qwen3_gguf, tiny_bpe_tokenizer):
    _, config, tokenizer, _ = load_model(str(qwen3_gguf), "auto", "cpu", torch.float32)
    reference = tiny_bpe_tokenizer
    texts = [MIXED_TEXT, " leading space", "naïve cafe\u0301", "1234567", "🙂", "a\n\n\nb  c"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False)
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    # Ids only show a wrong split where the vocabulary has a merge across it (this one has no
    # digit pairs), so compare the words the text is split into as well.
    ours, theirs = tokenizer.backend.tokenizer, reference.backend_tokenizer
    for text in texts:
        normalized = theirs.normalizer.normalize_str(text)
        assert ours.normalizer.normalize_str(text) == normalized
        assert (ours.pre_tokenizer.pre_tokenize_str(normalized)
                == theirs.pre_tokenizer.pre_tokenize_str(normalized))
    # The text exercised merges, special and added tokens.
    ids = tokenizer.encode(MIXED_TEXT)
    assert len(ids) < len(MIXED_TEXT.encode()) and reference.convert_tokens_to_ids(
        ["<|im_start|>", "<think>", "</think>"]) == [i for i in ids if i >= 317][:3]
    # Special ids come from the file; the embedding rows past the tokenizer are [PAD] ids.
    assert config.vocab_size == tokenizer.vocab_size == 336
    assert tokenizer.eos_token_ids == config.eos_token_ids == (reference.eos_token_id,)
    assert tokenizer.bos_token_id is None


def test_gguf_chat_template_renders_like_transformers(qwen3_gguf, tiny_bpe_tokenizer):
    tokenizer = load_model(str(qwen3_gguf), "auto", "cpu", torch.float32)[2]
    for messages, generation_prompt in ((CHAT, True), (CHAT[:3], False)):
        expected = tiny_bpe_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert tokenizer.apply_chat_template(messages, generation_prompt) == expected
    assert "<think>\nadd them" not in tokenizer.apply_chat_template(CHAT)  # earlier reasoning
    assert "<think>\nadd them" in tokenizer.apply_chat_template(CHAT[:3], False)


def test_qwen2_gguf_reads_like_transformers_gguf_loader(tiny_qwen_checkpoint,
                                                        tiny_bpe_tokenizer, tmp_path):
    """transformers' own GGUF loader reads our qwen2 file to the original logits: the writer
    follows the converter's conventions, not just our loader's."""
    import transformers

    checkpoint = tiny_qwen_checkpoint("qwen2_bias")
    path = tmp_path / "qwen2.gguf"
    _write(checkpoint, tiny_bpe_tokenizer, path, GGMLQuantizationType.F32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = tiny_bpe_tokenizer.encode(MIXED_TEXT)
    with torch.no_grad():
        expected = checkpoint.hf_model(torch.tensor([prompt])).logits[0]
        assert relative_error(theirs(torch.tensor([prompt])).logits[0], expected) < 1e-5
    model = load_model(str(path), "auto", "cpu", torch.float32)[0]
    logits = GreedyGenerator(model, 1, len(prompt)).prefill(0, prompt)
    assert relative_error(logits, expected) < 1e-4
