"""Tokenizers described by GGUF metadata (`tokenizer.ggml.*`), built as `tokenizers.Tokenizer`s.

Two kinds, named by tokenizer.ggml.model:
- "gpt2": byte-level BPE with the file's merges (Llama-3, SmolLM2, Qwen2, Qwen3), split into
  words first by the regex its tokenizer.ggml.pre names (an unknown name is refused: another
  split gives other ids).
- "llama": sentencepiece BPE (Llama-2, Mistral). The file has pieces, scores and types but no
  merges: sentencepiece merges the adjacent pair whose concatenation is the highest-scoring
  normal piece, so every split of a normal piece into two vocabulary pieces becomes a merge,
  ranked by that piece's score. Spaces become U+2581, a dummy prefix space is prepended
  (tokenizer.ggml.add_space_prefix, default true), and characters outside the vocabulary fall
  back to their UTF-8 bytes as <0xNN> pieces.
Control tokens are added as special tokens (matched whole, skipped on decode), user-defined ones
as plain added tokens; BOS/EOS are added as add_bos_token/add_eos_token say.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from apex_grpc.tokenizer.backends import HFTokenizersBackend
from apex_grpc.tokenizer.core import Tokenizer, TokenizerError

# llama.cpp's token types (tokenizer.ggml.token_type), the same numbers as sentencepiece's.
_NORMAL = 1
_CONTROL = 3
_USER_DEFINED = 4

# sentencepiece's visible space.
_SPACE_MARK = "\u2581"

# Llama-3's split regex (llama.cpp pre-tokenizer "llama-bpe"); others use GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/Qwen3 ("qwen2"): Llama-3's split but one digit per piece.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre values whose split we know ("default", "gpt2" or none: GPT-2's regex).
_PRE_TOKENIZERS = ("default", "gpt2", "llama-bpe", "qwen2", "smollm")


def _required(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise TokenizerError(f"GGUF metadata lacks {key}")
    return metadata[key]


def _regex_then_bytes(split: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
                             f"supported; supported: {', '.join(_PRE_TOKENIZERS)}")
    if pre == "llama-bpe":
        return _regex_then_bytes(_LLAMA3_SPLIT)
    if pre == "qwen2":
        return _regex_then_bytes(_QWEN2_SPLIT)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit before the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    return byte_level


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str],
                    token_types: list[int]) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1))
              for merge in _required(metadata, "tokenizer.ggml.merges")]
    for pair in merges:
        # tokenizers panics (not a Python error) on a merge whose result is not a token.
        if len(pair) != 2 or "".join(pair) not in vocab:
            raise TokenizerError(f"GGUF merge {' '.join(pair)!r} does not form a vocabulary "
                                 "token")
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = tokenizers.Tokenizer(bpe)
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    if pre == "qwen2":  # Qwen's own tokenizer composes the text (NFC) before splitting it
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float],
                       token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's score-greedy merging: (left, right) for every
    normal piece that splits into two vocabulary pieces, best-scoring piece first."""
    vocab = set(tokens)
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, (token, score, token_type) in enumerate(zip(tokens, scores, token_types)):
        if token_type != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str],
                       token_types: list[int]) -> tokenizers.Tokenizer:
    scores = list(_required(metadata, "tokenizer.ggml.scores"))
    if len(scores) != len(tokens):
        raise TokenizerError(f"GGUF tokenizer has {len(tokens)} tokens but {len(scores)} scores")
    unknown_id = metadata.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                     merges=merges_from_scores(tokens, scores, token_types),
                     unk_token=None if unknown_id is None else _token_at(tokens, unknown_id),
                     fuse_unk=True, byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(bpe)
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer rather than a Metaspace pre-tokenizer: Metaspace skips the dummy prefix when
    # the text already starts with a space, sentencepiece and llama.cpp always prepend it.
    steps = [normalizers.Prepend(_SPACE_MARK)] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE_MARK)])
    decode_steps = [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # drop the dummy prefix again
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _token_at(tokens: list[str], token_id: Any) -> str:
    if not 0 <= int(token_id) < len(tokens):
        raise TokenizerError(f"GGUF special token id {token_id} outside the vocabulary "
                             f"(size {len(tokens)})")
    return tokens[int(token_id)]


def _add_vocab_tokens(tokenizer: tokenizers.Tokenizer, tokens: list[str],
                      token_types: list[int]) -> None:
    """Control and user-defined tokens are matched whole in the text, before the model."""
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types) if token_type == _CONTROL])
    tokenizer.add_tokens([
        tokenizers.AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types) if token_type == _USER_DEFINED])


def _add_bos_eos(tokenizer: tokenizers.Tokenizer, bos: tuple[str, int] | None,
                 eos: tuple[str, int] | None) -> None:
    if bos is None and eos is None:
        return
    parts = [bos[0]] if bos else []
    parts.append("$A")
    parts += [eos[0]] if eos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(parts), special_tokens=[token for token in (bos, eos) if token])


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """Tokenizer from GGUF metadata (`tokenizer.ggml.*` keys, values already decoded)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; supported: "
                             "'gpt2' (byte-level BPE), 'llama' (sentencepiece BPE)")
    tokens = [str(token) for token in _required(metadata, "tokenizer.ggml.tokens")]
    token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type")
                   or [_NORMAL] * len(tokens)]
    if len(token_types) != len(tokens):
        raise TokenizerError(f"GGUF tokenizer has {len(tokens)} tokens but "
                             f"{len(token_types)} token types")
    try:
        tokenizer = _BUILDERS[kind](metadata, tokens, token_types)
    except TokenizerError:
        raise
    except Exception as exc:  # tokenizers raises plain Exception, e.g. for a merge of unknowns
        raise TokenizerError(f"GGUF tokenizer ({kind}) cannot be built: {exc}") from exc
    _add_vocab_tokens(tokenizer, tokens, token_types)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    bos_token = "" if bos_id is None else _token_at(tokens, bos_id)
    eos_token = "" if eos_id is None else _token_at(tokens, eos_id)
    # llama.cpp adds BOS for sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    _add_bos_eos(tokenizer,
                 (bos_token, int(bos_id)) if add_bos and bos_id is not None else None,
                 (eos_token, int(eos_id)) if add_eos and eos_id is not None else None)
    return Tokenizer(HFTokenizersBackend(tokenizer), None if bos_id is None else int(bos_id),
                     () if eos_id is None else (int(eos_id),),
                     metadata.get("tokenizer.chat_template"), bos_token, eos_token)
