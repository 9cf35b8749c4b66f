"""Tokenizers for every checkpoint kind the server loads (see core.py for the shared API)."""

from __future__ import annotations

from apex_grpc.tokenizer.chat import ChatTemplateError
from apex_grpc.tokenizer.core import IncrementalDetokenizer, Tokenizer, TokenizerError
from apex_grpc.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from apex_grpc.tokenizer.loading import byte_tokenizer, load_tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "TokenizerError",
           "byte_tokenizer", "load_tokenizer", "tokenizer_from_gguf_metadata"]
