"""The embedded model through an int8 host tier (the host_kv_accuracy bench's paths, short):
the text's NLL stays within 2% of the full-precision tier's and the France answer's greedy
tokens agree. The full measurement is python -m apex_grpc.bench.host_kv_accuracy."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.attention.cpu_kernel import CpuAttentionPool
from apex_grpc.bench.host_kv_accuracy import PROMPTS, TEXT_PATH, greedy, text_nll
from apex_grpc.config import HostKVDtype
from apex_grpc.model.loader import load_model


@pytest.fixture(scope="module")
def embedded(embedded_gguf_path):
    model, _, tokenizer, _ = load_model(embedded_gguf_path, "auto", "cpu", torch.float32)
    return model, tokenizer


def test_int8_host_tier_keeps_nll_and_greedy_answer(embedded):
    model, tokenizer = embedded
    text = tokenizer.encode(TEXT_PATH.read_text(), add_special_tokens=False)[:96]
    france = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}]), add_special_tokens=False)
    with CpuAttentionPool(2) as pool, torch.inference_mode():
        nll = {dtype: text_nll(model, text, dtype, pool) for dtype in HostKVDtype}
        answers = {dtype: greedy(model, [france], 8, dtype, pool)[0] for dtype in HostKVDtype}
    assert abs(nll[HostKVDtype.INT8] / nll[HostKVDtype.AUTO] - 1) < 0.02, nll
    assert answers[HostKVDtype.INT8] == answers[HostKVDtype.AUTO], \
        [tokenizer.decode(a) for a in answers.values()]
    assert "Paris" in tokenizer.decode(answers[HostKVDtype.AUTO])
