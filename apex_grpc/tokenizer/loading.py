"""Building a Tokenizer from a Hugging Face directory, from GGUF metadata, or as a byte fallback.

HF directory: tokenizer.json (preferred, as transformers' fast tokenizers do) or a sentencepiece
tokenizer.model; tokenizer_config.json for BOS/EOS strings, add_bos/add_eos, added special
tokens and the chat template (or chat_template.jinja beside it); EOS ids are the union of
generation_config.json, config.json and tokenizer_config.json.
GGUF: the byte-level BPE vocabulary and merges of `tokenizer.ggml.*` (model "gpt2").
"""

from __future__ import annotations

import json
import os
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from apex_grpc.tokenizer.backends import ByteBackend, HFTokenizersBackend, SentencePieceBackend
from apex_grpc.tokenizer.core import Tokenizer, TokenizerBackend, TokenizerError

# llama.cpp's token types (tokenizer.ggml.token_type)
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Llama-3's split regex (llama.cpp pre-tokenizer "llama-bpe"); others use GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _chat_template(model_dir: str, tokenizer_config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as file:
            return file.read()
    template = (tokenizer_config.get("chat_template")
                or _read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template"))
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _eos_ids(model_dir: str, eos_from_tokenizer: int | None) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(os.path.join(model_dir, name)).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else ([] if value is None else [value]))
    if eos_from_tokenizer is not None:
        ids.append(eos_from_tokenizer)
    return list(dict.fromkeys(int(i) for i in ids))


def _hf_backend(model_dir: str, tokenizer_config: dict[str, Any]) -> TokenizerBackend:
    json_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(json_path):
        try:
            return HFTokenizersBackend(tokenizers.Tokenizer.from_file(json_path))
        except Exception as exc:  # tokenizers raises plain Exception on malformed files
            raise TokenizerError(f"cannot load {json_path}: {exc}") from exc
    model_path = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(model_path):
        added = tokenizer_config.get("added_tokens_decoder") or {}
        extra = {str(entry["content"]): int(token_id) for token_id, entry in added.items()
                 if isinstance(entry, dict) and entry.get("special")}
        return SentencePieceBackend(model_path, bool(tokenizer_config.get("add_bos_token", True)),
                                    bool(tokenizer_config.get("add_eos_token", False)), extra)
    raise TokenizerError(f"{model_dir}: no tokenizer.json or tokenizer.model")


def _token_id(backend: TokenizerBackend, text: str) -> int | None:
    if not text:
        return None
    ids = backend.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def load_tokenizer(model_dir: str) -> Tokenizer:
    """Tokenizer of a Hugging Face checkpoint directory."""
    if not os.path.isdir(model_dir):
        raise TokenizerError(f"{model_dir} is not a directory")
    tokenizer_config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    backend = _hf_backend(model_dir, tokenizer_config)
    bos_token = _token_text(tokenizer_config.get("bos_token"))
    eos_token = _token_text(tokenizer_config.get("eos_token"))
    bos_id = _token_id(backend, bos_token)
    if bos_id is None:
        bos_id = _read_json(os.path.join(model_dir, "config.json")).get("bos_token_id")
    return Tokenizer(backend, bos_id, _eos_ids(model_dir, _token_id(backend, eos_token)),
                     _chat_template(model_dir, tokenizer_config), bos_token, eos_token)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit before the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    return byte_level


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """Tokenizer from GGUF metadata (`tokenizer.ggml.*` keys, values already decoded)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level "
                             "BPE ('gpt2')")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token, kind_id in zip(tokens, token_types) if kind_id == _GGUF_CONTROL])
    tokenizer.add_tokens([
        tokenizers.AddedToken(token, special=False, normalized=False)
        for token, kind_id in zip(tokens, token_types) if kind_id == _GGUF_USER_DEFINED])
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B",
            special_tokens=[(tokens[bos_id], bos_id)])
    return Tokenizer(HFTokenizersBackend(tokenizer), bos_id,
                     () if eos_id is None else (int(eos_id),),
                     metadata.get("tokenizer.chat_template"),
                     tokens[bos_id] if bos_id is not None else "",
                     tokens[eos_id] if eos_id is not None else "")


def byte_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """The fallback for dummy checkpoints: UTF-8 bytes as ids, no BOS, no chat template."""
    return Tokenizer(ByteBackend(vocab_size), None, eos_token_ids)
