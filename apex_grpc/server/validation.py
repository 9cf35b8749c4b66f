"""Validation of apex.v1.GenerateRequest: wire message -> engine request parameters.

Owns every input rule of the public contract. Each rejection raises ValidationError whose
message starts with the offending field's name (e.g. "sampling.temperature ..."), so a client
can tell which field to fix; the servicer turns it into INVALID_ARGUMENT. Static checks run
first, then the prompt is tokenized (or the chat template rendered) and its length checked.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from apex_grpc.config import EngineConfig
from apex_grpc.proto import generation_pb2
from apex_grpc.request import MAX_TOP_LOGPROBS, SamplingParams, StoppingParams

MAX_REQUEST_ID_LEN = 128
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
DEFAULT_MAX_NEW_TOKENS = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")


class ValidationError(ValueError):
    """A GenerateRequest field is missing or out of range; the message names the field."""


@dataclass(frozen=True)
class ValidatedRequest:
    """Everything the engine and the response writer need, checked and defaulted."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    return_token_ids: bool
    return_logprobs: bool


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    max_model_len: int
    max_stop_strings: int = EngineConfig.max_stop_strings
    max_prompt_len: int | None = None  # an operator's cap below the context limit


class RequestValidator:
    """Turns GenerateRequests into ValidatedRequests for one model and tokenizer."""

    def __init__(self, tokenizer: Any, limits: ModelLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def check_static(self, request: generation_pb2.GenerateRequest) -> None:
        """Checks that need no tokenizer work (cheap: run them before anything else)."""
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise ValidationError(f"request_id is {len(request.request_id)} characters long; "
                                  f"at most {MAX_REQUEST_ID_LEN} are allowed")
        self._check_input_shape(request)
        _check_sampling(request.sampling)
        self._check_stopping(request.stopping)
        if request.response.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValidationError(f"response.top_logprobs must be <= {MAX_TOP_LOGPROBS}, "
                                  f"got {request.response.top_logprobs}")

    def prompt_ids(self, request: generation_pb2.GenerateRequest) -> list[int]:
        """Token ids of the request's input (may run the tokenizer and the chat template)."""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            add_special = (request.add_special_tokens
                           if request.HasField("add_special_tokens") else True)
            ids = list(self.tokenizer.encode(request.text, add_special_tokens=add_special))
        else:
            ids = self._render_chat(request.chat)
        if not ids:
            raise ValidationError(f"{kind} encodes to zero tokens")
        return ids

    def finish(self, request: generation_pb2.GenerateRequest,
               prompt_ids: list[int]) -> ValidatedRequest:
        """Length checks and defaults once the prompt's token ids are known."""
        kind = request.WhichOneof("input")
        max_model_len = self.limits.max_model_len
        room = max_model_len - len(prompt_ids)
        cap = self.limits.max_prompt_len
        if cap is not None and len(prompt_ids) > cap:
            raise ValidationError(f"{kind} is {len(prompt_ids)} tokens long; this server "
                                  f"accepts prompts of at most {cap} tokens (--max-prompt-len)")
        if room < 1:
            raise ValidationError(
                f"{kind} is {len(prompt_ids)} tokens long; the context (max_model_len) is "
                f"{max_model_len} tokens and at least one must be left for generation")
        stopping_msg = request.stopping
        min_new_tokens = stopping_msg.min_new_tokens
        if stopping_msg.HasField("max_new_tokens"):
            max_new_tokens = stopping_msg.max_new_tokens
        else:
            # Unset: a modest default, raised to honour min_new_tokens, never past the context.
            max_new_tokens = min(max(DEFAULT_MAX_NEW_TOKENS, min_new_tokens), room)
        if min_new_tokens > max_new_tokens:
            raise ValidationError(
                f"stopping.min_new_tokens ({min_new_tokens}) must be <= "
                f"stopping.max_new_tokens ({max_new_tokens})")
        return ValidatedRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            sampling=_sampling_params(request),
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                stop_strings=tuple(stopping_msg.stop_strings),
                stop_token_ids=tuple(stopping_msg.stop_token_ids),
                include_stop_strings=stopping_msg.include_stop_strings,
                ignore_eos=stopping_msg.ignore_eos,
                time_limit_ms=(stopping_msg.time_limit_ms
                               if stopping_msg.HasField("time_limit_ms") else None),
            ),
            return_token_ids=request.response.token_ids,
            return_logprobs=_wants_logprobs(request.response),
        )

    def _check_input_shape(self, request: generation_pb2.GenerateRequest) -> None:
        kind = request.WhichOneof("input")
        if kind is None:
            raise ValidationError("input is missing: set one of text, token_ids or chat")
        if kind == "text" and not request.text:
            raise ValidationError("text must not be empty")
        if kind in ("text", "chat") and self.tokenizer is None:
            raise ValidationError(f"{kind}: the model has no tokenizer; send token_ids")
        if kind == "token_ids":
            ids = request.token_ids.ids
            if not ids:
                raise ValidationError("token_ids.ids must not be empty")
            self._check_ids_in_vocab("token_ids.ids", ids)
        if kind == "chat":
            self._check_chat(request.chat)

    def _check_chat(self, chat: generation_pb2.ChatMessages) -> None:
        if not chat.messages:
            raise ValidationError("chat.messages must not be empty")
        for index, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise ValidationError(f"chat.messages[{index}].role {message.role!r} is not one "
                                      f"of {', '.join(CHAT_ROLES)}")
        if not self.tokenizer.has_chat_template:
            raise ValidationError("chat: the model has no chat template; send text or token_ids")

    def _render_chat(self, chat: generation_pb2.ChatMessages) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        add_generation_prompt = (chat.add_generation_prompt
                                 if chat.HasField("add_generation_prompt") else True)
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # template code may raise anything (jinja raise_exception)
            raise ValidationError(f"chat: the chat template rejected the messages: {exc}") from exc
        # The template writes its own special tokens (BOS included); adding them again doubles them.
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def _check_stopping(self, stopping: generation_pb2.StoppingCriteria) -> None:
        if stopping.HasField("max_new_tokens") and stopping.max_new_tokens == 0:
            raise ValidationError("stopping.max_new_tokens must be >= 1 (leave it unset for "
                                  "the default)")
        if (stopping.HasField("max_new_tokens")
                and stopping.min_new_tokens > stopping.max_new_tokens):
            raise ValidationError(
                f"stopping.min_new_tokens ({stopping.min_new_tokens}) must be <= "
                f"stopping.max_new_tokens ({stopping.max_new_tokens})")
        max_stop_strings = self.limits.max_stop_strings
        if len(stopping.stop_strings) > max_stop_strings:
            raise ValidationError(f"stopping.stop_strings has {len(stopping.stop_strings)} "
                                  f"entries; at most {max_stop_strings} are allowed")
        for index, stop in enumerate(stopping.stop_strings):
            if not stop:
                raise ValidationError(f"stopping.stop_strings[{index}] must not be empty")
            if len(stop) > MAX_STOP_STRING_LEN:
                raise ValidationError(f"stopping.stop_strings[{index}] is {len(stop)} characters "
                                      f"long; at most {MAX_STOP_STRING_LEN} are allowed")
        if len(stopping.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValidationError(f"stopping.stop_token_ids has {len(stopping.stop_token_ids)} "
                                  f"entries; at most {MAX_STOP_TOKEN_IDS} are allowed")
        self._check_ids_in_vocab("stopping.stop_token_ids", stopping.stop_token_ids)
        if stopping.HasField("time_limit_ms") and stopping.time_limit_ms == 0:
            raise ValidationError("stopping.time_limit_ms must be >= 1 (leave it unset for "
                                  "no limit)")

    def _check_ids_in_vocab(self, field_name: str, ids: Any) -> None:
        vocab_size = self.limits.vocab_size
        # max() first: one pass in C instead of a Python loop over a long prompt.
        if ids and max(ids) >= vocab_size:
            index = next(i for i, token_id in enumerate(ids) if token_id >= vocab_size)
            raise ValidationError(f"{field_name}[{index}] = {ids[index]} is out of range "
                                  f"(vocab_size is {vocab_size})")


def _check_sampling(sampling: generation_pb2.SamplingParams) -> None:
    if sampling.HasField("temperature"):
        if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
            raise ValidationError(f"sampling.temperature must be >= 0 and finite, "
                                  f"got {sampling.temperature}")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:  # NaN fails too
        raise ValidationError(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.HasField("top_k") and sampling.top_k < 0:
        raise ValidationError(f"sampling.top_k must be >= 0 (0 = off), got {sampling.top_k}")
    if sampling.HasField("min_p") and not 0.0 <= sampling.min_p <= 1.0:
        raise ValidationError(f"sampling.min_p must be in [0, 1], got {sampling.min_p}")
    if sampling.HasField("repetition_penalty"):
        penalty = sampling.repetition_penalty
        if not (math.isfinite(penalty) and penalty > 0):
            raise ValidationError(f"sampling.repetition_penalty must be > 0 and finite, "
                                  f"got {penalty}")


def _wants_logprobs(response: generation_pb2.ResponseOptions) -> bool:
    return response.logprobs or response.top_logprobs > 0


def _sampling_params(request: generation_pb2.GenerateRequest) -> SamplingParams:
    msg = request.sampling
    defaults = SamplingParams()
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else defaults.temperature,
        top_p=msg.top_p if msg.HasField("top_p") else defaults.top_p,
        top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
        min_p=msg.min_p if msg.HasField("min_p") else defaults.min_p,
        repetition_penalty=(msg.repetition_penalty if msg.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        seed=msg.seed if msg.HasField("seed") else None,
        top_logprobs=(request.response.top_logprobs if _wants_logprobs(request.response)
                      else -1),
    )
