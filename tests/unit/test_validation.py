"""GenerateRequest validation: every rule answers INVALID_ARGUMENT naming its field.

The rejection cases go through a real in-process gRPC server (FakeEngine behind it) so the
status code and the details string are what a client sees; the defaulting and mapping rules
are checked on RequestValidator directly.
"""

from __future__ import annotations

import math

import grpc
import pytest
from fake_engine import VOCAB_SIZE, FakeEngine, FakeTokenizer, ServerThread

from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc
from apex_grpc.server.validation import (DEFAULT_MAX_NEW_TOKENS, ModelLimits, RequestValidator,
                                         ValidatedRequest, ValidationError)

MAX_MODEL_LEN = 128


def _text(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="hi", **fields)


REJECTED = [
    ("no input", pb.GenerateRequest(), "input"),
    ("empty text", pb.GenerateRequest(text=""), "text"),
    ("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids.ids"),
    ("empty chat", pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
    ("prompt longer than context", pb.GenerateRequest(text="x" * MAX_MODEL_LEN), "text"),
    ("token prompt fills context",
     pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * MAX_MODEL_LEN)), "token_ids"),
    ("chat longer than context", pb.GenerateRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="y" * MAX_MODEL_LEN)])), "chat"),
    ("negative temperature", _text(sampling=pb.SamplingParams(temperature=-0.5)),
     "sampling.temperature"),
    ("nan temperature", _text(sampling=pb.SamplingParams(temperature=math.nan)),
     "sampling.temperature"),
    ("inf temperature", _text(sampling=pb.SamplingParams(temperature=math.inf)),
     "sampling.temperature"),
    ("top_p zero", _text(sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
    ("top_p above one", _text(sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    ("top_p nan", _text(sampling=pb.SamplingParams(top_p=math.nan)), "sampling.top_p"),
    ("negative top_k", _text(sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
    ("min_p negative", _text(sampling=pb.SamplingParams(min_p=-0.1)), "sampling.min_p"),
    ("min_p above one", _text(sampling=pb.SamplingParams(min_p=1.01)), "sampling.min_p"),
    ("min_p nan", _text(sampling=pb.SamplingParams(min_p=math.nan)), "sampling.min_p"),
    ("repetition penalty zero", _text(sampling=pb.SamplingParams(repetition_penalty=0.0)),
     "sampling.repetition_penalty"),
    ("repetition penalty inf", _text(sampling=pb.SamplingParams(repetition_penalty=math.inf)),
     "sampling.repetition_penalty"),
    ("token id out of vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, VOCAB_SIZE])),
     "token_ids.ids[1]"),
    ("stop token id out of vocab",
     _text(stopping=pb.StoppingCriteria(stop_token_ids=[VOCAB_SIZE + 7])),
     "stopping.stop_token_ids[0]"),
    ("max_new_tokens zero", _text(stopping=pb.StoppingCriteria(max_new_tokens=0)),
     "stopping.max_new_tokens"),
    ("min above max", _text(stopping=pb.StoppingCriteria(max_new_tokens=4, min_new_tokens=5)),
     "stopping.min_new_tokens"),
    ("min above the room left", _text(stopping=pb.StoppingCriteria(min_new_tokens=500)),
     "stopping.min_new_tokens"),
    ("17 stop strings", _text(stopping=pb.StoppingCriteria(
        stop_strings=[f"s{i}" for i in range(17)])), "stopping.stop_strings"),
    ("empty stop string", _text(stopping=pb.StoppingCriteria(stop_strings=["ok", ""])),
     "stopping.stop_strings[1]"),
    ("over-long stop string", _text(stopping=pb.StoppingCriteria(stop_strings=["z" * 257])),
     "stopping.stop_strings[0]"),
    ("too many stop token ids", _text(stopping=pb.StoppingCriteria(
        stop_token_ids=list(range(65)))), "stopping.stop_token_ids"),
    ("time limit zero", _text(stopping=pb.StoppingCriteria(time_limit_ms=0)),
     "stopping.time_limit_ms"),
    ("top_logprobs above 20", _text(response=pb.ResponseOptions(top_logprobs=21)),
     "response.top_logprobs"),
    ("unknown chat role", pb.GenerateRequest(chat=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="robot", content="b")])),
     "chat.messages[1].role"),
    ("request id too long", _text(request_id="r" * 129), "request_id"),
]


@pytest.fixture(scope="module")
def stub():
    with ServerThread(FakeEngine(max_model_len=MAX_MODEL_LEN)) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.mark.parametrize("request_msg,field_name",
                         [case[1:] for case in REJECTED], ids=[case[0] for case in REJECTED])
def test_invalid_request_gets_invalid_argument_naming_the_field(stub, request_msg, field_name):
    for method in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            method(request_msg, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field_name), info.value.details()


def test_server_keeps_serving_after_rejections(stub):
    with pytest.raises(grpc.RpcError):
        stub.Generate(_text(sampling=pb.SamplingParams(temperature=math.nan)), timeout=10)
    response = stub.Generate(pb.GenerateRequest(text="hi"), timeout=10)
    assert response.finish_reason == pb.FINISH_REASON_EOS


def test_chat_without_template_is_rejected():
    engine = FakeEngine(has_chat_template=False)
    with ServerThread(engine) as server, grpc.insecure_channel(server.target) as channel:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello")])
        with pytest.raises(grpc.RpcError) as info:
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(chat=chat), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("chat")
    assert not engine.calls


def _validator(max_model_len: int = MAX_MODEL_LEN) -> RequestValidator:
    return RequestValidator(FakeTokenizer(), ModelLimits(vocab_size=VOCAB_SIZE,
                                                         max_model_len=max_model_len))


def _validate(validator: RequestValidator, request: pb.GenerateRequest) -> ValidatedRequest:
    """The servicer's three steps, in its order (it tokenizes off the event loop between)."""
    validator.check_static(request)
    return validator.finish(request, validator.prompt_ids(request))


def test_default_max_new_tokens_is_capped_by_the_room_left():
    validated = _validate(_validator(), pb.GenerateRequest(text="abc"))  # BOS + 3 bytes
    assert validated.stopping.max_new_tokens == MAX_MODEL_LEN - 4
    roomy = _validate(_validator(max_model_len=4096), pb.GenerateRequest(text="abc"))
    assert roomy.stopping.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_prompts_over_the_operator_cap_are_rejected_by_name():
    capped = RequestValidator(FakeTokenizer(), ModelLimits(vocab_size=VOCAB_SIZE,
                                                           max_model_len=4096, max_prompt_len=5))
    assert _validate(capped, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 5)))
    with pytest.raises(ValidationError, match=r"^token_ids is 6 tokens long.*--max-prompt-len"):
        _validate(capped, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 6)))


