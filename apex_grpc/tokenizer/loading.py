"""Building a Tokenizer from a Hugging Face directory, or as a byte fallback.

HF directory: tokenizer.json (preferred, as transformers' fast tokenizers do) or a sentencepiece
tokenizer.model; tokenizer_config.json for BOS/EOS strings, add_bos/add_eos, added special
tokens and the chat template (or chat_template.jinja beside it); EOS ids are the union of
generation_config.json, config.json and tokenizer_config.json.
GGUF metadata tokenizers are built in gguf_vocab.py.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tokenizers

from apex_grpc.tokenizer.backends import ByteBackend, HFTokenizersBackend, SentencePieceBackend
from apex_grpc.tokenizer.core import Tokenizer, TokenizerBackend, TokenizerError


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


def byte_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """The fallback for dummy checkpoints: UTF-8 bytes as ids, no BOS, no chat template."""
    return Tokenizer(ByteBackend(vocab_size), None, eos_token_ids)
