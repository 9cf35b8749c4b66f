"""A tiny Qwen3 checkpoint (q/k norms, head_dim apart from hidden / heads, GQA, tied or untied
embeddings, its own BPE tokenizer and chat template) served over gRPC gives transformers' greedy
tokens with its KV on the GPU tier only and with it forced onto the host tier (CPU attention in
the native kernel, ASYNC_OVERLAP) or split across both (the NEO pipeline). And a checkpoint the
server must not serve makes `apex-grpc serve` exit non-zero with the reason in its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from apex_grpc.config import KVPlacement, Policy, ServeOptions
from clients.client import ApexClient

NUM_GREEDY = 32
# On CUDA the GPU tier runs the Triton kernels and host rows cross PCIe: the same tokens.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TEXTS = ["def f(x):\n    return x**2  # café naïve 東京 🙂👍🏽 12345",
         "The quick brown fox jumps over the lazy dog.", "中文分词测试，汉字和标点符号。"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
# name -> (policy, placement, the engine counter that proves the mode ran)
MODES = {"gpu_only": (Policy.GPU_ONLY, KVPlacement.AUTO, "steps_gpu_only"),
         "apex_host": (Policy.APEX, KVPlacement.HOST, "steps_async_overlap"),
         "neo_alternate": (Policy.NEO, KVPlacement.ALTERNATE, "steps_asymmetric_pipeline")}


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads slow them 10-100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def _hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NUM_GREEDY):
        ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["qwen3_tied", "qwen3_untied"])
def test_served_greedy_tokens_match_transformers_in_every_placement(
        start_server, tiny_qwen_checkpoint, tiny_bpe_tokenizer, variant, device):
    checkpoint = tiny_qwen_checkpoint(variant)
    hf_tokenizer = tiny_bpe_tokenizer
    requests = [{"text": text} for text in TEXTS] + [{"chat": CHAT}]
    prompts = [hf_tokenizer.encode(text) for text in TEXTS] + [hf_tokenizer.encode(
        hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)]
    expected = [_hf_greedy(checkpoint.hf_model, prompt) for prompt in prompts]
    for mode, (policy, placement, counter) in MODES.items():
        server = start_server(serve_options=ServeOptions(
            model=str(checkpoint.path), device=device, dtype="float32", policy=policy,
            kv_placement=placement, gpu_kv_blocks=64, host_kv_gb=0.01, max_num_seqs=8,
            cpu_attention_threads=1, profile="none"))
        with ApexClient(server.target) as client:
            info = client.model_info()
            assert info.architecture == "Qwen3ForCausalLM"
            for request, prompt, tokens in zip(requests, prompts, expected):
                result = client.generate(**request, max_new_tokens=NUM_GREEDY, temperature=0.0,
                                         ignore_eos=True, return_token_ids=True)
                assert result.prompt_tokens == len(prompt), (mode, request)
                assert list(result.token_ids) == tokens, (mode, request)
                assert result.text == hf_tokenizer.decode(tokens, skip_special_tokens=True)
        assert getattr(server.wait_for_idle_pools(), counter) > 0, mode


def test_unservable_checkpoint_exits_nonzero_with_the_reason(tmp_path):
    """Mistral-7B-v0.1's sliding window would cut the context: refused at load, exit 1."""
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
              "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "sliding_window": 4096, "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    process = subprocess.run(
        [sys.executable, "-m", "apex_grpc.cli", "serve", "--model", str(tmp_path),
         "--device", "cpu", "--port", "0", "--profile", "none"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert process.returncode != 0
    assert "engine_load_failed" in process.stderr
    assert "sliding-window attention (window 4096 < 32768 positions)" in process.stderr
