"""The Python client library (blocking and asyncio) and the `apex-client` command against an
in-process server with a FakeEngine."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from fake_engine import FakeEngine, ServerThread

from clients import apex_client
from clients.client import (ApexClient, ApexError, AsyncApexClient, RetryPolicy,
                            build_request)

FAST_RETRY = RetryPolicy(max_retries=3, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture(scope="module")
def server():
    with ServerThread(FakeEngine(reply="The quick brown fox.")) as running:
        yield running


def _wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_generate_and_stream_give_the_same_typed_result(server):
    with ApexClient(server.target) as client:
        whole = client.generate(text="hi", max_new_tokens=9, return_token_ids=True,
                                top_logprobs=2, request_id="typed")
        chunks = list(client.generate_stream(text="hi", max_new_tokens=9, return_token_ids=True,
                                             top_logprobs=2))
    assert whole.request_id == "typed" and whole.text == "The quick"
    assert whole.finish_reason == "length" and whole.finished
    assert whole.prompt_tokens == 3 and whole.completion_tokens == 9
    assert whole.timing is not None and whole.timing.ttft_ms == 2.5
    assert len(whole.token_ids) == 9 and whole.logprobs[0].top[1][2] == "U"
    assert "".join(c.text for c in chunks) == whole.text
    assert all(not c.finished and c.timing is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids


def test_errors_carry_the_status_code(server):
    with ApexClient(server.target) as client:
        with pytest.raises(ApexError) as info:
            client.generate(text="hi", temperature=-1.0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.temperature" in info.value.details
        assert client.abort("never-seen") is False
        assert client.tokenize("ab", add_special_tokens=True) == [1, 3 + 97, 3 + 98]
        assert client.model_info().model_name == "fake-model"
        assert client.server_info().policy == "apex"
        assert client.stats().steps_gpu_only == 11
        assert client.health() == "SERVING" and client.health("") == "SERVING"


def test_blocking_stream_cancel_aborts_on_the_server():
    engine = FakeEngine(step_delay_s=0.05)
    with ServerThread(engine) as running, ApexClient(running.target) as client:
        stream = client.generate_stream(text="hi", request_id="walk-away")
        received = []
        for chunk in stream:
            received.append(chunk)
            if len(received) == 2:
                stream.cancel()
        _wait_until(lambda: "walk-away" in engine.closed_early)
    assert len(received) == 2 and not engine.live


def test_retries_on_unavailable_then_succeeds_or_gives_up():
    engine = FakeEngine(unavailable_first_calls=2)
    with ServerThread(engine) as running:
        with ApexClient(running.target, retry=FAST_RETRY) as client:
            assert client.generate(text="hi").finish_reason == "eos"
            assert len(engine.calls) == 3
            engine.unavailable_first_calls = 5  # calls 4 and 5 fail, 6 succeeds
            assert list(client.generate_stream(text="hi"))[-1].finish_reason == "eos"
        with ApexClient(running.target, retry=RetryPolicy(max_retries=0)) as impatient:
            engine.unavailable = True
            with pytest.raises(ApexError) as info:
                impatient.generate(text="hi")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_and_deadline():
    engine = FakeEngine(hold=None, step_delay_s=0.2)
    with ServerThread(engine, auth_token="tok") as running:
        with ApexClient(running.target, auth_token="tok") as client:
            assert client.generate(text="hi", max_new_tokens=1).finish_reason == "length"
            with pytest.raises(ApexError) as late:
                client.generate(text="hi", timeout=0.3)
        with ApexClient(running.target) as anonymous, pytest.raises(ApexError) as denied:
            anonymous.generate(text="hi")
        assert "tok" not in repr(client)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_async_client_generate_stream_and_cancel():
    engine = FakeEngine(step_delay_s=0.02)

    async def body(target: str):
        async with AsyncApexClient(target) as client:
            whole = await client.generate(text="hi", max_new_tokens=5)
            chunks = [c async for c in client.generate_stream(text="hi", max_new_tokens=5)]
            stream = client.generate_stream(text="hi", request_id="async-cancel")
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 2:
                    stream.cancel()
            assert await client.health() == "SERVING"
        return whole, chunks, seen

    with ServerThread(engine) as running:
        whole, chunks, seen = asyncio.run(body(running.target))
        _wait_until(lambda: "async-cancel" in engine.closed_early)
    assert whole.text == "".join(c.text for c in chunks) == "Hello"
    assert seen == 2


def test_build_request_needs_exactly_one_input():
    with pytest.raises(ValueError, match="exactly one"):
        build_request()
    with pytest.raises(ValueError, match="exactly one"):
        build_request(text="a", token_ids=[1])
    chat = build_request(chat=[("system", "s"), {"role": "user", "content": "u"}],
                         add_generation_prompt=False)
    assert [m.role for m in chat.chat.messages] == ["system", "user"]
    assert chat.chat.HasField("add_generation_prompt") and chat.request_id
    assert not build_request(text="a").sampling.HasField("temperature")


def test_apex_client_streams_text_and_prints_json(server, capsys):
    assert apex_client.main(["--target", server.target, "--max-new-tokens", "3", "hello"]) == 0
    out, err = capsys.readouterr()
    assert out == "The\n" and "finish=length" in err and "completion_tokens=3" in err
    code = apex_client.main(["--target", server.target, "--json", "--show-token-ids",
                             "--chat", "system:be brief", "user:hi", "--max-new-tokens", "4"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == "The " and len(result["token_ids"]) == 4
    assert result["finish_reason"] == "length"
    code = apex_client.main(["--target", server.target, "--unary", "--tokens", "5", "6"])
    assert code == 0 and capsys.readouterr().out == "The quick brown fox.\n"


def test_apex_client_reports_rpc_errors(server, capsys):
    assert apex_client.main(["--target", server.target, "--top-p", "2", "x"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        apex_client.main(["--target", server.target, "--chat", "no-colon"])