def test_fields_map_onto_engine_params():
    request = pb.GenerateRequest(
        request_id="abc", text="hey", add_special_tokens=False,
        sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.05,
                                   repetition_penalty=1.1, seed=42),
        stopping=pb.StoppingCriteria(max_new_tokens=9, min_new_tokens=2, stop_strings=["\n"],
                                     stop_token_ids=[7], include_stop_strings=True,
                                     ignore_eos=True, time_limit_ms=500),
        response=pb.ResponseOptions(token_ids=True, top_logprobs=3))
    validated = _validate(_validator(), request)
    assert validated.request_id == "abc"
    assert validated.prompt_ids == FakeTokenizer().encode("hey", add_special_tokens=False)
    sampling = validated.sampling
    assert (sampling.top_k, sampling.seed, sampling.top_logprobs) == (5, 42, 3)
    assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
    assert sampling.min_p == pytest.approx(0.05)
    assert sampling.repetition_penalty == pytest.approx(1.1)
    stopping = validated.stopping
    assert (stopping.max_new_tokens, stopping.min_new_tokens) == (9, 2)
    assert stopping.stop_strings == ("\n",) and stopping.stop_token_ids == (7,)
    assert stopping.include_stop_strings and stopping.ignore_eos
    assert stopping.time_limit_ms == 500
    assert validated.return_token_ids and validated.return_logprobs


def test_logprobs_off_maps_to_minus_one_and_logprobs_flag_to_zero():
    validator = _validator()
    assert _validate(validator, pb.GenerateRequest(text="a")).sampling.top_logprobs == -1
    only_sampled = pb.GenerateRequest(text="a", response=pb.ResponseOptions(logprobs=True))
    assert _validate(validator, only_sampled).sampling.top_logprobs == 0


def test_text_gets_bos_by_default_and_chat_never_doubles_it():
    validator = _validator()
    assert _validate(validator, pb.GenerateRequest(text="a")).prompt_ids[0] == 1
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="a")])
    ids = _validate(validator, pb.GenerateRequest(chat=chat)).prompt_ids
    assert FakeTokenizer().decode(ids) == "<|user|>a\n<|assistant|>" and ids[0] != 1


def test_server_makes_a_request_id_when_empty():
    first = _validate(_validator(), pb.GenerateRequest(text="a")).request_id
    second = _validate(_validator(), pb.GenerateRequest(text="a")).request_id
    assert first and second and first != second


def test_template_errors_become_validation_errors():
    class RejectingTokenizer(FakeTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise RuntimeError("roles must alternate")

    validator = RequestValidator(RejectingTokenizer(), ModelLimits(VOCAB_SIZE, MAX_MODEL_LEN))
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="a")])
    with pytest.raises(ValidationError, match="^chat: .*roles must alternate"):
        _validate(validator, pb.GenerateRequest(chat=chat))
