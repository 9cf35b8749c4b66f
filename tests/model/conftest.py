"""Session fixtures for the slow loads (each happens once per test session): the embedded
SmolLM2 GGUF through our loader, and the same file through transformers."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2(embedded_gguf_path):
    """(model, config, tokenizer) of the embedded GGUF, float32 on the CPU."""
    from apex_grpc.model import load_model

    model, config, tokenizer, _ = load_model(embedded_gguf_path, "auto", "cpu", torch.float32)
    return model, config, tokenizer


@pytest.fixture(scope="session")
def hf_gguf_model(embedded_gguf_path):
    """transformers' own load of the embedded GGUF (dequantized to float32)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(embedded_gguf_path), gguf_file=os.path.basename(embedded_gguf_path),
        dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(embedded_gguf_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(embedded_gguf_path), gguf_file=os.path.basename(embedded_gguf_path))


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """One intra-op thread for these small-tensor tests: on a shared 2-core machine OpenMP's
    spin-waiting threads get descheduled and slow tiny ops down by 10-100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
