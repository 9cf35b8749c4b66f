"""Typed results of the client library: ApexError and GenerationResult (with its TokenLogprob
and Timing parts), built from apex.v1 messages."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from apex_grpc.proto import generation_pb2 as pb


class ApexError(Exception):
    """An RPC failed; `code` is the gRPC status (e.g. INVALID_ARGUMENT), `details` the reason."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    token: str
    top: tuple[tuple[int, float, str], ...]  # (token_id, logprob, token), best first


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    ttft_ms: float
    decode_ms: float
    num_preemptions: int


@dataclass(frozen=True)
class GenerationResult:
    """A whole result (Generate) or one stream message (text is then a delta; finish fields
    are set on the last message only)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # "eos", "stop", "length", "context_limit", "time_limit", ...
    matched_stop: str
    prompt_tokens: int
    completion_tokens: int
    timing: Timing | None
    replica_id: str = ""  # the replica that served it ("" when the server did not say)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse, replica_id: str = "") -> GenerationResult:
        finished = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        reason = pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(
            request_id=msg.request_id, text=msg.text, token_ids=tuple(msg.token_ids),
            logprobs=tuple(TokenLogprob(lp.token_id, lp.logprob, lp.token,
                                        tuple((t.token_id, t.logprob, t.token) for t in lp.top))
                           for lp in msg.logprobs),
            finish_reason=reason if finished else None, matched_stop=msg.matched_stop,
            prompt_tokens=msg.usage.prompt_tokens, completion_tokens=msg.usage.completion_tokens,
            timing=Timing(msg.timing.queue_ms, msg.timing.ttft_ms, msg.timing.decode_ms,
                          msg.timing.num_preemptions) if finished else None,
            replica_id=replica_id)
