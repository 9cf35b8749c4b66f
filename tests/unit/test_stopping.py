"""Stop-string matching: streamed output equals a whole-text reference and never leaks a match."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apex_grpc.stopping import StopStringMatcher


def reference_output(text: str, stop_strings: list[str], include: bool) -> tuple[str, str | None]:
    """What the client must receive for the whole text: the first-completing match wins."""
    best = None  # (end, start, stop)
    for stop in stop_strings:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    if best is None:
        return text, None
    end, start, stop = best
    return (text[:end] if include else text[:start]), stop


def stream(pieces: list[str], stop_strings: list[str], include: bool) -> tuple[str, str | None]:
    """Push pieces in order; check no emitted prefix leaks past the reference output."""
    whole_text = "".join(pieces)
    expected, _ = reference_output(whole_text, stop_strings, include)
    matcher = StopStringMatcher(stop_strings, include)
    emitted = ""
    for piece in pieces:
        result = matcher.push(piece)
        emitted += result.emit
        assert expected.startswith(emitted), (pieces, emitted, expected)
        if result.matched is not None:
            return emitted, result.matched
    return emitted + matcher.flush(), None


TEXT = "The answer is 42.\nUser: next question"
STOPS = ["\nUser:"]


def test_every_two_piece_split_cuts_before_the_stop_string():
    for split in range(len(TEXT) + 1):
        emitted, matched = stream([TEXT[:split], TEXT[split:]], STOPS, include=False)
        assert emitted == "The answer is 42."
        assert matched == "\nUser:"


def test_every_three_piece_split_never_leaks_a_partial_match():
    for first in range(len(TEXT) + 1):
        for second in range(first, len(TEXT) + 1):
            pieces = [TEXT[:first], TEXT[first:second], TEXT[second:]]
            emitted, matched = stream(pieces, STOPS, include=False)
            assert emitted == "The answer is 42."
            assert "\n" not in emitted  # not even the first character of the stop string
            assert matched == "\nUser:"


def test_character_by_character_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["STOP"], include_stop_strings=False)
    emits = [matcher.push(char).emit for char in "aSTxST"]
    assert emits == ["a", "", "", "STx", "", ""]
    assert matcher.flush() == "ST"  # held back, released when generation ends
    with pytest.raises(RuntimeError, match="after the matcher finished"):
        matcher.push("x")


def test_include_stop_strings_keeps_the_match_and_drops_what_follows():
    matcher = StopStringMatcher(["</s>", "END"], include_stop_strings=True)
    assert matcher.push("hello </").emit == "hello "
    result = matcher.push("s> trailing text")
    assert result.emit == "</s>"
    assert result.matched == "</s>"
    assert matcher.flush() == ""


def test_match_that_completes_first_wins_over_an_earlier_start():
    # "abcd" starts first but "bc" completes first in the stream.
    matcher = StopStringMatcher(["abcd", "bc"], include_stop_strings=False)
    assert matcher.push("xab").emit == "x"
    result = matcher.push("cd")
    assert (result.emit, result.matched) == ("a", "bc")  # "x" went out with the first push


def test_longest_match_wins_when_two_end_together():
    matcher = StopStringMatcher(["bc", "abc"], include_stop_strings=False)
    result = matcher.push("xabc")
    assert (result.emit, result.matched) == ("x", "abc")


def test_self_overlapping_stop_string_found_after_a_false_start():
    emitted, matched = stream(list("aaab"), ["aab"], include=False)
    assert (emitted, matched) == ("a", "aab")


def test_no_stop_strings_passes_everything_through():
    matcher = StopStringMatcher([], include_stop_strings=False)
    assert matcher.push("anything").emit == "anything"
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match=r"stop_strings\[1\] is empty"):
        StopStringMatcher(["ok", ""], include_stop_strings=False)


def test_push_after_match_is_an_error():
    matcher = StopStringMatcher(["x"], include_stop_strings=False)
    assert matcher.push("axb").matched == "x"
    with pytest.raises(RuntimeError, match="after the matcher finished"):
        matcher.push("more")


@st.composite
def split_text(draw):
    text = draw(st.text(alphabet="abc", max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(
    pieces=split_text(),
    stop_strings=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_streamed_output_equals_whole_text_reference(pieces, stop_strings, include):
    emitted, matched = stream(pieces, stop_strings, include)
    assert (emitted, matched) == reference_output("".join(pieces), stop_strings, include)
    if not include:
        assert not any(stop in emitted for stop in stop_strings)
