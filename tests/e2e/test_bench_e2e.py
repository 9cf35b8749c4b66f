"""apex-bench's runner against a real in-process apex-grpc server on a tiny dummy model.

Every request completes, the client's token totals equal the server's GetStats counters over
the run, and cancellation injection leaves the KV block pools where they started.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from apex_grpc.engine import builder
from apex_grpc.server import app
from clients.bench.metrics import compute_metrics
from clients.bench.runner import RunOptions, describe_server, run_benchmark
from clients.bench.workloads import inject_cancellations, random_workload, sharegpt_workload
from tests.e2e.conftest import TINY_LLAMA, tiny_serve_options


@pytest.fixture(scope="module")
def tiny_config(tiny_config_path) -> str:
    return tiny_config_path


async def _bench(config_path: str, requests, options: RunOptions):
    """Serve the tiny model on a free port, run the benchmark, drain the server."""
    serve_options = tiny_serve_options(config_path)
    server = app.ApexServer(app.ServerSettings(host="127.0.0.1", port=0, shutdown_grace_s=1.0),
                            lambda: builder.build_engine(serve_options))
    await server.start()
    try:
        await server.load_engine()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            description = await describe_server(channel, ())
            return description, await run_benchmark(channel, (), requests, options)
    finally:
        await server.stop()


def test_every_request_completes_and_tokens_match_server_counters(tiny_config: str) -> None:
    requests = random_workload(24, input_len=16, output_len=8, range_ratio=0.5,
                               vocab_size=TINY_LLAMA["vocab_size"], seed=0)
    options = RunOptions(request_rate=100.0, num_warmups=2, max_concurrency=12,
                         show_progress=False)
    description, run = asyncio.run(asyncio.wait_for(_bench(tiny_config, requests, options), 120))
    assert description.vocab_size == TINY_LLAMA["vocab_size"] and description.policy
    metrics = compute_metrics(run.records, run.duration_s)
    assert metrics.completed == len(requests) and metrics.errors_by_code == {}
    # ignore_eos + max_new_tokens: exact lengths, and exact prompt lengths reported back.
    assert [rec.output_len for rec in run.records] == [req.output_len for req in requests]
    assert [rec.prompt_len for rec in run.records] == [req.input_len for req in requests]
    assert metrics.total_output_tokens == run.stats_delta["generation_tokens_total"]
    assert metrics.latencies["ttft"].mean_ms > 0.0 and metrics.latencies["tpot"].mean_ms > 0.0


def test_cancellation_injection_frees_every_block(tiny_config: str) -> None:
    requests = inject_cancellations(
        random_workload(12, input_len=24, output_len=40, range_ratio=0.0,
                        vocab_size=TINY_LLAMA["vocab_size"], seed=1),
        cancel_fraction=0.5, cancel_after_tokens=3, seed=1)
    options = RunOptions(show_progress=False)
    _, run = asyncio.run(asyncio.wait_for(_bench(tiny_config, requests, options), 120))
    metrics = compute_metrics(run.records, run.duration_s)
    assert (metrics.cancelled, metrics.completed, metrics.failed) == (6, 6, 0)
    for pool in ("gpu_kv_used_blocks", "host_kv_used_blocks", "num_running", "num_waiting"):
        assert run.stats_after[pool] == run.stats_before[pool], pool


def test_sharegpt_text_prompts_are_served(tiny_config: str, tmp_path) -> None:
    conversations = [{"conversations": [{"from": "human", "value": f"question {i} " * (i + 1)},
                                        {"from": "gpt", "value": "answer " * (i + 2)}]}
                     for i in range(6)]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations), encoding="utf-8")
    requests = sharegpt_workload(dataset, num_prompts=6, seed=0, max_model_len=256,
                                 ignore_eos=True)
    _, run = asyncio.run(asyncio.wait_for(
        _bench(tiny_config, requests, RunOptions(show_progress=False)), 120))
    metrics = compute_metrics(run.records, run.duration_s)
    assert metrics.completed == 6
    # The server tokenizes the text and reports the prompt length it used.
    assert all(rec.prompt_len > 0 for rec in run.records)
    assert [rec.output_len for rec in run.records] == [req.output_len for req in requests]
    assert metrics.total_input_tokens == run.stats_delta["prompt_tokens_total"]
    assert metrics.total_output_tokens == run.stats_delta["generation_tokens_total"]
