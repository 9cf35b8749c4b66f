"""Tokenizer backends: `tokenizers` (tokenizer.json, GGUF BPE), sentencepiece, raw bytes."""

from __future__ import annotations

import re
from collections.abc import Sequence

import sentencepiece as spm
import tokenizers


class HFTokenizersBackend:
    """A `tokenizers.Tokenizer`: normalizer, pre-tokenizer, model, post-processor (BOS) and
    added special tokens all come from tokenizer.json (or are built from GGUF metadata)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class SentencePieceBackend:
    """A sentencepiece tokenizer.model. Special-token strings in the text (control pieces such
    as <s>, and any added special tokens) are cut out and mapped to their ids, the segments
    between them are encoded by sentencepiece; BOS/EOS are added as tokenizer_config says."""

    def __init__(self, model_path: str, add_bos: bool, add_eos: bool,
                 extra_special: dict[str, int] | None = None) -> None:
        self.processor = spm.SentencePieceProcessor(model_file=model_path)
        self.add_bos = add_bos
        self.add_eos = add_eos
        piece_count = self.processor.get_piece_size()
        self.special = {self.processor.id_to_piece(i): i for i in range(piece_count)
                        if self.processor.is_control(i)}
        self.special.update(extra_special or {})
        self.special_ids = frozenset(self.special.values())
        self._special_names = {token_id: name for name, token_id in self.special.items()}
        self.vocab_size = max([piece_count - 1, *self.special.values()]) + 1
        # Longest first so that one special string never shadows a longer one.
        names = sorted((s for s in self.special if s), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.processor.bos_id() >= 0:
            ids.append(self.processor.bos_id())
        segments = self._split.split(text) if self._split else [text]
        for index, segment in enumerate(segments):
            if index % 2:  # odd segments are the matched special strings
                ids.append(self.special[segment])
            elif segment:
                ids.extend(self.processor.encode(segment))
        if add_special_tokens and self.add_eos and self.processor.eos_id() >= 0:
            ids.append(self.processor.eos_id())
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        piece_count = self.processor.get_piece_size()
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        # Control pieces decode to "" in sentencepiece; render them as their text when kept.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._special_names and not skip_special_tokens:
                parts.append(self.processor.decode(run))
                parts.append(self._special_names[token_id])
                run = []
            elif 0 <= token_id < piece_count:
                run.append(token_id)
        parts.append(self.processor.decode(run))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str:
        if token_id >= self.processor.get_piece_size():
            return ""
        return self.processor.id_to_piece(token_id).replace("\u2581", " ")


class ByteBackend:
    """Fallback for checkpoints without a tokenizer (dummy weights): ids 0-255 are the UTF-8
    bytes of the text; higher ids (which random weights generate freely) decode to "<id>"."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"byte tokenizer needs vocab_size >= 256, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for token_id in ids:
            out.extend(bytes([token_id]) if token_id < 256 else f"<{token_id}>".encode())
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)
