"""Randomized GenerateRequests (hypothesis) against the real server: malformed, extreme and
huge inputs each get INVALID_ARGUMENT or a correct result, the server stays up, and the KV
block pools end where they started. APEX_FUZZ_EXAMPLES sets the number of requests."""

from __future__ import annotations

import math
import os

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc

MAX_UINT32 = 2 ** 32 - 1
MAX_UINT64 = 2 ** 64 - 1
NUM_EXAMPLES = int(os.environ.get("APEX_FUZZ_EXAMPLES", "1000"))
MAX_MODEL_LEN = 48
VOCAB_SIZE = 512
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _huge_or_small(small: st.SearchStrategy, huge_len: int, element) -> st.SearchStrategy:
    """Mostly small lists, sometimes a huge one (built cheaply by repetition)."""
    return st.one_of(small, st.integers(0, huge_len).map(lambda n: [element] * n))


# Each field is drawn valid nine times in ten and malformed or extreme otherwise, so about a
# third of the requests are served and the rest probe one or two bad fields at a time.
FIELDS = {
    "request_id": (st.text(max_size=20), st.text(min_size=100, max_size=200)),
    "text": (st.text(min_size=1, max_size=12), st.text(max_size=80)),
    "token_ids": (st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20),
                  _huge_or_small(st.lists(st.integers(0, MAX_UINT32), max_size=12), 5000, 7)),
    "temperature": (st.none() | st.floats(0.0, 2.0), floats32),
    "top_p": (st.none() | st.floats(0.01, 1.0), floats32),
    "min_p": (st.none() | st.floats(0.0, 1.0), floats32),
    "repetition_penalty": (st.none() | st.floats(0.5, 2.0), floats32),
    "top_k": (st.none() | st.integers(0, 100), st.integers(-(2 ** 31), 2 ** 31 - 1)),
    "seed": (st.none() | st.integers(0, MAX_UINT64), st.none()),
    "max_new_tokens": (st.none() | st.integers(1, 6), st.just(0) | st.just(MAX_UINT32)),
    "min_new_tokens": (st.integers(0, 1), st.integers(0, 8) | st.just(MAX_UINT32)),
    "stop_strings": (st.lists(st.text(min_size=1, max_size=5), max_size=3),
                     _huge_or_small(st.lists(st.text(max_size=300), max_size=18), 200, "zz")),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=3),
                       _huge_or_small(st.lists(st.integers(0, MAX_UINT32), max_size=4), 100, 9)),
    "time_limit_ms": (st.none() | st.integers(1, 200), st.just(0)),
    "top_logprobs": (st.integers(0, 20), st.integers(21, 25) | st.just(MAX_UINT32)),
}
CHAT = st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "tool", "bot", ""]),
                          st.text(max_size=30)), max_size=4)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    def pick(name: str):
        valid, extreme = FIELDS[name]
        return draw(extreme if draw(st.integers(0, 9)) == 0 else valid)

    request = pb.GenerateRequest(request_id=pick("request_id"))
    # No input and chat (the dummy model has no chat template) are the malformed choices.
    kind = draw(st.sampled_from(["text"] * 5 + ["token_ids"] * 4 + ["none", "chat"]))
    if kind in ("text", "token_ids"):
        if kind == "text":
            request.text = pick("text")
        else:
            request.token_ids.ids.extend(pick("token_ids"))
            request.token_ids.SetInParent()
    elif kind == "chat":
        for role, content in draw(CHAT):
            request.chat.messages.add(role=role, content=content)
        request.chat.SetInParent()
    for message, names in ((request.sampling, ("temperature", "top_p", "min_p",
                                               "repetition_penalty", "top_k", "seed")),
                           (request.stopping, ("max_new_tokens", "time_limit_ms"))):
        for name in names:
            value = pick(name)
            if value is not None:
                setattr(message, name, value)
    stopping = request.stopping
    stopping.min_new_tokens = pick("min_new_tokens")
    stopping.stop_strings.extend(pick("stop_strings"))
    stopping.stop_token_ids.extend(pick("stop_token_ids"))
    stopping.ignore_eos = draw(st.booleans())
    stopping.include_stop_strings = draw(st.booleans())
    request.response.token_ids = draw(st.booleans())
    request.response.logprobs = draw(st.booleans())
    request.response.top_logprobs = pick("top_logprobs")
    return request


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server({"max_model_len": MAX_MODEL_LEN})


@pytest.fixture(scope="module")
def stub(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def _check_result(request: pb.GenerateRequest, response: pb.GenerateResponse) -> None:
    assert response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert response.finish_reason != pb.FINISH_REASON_ABORTED
    completion = response.usage.completion_tokens
    if request.stopping.HasField("max_new_tokens"):
        assert completion <= request.stopping.max_new_tokens
    assert response.usage.prompt_tokens + completion <= MAX_MODEL_LEN
    sampling = request.sampling
    assert not (sampling.HasField("temperature") and not math.isfinite(sampling.temperature))
    if request.response.token_ids:
        assert len(response.token_ids) == completion
    if request.request_id:
        assert response.request_id == request.request_id


@settings(max_examples=NUM_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=generate_requests())
def test_random_requests_get_a_result_or_invalid_argument(stub, request):
    try:
        response = stub.Generate(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        event(f"rejected: {error.details().split()[0]}")
        return
    event(f"served: {pb.FinishReason.Name(response.finish_reason)}")
    _check_result(request, response)


def test_after_fuzzing_the_pools_are_back_where_they_started(fuzz_server, stub):
    stats = fuzz_server.wait_for_idle_pools()
    assert stats.gpu_kv_used_blocks == stats.host_kv_used_blocks == 0
    response = stub.Generate(pb.GenerateRequest(text="still alive",
                                                stopping=pb.StoppingCriteria(max_new_tokens=2)))
    assert response.usage.completion_tokens >= 1
