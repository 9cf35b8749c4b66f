"""apex-bench runner and CLI against a fake in-process apex.v1 server (no engine needed).

The fake streams one token per message, counts generated tokens like GetStats does, can reject
every n-th request, and records the peak number of concurrent streams and the metadata seen.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from apex_grpc.proto import generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc
from clients.bench.cli import main
from clients.bench.runner import ConnectionOptions, build_generate_request
from clients.bench.workloads import BenchRequest

VOCAB_SIZE = 500
TOKEN_INTERVAL_S = 0.002


class FakeServer(generation_pb2_grpc.GenerationServiceServicer,
                 model_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.num_running = 0
        self.peak_running = 0
        self.generation_tokens_total = 0
        self.prompt_tokens_total = 0
        self.reject_every = 0  # reject request indices i with i % n == n - 1 (0 = never)
        self.authorizations: set[str] = set()

    def GetModelInfo(self, request, context):
        return model_pb2.GetModelInfoResponse(model_name="fake", vocab_size=VOCAB_SIZE,
                                              max_model_len=256)

    def GetServerInfo(self, request, context):
        return model_pb2.GetServerInfoResponse(policy="fake-policy", version="0")

    def GetStats(self, request, context):
        with self.lock:
            return model_pb2.GetStatsResponse(
                num_running=self.num_running, prompt_tokens_total=self.prompt_tokens_total,
                generation_tokens_total=self.generation_tokens_total)

    def _finish(self) -> None:
        with self.lock:
            self.num_running -= 1

    def GenerateStream(self, request, context):
        self.authorizations.update(value for key, value in context.invocation_metadata()
                                   if key == "authorization")
        index = int(request.request_id.rsplit("-", 1)[1])
        if (request.request_id.startswith("bench-") and self.reject_every
                and index % self.reject_every == self.reject_every - 1):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        with self.lock:
            self.num_running += 1
            self.peak_running = max(self.peak_running, self.num_running)
            self.prompt_tokens_total += len(request.token_ids.ids)
        context.add_callback(self._finish)
        num_tokens = request.stopping.max_new_tokens
        for position in range(num_tokens):
            time.sleep(TOKEN_INTERVAL_S)
            if not context.is_active():
                return
            with self.lock:
                self.generation_tokens_total += 1
            response = generation_pb2.GenerateResponse(request_id=request.request_id,
                                                       token_ids=[position], text="t")
            if position == num_tokens - 1:
                response.finish_reason = generation_pb2.FINISH_REASON_LENGTH
                response.usage.prompt_tokens = len(request.token_ids.ids)
                response.usage.completion_tokens = num_tokens
            yield response


@pytest.fixture(scope="module")
def fake_server():
    servicer = FakeServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=48))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _run_cli(target: str, result: Path, *extra: str) -> None:
    argv = ["--target", target, "--dataset-name", "random", "--random-input-len", "12",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--disable-tqdm",
            "--settle-timeout", "5", "--result-json", str(result), *extra]
    assert main(argv) == 0


VLLM_KEYS = (
    "completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "std_itl_ms",
    "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "std_e2el_ms", "p99_e2el_ms",
    "input_lens", "output_lens", "ttfts", "itls", "errors", "request_rate", "burstiness",
    "max_concurrency", "num_prompts", "model_id",
    # apex-grpc's own
    "errors_by_code", "server_stats_delta", "policy", "cancelled", "target",
)


def test_run_writes_vllm_result_matching_server_counters(fake_server, tmp_path, capsys) -> None:
    servicer, target = fake_server
    servicer.reject_every = 0
    result_file = tmp_path / "result.json"
    _run_cli(target, result_file, "--num-prompts", "24", "--request-rate", "200",
             "--num-warmups", "2", "--goodput", "ttft:10000", "--metric-percentiles", "50")
    result = json.loads(result_file.read_text())
    assert [key for key in VLLM_KEYS if key not in result] == []
    assert result["completed"] == 24 and result["failed"] == 0 and result["cancelled"] == 0
    assert result["policy"] == "fake-policy" and result["target"] == target
    assert result["request_rate"] == 200.0 and "p50_itl_ms" in result
    assert result["request_goodput"] == pytest.approx(24 / result["duration"])
    # Warm-ups ran before the first snapshot, so the deltas are exactly the measured run's.
    delta = result["server_stats_delta"]
    assert result["total_output_tokens"] == delta["generation_tokens_total"]
    assert result["total_input_tokens"] == delta["prompt_tokens_total"]
    assert result["output_lens"] == [len(itls) + 1 for itls in result["itls"]]
    assert all(6 * 0.5 <= n <= 6 * 1.5 for n in result["output_lens"])
    assert len(result["ttfts"]) == 24 and min(result["ttfts"]) > 0.0
    summary = capsys.readouterr().out
    assert "Serving Benchmark Result" in summary and "Mean TPOT (ms):" in summary


def test_errors_are_counted_by_grpc_code(fake_server, tmp_path) -> None:
    servicer, target = fake_server
    servicer.reject_every = 5
    try:
        _run_cli(target, tmp_path / "r.json", "--num-prompts", "20")
    finally:
        servicer.reject_every = 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["errors_by_code"] == {"RESOURCE_EXHAUSTED": 4}
    assert result["completed"] == 16 and result["failed"] == 4
    assert [i for i, code in enumerate(result["errors"]) if code] == [4, 9, 14, 19]


def test_cancellation_injection_cancels_after_k_tokens(fake_server, tmp_path) -> None:
    servicer, target = fake_server
    _run_cli(target, tmp_path / "c.json", "--num-prompts", "12", "--random-output-len", "20",
             "--random-range-ratio", "0", "--cancel-fraction", "0.5",
             "--cancel-after-tokens", "3")
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["cancelled"] == 6 and result["completed"] == 6 and result["failed"] == 0
    # One token per message: each cancelled stream saw exactly 3 tokens.
    assert result["cancelled_output_tokens"] == 18
    assert result["server_stats_after"]["num_running"] == 0


def test_max_concurrency_caps_streams_in_flight(fake_server, tmp_path) -> None:
    servicer, target = fake_server
    servicer.peak_running = 0
    _run_cli(target, tmp_path / "m.json", "--num-prompts", "12", "--max-concurrency", "3")
    assert 1 <= servicer.peak_running <= 3
    assert json.loads((tmp_path / "m.json").read_text())["max_concurrency"] == 3


def test_sweep_writes_one_labelled_result_per_rate_and_target(fake_server, tmp_path) -> None:
    servicer, target = fake_server
    _run_cli(target, tmp_path / "sweep.json", "--num-prompts", "6", "--request-rates",
             "100,inf", "--targets", f"{target},{target}", "--auth-token", "secret")
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["sweep-fake-policy-100qps.json", "sweep-fake-policy-infqps.json"]
    rates = {json.loads((tmp_path / name).read_text())["request_rate"] for name in written}
    assert rates == {100.0, "inf"}
    assert servicer.authorizations == {"Bearer secret"}


def test_unreachable_server_and_bad_flags_exit_with_a_message(tmp_path, capsys) -> None:
    assert main(["--target", "127.0.0.1:1", "--request-rate", "0"]) == 2
    assert "request rate must be > 0" in capsys.readouterr().err
    assert main(["--goodput", "latency:5"]) == 2
    assert "--goodput" in capsys.readouterr().err
    assert main(["--tls-ca", str(tmp_path / "missing.pem")]) == 2
    assert "--tls-ca" in capsys.readouterr().err


def test_request_message_carries_prompt_and_stopping() -> None:
    ids = BenchRequest(prompt_ids=(5, 6), prompt_text=None, input_len=2, output_len=4,
                       ignore_eos=True)
    message = build_generate_request(ids, "bench-x-0")
    assert list(message.token_ids.ids) == [5, 6] and message.WhichOneof("input") == "token_ids"
    assert message.stopping.max_new_tokens == 4 and message.stopping.ignore_eos
    assert message.response.token_ids
    text = BenchRequest(prompt_ids=None, prompt_text="hi", input_len=1, output_len=2,
                        ignore_eos=False)
    assert build_generate_request(text, "r").text == "hi"
    assert ConnectionOptions("h:1", auth_token="tok").metadata == (("authorization",
                                                                    "Bearer tok"),)
    assert ConnectionOptions("h:1").metadata == ()
