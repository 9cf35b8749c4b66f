"""Tokenizers: sentencepiece, tokenizer.json and GGUF byte-level BPE against their references;
incremental detokenization; chat templates; the byte fallback."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from apex_grpc.tokenizer import ChatTemplateError, Tokenizer, byte_tokenizer, load_tokenizer

TRICKY = ["Hello world", "  leading spaces", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧", "CJK 日本語の文章 中文",
          "tabs\tand\nnewlines\n\n", "numbers 12345 and 3.14", "ünïcödé àccents",
          "<|im_start|>user\nhi<|im_end|>", "<|begin|>special<|end|> inside"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本?"}]


def _streamed(tokenizer: Tokenizer, prompt: list[int], output: list[int]) -> str:
    detokenizer = tokenizer.new_detokenizer(prompt)
    deltas = [detokenizer.push([token_id]) for token_id in output]
    assert not any("\ufffd" in delta for delta in deltas), deltas
    return "".join(deltas) + detokenizer.flush()


# ---- sentencepiece -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    words = ["apple", "banana", "cherry", "river", "mountain", "forest", "quick", "brown",
             "über", "café", "naïve", "stream", "token", "piece"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(directory / "tokenizer"),
        vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        minloglevel=2)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def test_sentencepiece_ids_equal_sentencepiece_encode(sentencepiece_dir):
    tokenizer = load_tokenizer(str(sentencepiece_dir))
    reference = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    for text in ["quick brown river", "café über naïve", "unseen words ✓ 日本", " two  spaces"]:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)
        assert tokenizer.encode(text) == [reference.bos_id()] + reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(reference.encode(text))
    assert tokenizer.bos_token_id == reference.bos_id()
    assert reference.eos_id() in tokenizer.eos_token_ids
    # The BOS text inside a prompt (as Llama-2 chat templates emit it) is the BOS id.
    assert tokenizer.encode("<s>river", add_special_tokens=False)[0] == reference.bos_id()


def test_sentencepiece_round_trip_and_streaming(sentencepiece_dir):
    tokenizer = load_tokenizer(str(sentencepiece_dir))
    text = "quick brown forest café über naïve stream ✓ 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    prompt, output = ids[:3], ids[3:]
    expected = tokenizer.decode(ids)[len(tokenizer.decode(prompt)):]
    assert _streamed(tokenizer, prompt, output) == expected


# ---- tokenizer.json --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_json_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRICKY * 20 + ["the quick brown fox jumps"] * 50, trainer)
    begin = tokenizer.token_to_id("<|begin|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", begin)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>",
        "eos_token": "<|end|>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ bos_token if loop.first }}<{{ m['role'] }}>"
                         "{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"}))
    return directory


def test_tokenizer_json_matches_transformers(tokenizer_json_dir):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_json_dir))
    tokenizer = load_tokenizer(str(tokenizer_json_dir))
    for text in TRICKY:
        for add_special in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=add_special)
            assert ids == reference.encode(text, add_special_tokens=add_special), text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.eos_token_ids == (reference.eos_token_id,)
    assert tokenizer.apply_chat_template(CHAT) == reference.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)


def test_tokenizer_json_streaming_equals_one_shot_decode(tokenizer_json_dir):
    tokenizer = load_tokenizer(str(tokenizer_json_dir))
    ids = tokenizer.encode(" ".join(TRICKY))
    assert _streamed(tokenizer, ids[:5], ids[5:]) == tokenizer.decode(ids[5:])


# ---- GGUF byte-level BPE (SmolLM2) ----------------------------------------------------------

def test_gguf_tokenizer_matches_transformers(smollm2, hf_gguf_tokenizer):
    tokenizer = smollm2[2]
    for text in TRICKY + ["x 1 22 333 4444", "  \n  indented\n"]:
        assert tokenizer.encode(text) == hf_gguf_tokenizer.encode(text), text
    assert tokenizer.apply_chat_template(CHAT) == hf_gguf_tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)
    im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == list(tokenizer.eos_token_ids)
    assert tokenizer.decode(im_end) == ""
    assert tokenizer.decode(im_end, skip_special_tokens=False) == "<|im_end|>"


def test_gguf_streaming_never_splits_a_character(smollm2):
    tokenizer = smollm2[2]
    ids = tokenizer.encode("Emoji 🙂👍🏽, CJK 日本語の文章, accents àéîõü and 👨‍👩‍👧.")
    assert _streamed(tokenizer, ids[:2], ids[2:]) == tokenizer.decode(ids[2:])
    assert tokenizer.id_to_token(tokenizer.encode(" Paris")[0]).startswith(" ")


# ---- chat templates and the byte fallback ---------------------------------------------------

def test_chat_template_is_sandboxed_and_errors_are_named():
    unsafe = Tokenizer(byte_tokenizer(256).backend, None, (),
                       chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        unsafe.apply_chat_template(CHAT)
    strict = Tokenizer(byte_tokenizer(256).backend, None, (),
                       chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="no chat template"):
        byte_tokenizer(256).apply_chat_template(CHAT)


def test_byte_fallback_round_trips_utf8():
    tokenizer = byte_tokenizer(300, (299,))
    text = "plain, ünï and 🙂"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.decode(ids) == text
    assert _streamed(tokenizer, [], ids) == text
    assert tokenizer.decode([299]) == "<299>" and tokenizer.eos_token_ids == (299,)
