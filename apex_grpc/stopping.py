"""Stop-string matching over a request's incremental text stream.

The matcher owns the held-back text: the longest suffix of what it has seen that is still a
prefix of some stop string. That text is withheld from the client until it either completes a
stop string (then it is cut, or kept when include_stop_strings) or stops being a possible start
of one (then it is released). So no stop string, whole or partial, ever reaches the client when
include_stop_strings is False.

Which match wins: the one that completes first in the stream (earliest end); among matches
ending at the same character, the one that starts first (the longest). Over a whole text this
is, for each stop string s, end = text.find(s) + len(s); the smallest (end, start) wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopResult:
    emit: str  # text safe to send to the client now
    matched: str | None  # the stop string that ended generation, or None


class StopStringMatcher:
    """One per request; push each detokenized text delta, flush when generation ends."""

    def __init__(self, stop_strings: Sequence[str], include_stop_strings: bool) -> None:
        for index, stop in enumerate(stop_strings):
            if not isinstance(stop, str):
                raise ValueError(f"stop_strings[{index}] must be a str, got {type(stop).__name__}")
            if not stop:
                raise ValueError(f"stop_strings[{index}] is empty")
        self._stop_strings = tuple(dict.fromkeys(stop_strings))  # dedupe, keep order
        self._include_stop_strings = include_stop_strings
        # A held-back suffix is always shorter than the longest stop string (a full one matches).
        self._max_held_len = max((len(s) for s in self._stop_strings), default=1) - 1
        # Every proper prefix of every stop string: one hash lookup per candidate suffix length.
        self._proper_prefixes = frozenset(
            stop[:length] for stop in self._stop_strings for length in range(1, len(stop))
        )
        self._held = ""
        self._finished = False

    def push(self, text_delta: str) -> StopResult:
        """Feed the next piece of generated text; returns what may be streamed now."""
        if self._finished:
            raise RuntimeError("push() after the matcher finished (stop matched or flushed)")
        # The held text holds no complete stop string, so any match ends inside text_delta;
        # searching held + delta is enough.
        text = self._held + text_delta
        match = self._earliest_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._finished = True
            emit = text[: start + len(stop)] if self._include_stop_strings else text[:start]
            return StopResult(emit=emit, matched=stop)
        held_len = self._held_suffix_len(text)
        self._held = text[len(text) - held_len :]
        return StopResult(emit=text[: len(text) - held_len], matched=None)

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (EOS, length...)."""
        released = self._held
        self._held = ""
        self._finished = True
        return released

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match ending first, longest on a tie; None if none."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop_strings:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for length in range(min(self._max_held_len, len(text)), 0, -1):
            if text[len(text) - length :] in self._proper_prefixes:
                return length
        return 0
