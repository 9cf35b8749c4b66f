"""The Tokenizer the server uses, whatever the backend, and incremental detokenization.

A backend only maps text <-> ids; Tokenizer adds what the checkpoint says about BOS/EOS ids and
the chat template. IncrementalDetokenizer turns a stream of generated ids into text deltas that
never split a UTF-8 character and that add up to the one-shot decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from apex_grpc.tokenizer.chat import render_chat_template


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or of an unsupported kind."""


class TokenizerBackend(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...


class Tokenizer:
    """Text <-> ids for one checkpoint, plus its special ids and chat template."""

    def __init__(self, backend: TokenizerBackend, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], chat_template: str | None = None,
                 bos_token: str = "", eos_token: str = "") -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.chat_template = chat_template or None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """Display text of one token (for logprobs); partial UTF-8 shows as U+FFFD."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary "
                                 f"(size {self.vocab_size})")
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's jinja2 template (sandboxed). The result may
        already contain the BOS text, so encode it with add_special_tokens=False then."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def new_detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Text deltas for streamed ids.

    Each push decodes a short window that starts a few tokens back (so tokenizers whose pieces
    depend on their left neighbour, such as sentencepiece's leading space, render correctly) and
    emits the text past the previously emitted point. While the window ends in U+FFFD (a UTF-8
    character whose bytes are not all generated yet) the text is held back. The concatenated
    deltas plus flush() equal decode(prompt + output) minus decode(prompt); for byte-level BPE
    that is exactly decode(output). Special tokens are skipped, as in decode().
    """

    # Tokens of prompt kept as left context; enough for any leading-space rule.
    PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-self.PROMPT_CONTEXT:])
        self._prefix_offset = 0  # window start
        self._read_offset = len(self._ids)  # tokens up to here are already emitted as text

    def _pending_text(self) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        return full_text[len(prefix_text):]

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in new_ids)
        delta = self._pending_text()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end shows as U+FFFD)."""
        delta = self._pending_text()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta
