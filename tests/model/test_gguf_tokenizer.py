"""The sentencepiece-BPE tokenizer of GGUF files (tokenizer.ggml.model "llama": Llama-2,
Mistral), built from pieces, scores and types, against sentencepiece itself.

The model is trained here with identity normalization and no whitespace collapsing, as Llama-2's
is: a GGUF file cannot describe sentencepiece's normalizer, and llama.cpp applies none.
"""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf_writing import write_llama_gguf

from apex_grpc.model import load_model
from apex_grpc.model.gguf_loader import gguf_metadata, open_gguf
from apex_grpc.tokenizer import Tokenizer, TokenizerError, tokenizer_from_gguf_metadata

WORDS = ["apple", "banana", "cherry", "river", "mountain", "forest", "quick", "brown", "über",
         "café", "naïve", "stream", "token", "piece", "日本語", "東京", "2024", "31415"]
TRICKY = ["Hello world", "quick brown river", " leading space", "   three leading",
          "multiple   spaces  inside ", "emoji 🙂👍🏽 and ZWJ 👨\u200d👩\u200d👧",
          "CJK 日本語の文章 中文 東京", "digits 12345 67890 3.14", "über café naïve",
          "tabs\tand\nnewlines\n\n", " ", "riverbanana"]
VOCAB_SIZE = 320


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> spm.SentencePieceProcessor:
    prefix = tmp_path_factory.mktemp("spm_gguf") / "tokenizer"
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(300)]
    corpus += ["  two spaces  and   three", " leading space", "digits 12345 67890"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def _piece_type(processor: spm.SentencePieceProcessor, piece_id: int) -> int:
    """llama.cpp's token types, which reuse sentencepiece's numbering."""
    for token_type, is_type in ((2, processor.is_unknown), (3, processor.is_control),
                                (5, processor.is_unused), (6, processor.is_byte)):
        if is_type(piece_id):
            return token_type
    return 1


def _tokenizer_metadata(processor: spm.SentencePieceProcessor):
    """What llama.cpp's converter writes for a sentencepiece vocabulary."""
    piece_ids = range(processor.get_piece_size())

    def add(writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([processor.id_to_piece(i) for i in piece_ids])
        writer.add_token_scores([processor.get_score(i) for i in piece_ids])
        writer.add_token_types([_piece_type(processor, i) for i in piece_ids])
        writer.add_bos_token_id(processor.bos_id())
        writer.add_eos_token_id(processor.eos_id())
        writer.add_unk_token_id(processor.unk_id())
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
    return add


@pytest.fixture(scope="module")
def vocab_gguf(processor, tmp_path_factory):
    """A GGUF file holding only the tokenizer metadata."""
    path = tmp_path_factory.mktemp("spm_gguf_file") / "vocab.gguf"
    writer = GGUFWriter(str(path), "llama")
    _tokenizer_metadata(processor)(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab_gguf) -> Tokenizer:
    return tokenizer_from_gguf_metadata(gguf_metadata(open_gguf(str(vocab_gguf))))


def _random_texts(processor: spm.SentencePieceProcessor, count: int) -> list[str]:
    """Vocabulary characters, spaces and unseen characters (byte fallback), mixed."""
    rng = random.Random(0)
    alphabet = sorted({char for word in WORDS for char in word}) + [" ", " ", "\n", "é", "🙂",
                                                                  "Ω", "ß", "中", "\t"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
            for _ in range(count)]


def test_ids_equal_sentencepiece_encode(tokenizer, processor):
    for text in TRICKY + _random_texts(processor, 300):
        assert tokenizer.encode(text, add_special_tokens=False) == processor.encode(text), text
        assert tokenizer.encode(text) == [processor.bos_id()] + processor.encode(text), text
    # Characters outside the vocabulary become their UTF-8 bytes.
    emoji_ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert [processor.id_to_piece(i) for i in emoji_ids[-4:]] == [
        "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_decode_round_trips_and_matches_sentencepiece(tokenizer, processor):
    for text in TRICKY + _random_texts(processor, 100):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids) == processor.decode(ids)


def test_special_tokens_and_streaming(tokenizer, processor):
    assert tokenizer.bos_token_id == processor.bos_id() and tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token_ids == (processor.eos_id(),) and tokenizer.vocab_size == VOCAB_SIZE
    # Control-token text in a prompt is the token itself; the text after it gets the dummy
    # prefix again, as llama.cpp does after a special token.
    assert tokenizer.encode("<s>river</s>", add_special_tokens=False) == (
        [processor.bos_id()] + processor.encode("river") + [processor.eos_id()])
    assert tokenizer.decode(tokenizer.encode("<s>river</s>")) == "river"
    text = " ".join(TRICKY)
    ids = tokenizer.encode(text)
    detokenizer = tokenizer.new_detokenizer(ids[:3])
    deltas = [detokenizer.push([token_id]) for token_id in ids[3:]]
    assert not any("\ufffd" in delta for delta in deltas)
    expected = tokenizer.decode(ids)[len(tokenizer.decode(ids[:3])):]
    assert "".join(deltas) + detokenizer.flush() == expected


def test_matches_transformers_gguf_tokenizer(tokenizer, vocab_gguf):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(str(vocab_gguf.parent),
                                                           gguf_file=vocab_gguf.name)
    # transformers' Metaspace skips the dummy prefix when the text already starts with a space
    # (sentencepiece and llama.cpp do not), so leading-space strings are left to the
    # sentencepiece test above.
    for text in [t for t in TRICKY if not t.startswith(" ")]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_model_gguf_loads_with_its_sentencepiece_tokenizer(tiny_hf_checkpoint, processor,
                                                          tmp_path):
    hf_model = tiny_hf_checkpoint("llama_gqa", vocab_size=VOCAB_SIZE).hf_model
    path = tmp_path / "llama2-like.gguf"
    write_llama_gguf(path, hf_model, GGMLQuantizationType.F32,
                     add_tokenizer=_tokenizer_metadata(processor))
    _, config, tokenizer, _ = load_model(str(path), "auto", "cpu", torch.float32)
    assert tokenizer is not None and tokenizer.vocab_size == config.vocab_size
    assert config.eos_token_ids == tokenizer.eos_token_ids == (processor.eos_id(),)
    assert tokenizer.encode("quick brown") == [processor.bos_id()] + processor.encode(
        "quick brown")


def test_unsupported_or_malformed_tokenizer_metadata_is_named():
    with pytest.raises(TokenizerError, match="GGUF tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="lacks tokenizer.ggml.scores"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "llama",
                                      "tokenizer.ggml.tokens": ["<unk>", "a"]})
    with pytest.raises(TokenizerError, match="merge 'a b' does not form a vocabulary token"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
                                      "tokenizer.ggml.tokens": ["a", "b"],
                                      "tokenizer.ggml.merges": ["a b"]})
