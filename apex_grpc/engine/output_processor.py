"""The output processor: turns the scheduler's NewTokens into RequestOutputs.

It owns each request's incremental detokenizer and StopStringMatcher, the usage and timing of
finished outputs and the token counters. Token-level stops were decided by Scheduler.update;
a stop string found here, and every engine-level end (time limit, abort, fault), finishes the
request through the same Scheduler.finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

from apex_grpc.request import FinishReason, Request, RequestOutput, TokenLogprob
from apex_grpc.scheduler.scheduler import NewToken, Scheduler
from apex_grpc.stopping import StopStringMatcher

# Token-level stops whose token is never shown as text (the stop string path handles text).
_SILENT_STOPS = (FinishReason.EOS, FinishReason.STOP)


@dataclass(slots=True)
class _TextState:
    """Per-request output state kept beside the scheduler's Request."""

    req: Request
    detokenizer: object | None  # tokenizer.IncrementalDetokenizer
    stop_matcher: StopStringMatcher | None


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}
        self.num_prompt_tokens = 0  # of requests that produced their first token
        self.num_generation_tokens = 0
        self.num_finished = 0  # every finish, aborts and faults included

    def add_request(self, req: Request) -> None:
        stop_strings = req.stopping.stop_strings
        self._states[req.request_id] = _TextState(
            req=req,
            detokenizer=self.tokenizer.new_detokenizer(req.prompt_ids) if self.tokenizer else None,
            stop_matcher=StopStringMatcher(stop_strings, req.stopping.include_stop_strings)
            if stop_strings else None,
        )

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    @property
    def requests(self) -> list[Request]:
        """Every request not finished yet, queued or running."""
        return [state.req for state in self._states.values()]

    def process(self, new_tokens: list[NewToken], logprobs: Mapping[str, TokenLogprob],
                now: float) -> list[RequestOutput]:
        """One output per new token, in row order (logprobs: request id -> the token's)."""
        return [self._on_token(self._states[new.req.request_id], new,
                               logprobs.get(new.req.request_id), now) for new in new_tokens]

    def finish(self, request_id: str, reason: FinishReason, error: str = "",
               release_text: bool = False) -> RequestOutput | None:
        """End a request for an engine-level reason (time limit, abort, fault); release_text
        sends what the detokenizer and the stop matcher still hold. None when unknown."""
        state = self._states.get(request_id)
        if state is None:
            return None
        self.scheduler.finish(state.req, reason)
        text = self._release_held_text(state) if release_text else ""
        return self._finished_output(state, text, [], [], error=error)

    def _on_token(self, state: _TextState, new: NewToken, logprob: TokenLogprob | None,
                  now: float) -> RequestOutput:
        req, token = new.req, new.token_id
        if req.first_token_time is None:
            req.first_token_time = now
            self.num_prompt_tokens += req.num_prompt_tokens
        self.num_generation_tokens += 1
        logprobs = [logprob] if logprob is not None else []
        if new.finish_reason in _SILENT_STOPS:
            matched = str(token) if new.finish_reason == FinishReason.STOP else ""
            return self._finished_output(state, self._release_held_text(state), [token],
                                         logprobs, matched)
        text = state.detokenizer.push([token]) if state.detokenizer else ""
        # Before min_new_tokens nothing stops the request, stop strings included.
        if state.stop_matcher is not None and \
                req.num_output_tokens >= req.stopping.min_new_tokens:
            result = state.stop_matcher.push(text)
            text = result.emit
            if result.matched is not None:
                # A stop string completed by the token that reached a length limit wins.
                if new.finished:
                    req.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(req, FinishReason.STOP)
                return self._finished_output(state, text, [token], logprobs, result.matched)
        if new.finished:  # length or context limit
            return self._finished_output(state, text + self._release_held_text(state),
                                         [token], logprobs)
        return RequestOutput(req.request_id, text, [token], logprobs)

    def _release_held_text(self, state: _TextState) -> str:
        """Text held back when generation ends for a reason other than a stop string: the
        detokenizer's tail (cut at a stop string it completes) and the stop matcher's hold."""
        text = ""
        if state.detokenizer is not None:
            text = state.detokenizer.flush()
            if state.stop_matcher is not None:
                text = state.stop_matcher.push(text).emit
        if state.stop_matcher is not None:
            text += state.stop_matcher.flush()
        return text

    def _finished_output(self, state: _TextState, text: str, new_ids: list[int],
                         logprobs: list[TokenLogprob], matched: str = "",
                         error: str = "") -> RequestOutput:
        """The last output of a request the scheduler has finished, with usage and timing."""
        req = state.req
        del self._states[req.request_id]
        self.num_finished += 1
        now = time.monotonic()
        started = req.first_scheduled_time or now
        first = req.first_token_time or now
        out = RequestOutput(req.request_id, text, new_ids, logprobs, req.finish_reason, matched,
                            error=error)
        out.prompt_tokens = req.num_prompt_tokens
        out.completion_tokens = req.num_output_tokens
        out.queue_ms = (started - req.arrival_time) * 1e3
        out.ttft_ms = (first - req.arrival_time) * 1e3 if req.first_token_time else 0.0
        out.decode_ms = (now - first) * 1e3 if req.first_token_time else 0.0
        out.num_preemptions = req.num_preemptions
        return out
