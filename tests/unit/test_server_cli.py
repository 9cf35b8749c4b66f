"""`apex-grpc` command line: flag mapping (flags and defaults come from the config dataclasses;
profile shares serve's model flags), the EngineConfig derivation, lazy sub-command dispatch, and
a SIGTERM drain of a real server process (FakeEngine behind it, under uvloop) ending with exit
code 0."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import types

import grpc
import pytest
import torch

from apex_grpc import cli
from apex_grpc.config import (KVPlacement, ModelConfig, ModelOptions, Policy, SchedulingOptions,
                              ServeOptions)
from apex_grpc.engine.builder import engine_config
from apex_grpc.flags import from_args
from apex_grpc.perf import profiler
from apex_grpc.perf.perf_model import Profile
from apex_grpc.platform import device_name
from apex_grpc.proto import generation_pb2 as pb
from apex_grpc.proto import generation_pb2_grpc
from apex_grpc.server.app import AUTH_TOKEN_ENV, ServerSettings
from tests.process_logs import read_until

UNIT_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = UNIT_DIR.parents[1]


def test_every_serve_flag_maps_onto_the_options():
    args = cli.build_parser().parse_args([
        "serve", "--model", "/m", "--load-format", "dummy", "--dummy-config", "tiny",
        "--device", "cpu", "--dtype", "bfloat16", "--policy", "neo", "--kv-placement", "host",
        "--gpu-kv-blocks", "10", "--gpu-kv-gb", "1.5", "--host-kv-gb", "2", "--block-size", "32",
        "--max-num-seqs", "8", "--max-batched-tokens", "512", "--max-model-len", "1024",
        "--cpu-attention-threads", "3", "--max-waiting", "5", "--max-step-stretch", "1.5",
        "--profile", "p.json", "--tpot-slo-ms", "40", "--cuda-layer-wait", "engine-thread",
        "--enforce-eager", "--cuda-graph-max-batch", "24", "--seed", "7", "--host", "0.0.0.0", "--port", "6000",
        "--metrics-port", "9100", "--tls-cert", "c.pem", "--tls-key", "k.pem",
        "--auth-token", "t", "--max-concurrent-streams", "9", "--max-message-bytes", "4096",
        "--max-queue-time-ms", "250", "--max-prompt-len", "99", "--shutdown-grace", "3",
        "--log-level", "debug"])
    options = cli.serve_options(args)
    assert (options.model, options.load_format, options.dummy_config) == ("/m", "dummy", "tiny")
    assert (options.device, options.dtype) == ("cpu", "bfloat16")
    assert options.policy is Policy.NEO and options.kv_placement is KVPlacement.HOST
    assert (options.gpu_kv_blocks, options.gpu_kv_gb, options.host_kv_gb) == (10, 1.5, 2.0)
    assert (options.block_size, options.max_num_seqs, options.max_batched_tokens) == (32, 8, 512)
    assert (options.max_model_len, options.cpu_attention_threads) == (1024, 3)
    assert (options.max_waiting, options.max_step_stretch) == (5, 1.5)
    assert (options.profile, options.tpot_slo_ms, options.seed) == ("p.json", 40.0, 7)
    assert options.cuda_layer_wait == "engine-thread"
    assert options.enforce_eager is True and options.cuda_graph_max_batch == 24
    settings = cli.server_settings(args, environ={})
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 6000, 9100)
    assert (settings.tls_cert, settings.tls_key, settings.auth_token) == ("c.pem", "k.pem", "t")
    assert (settings.max_concurrent_streams, settings.max_message_bytes) == (9, 4096)
    assert (settings.max_queue_time_ms, settings.shutdown_grace_s) == (250, 3.0)
    assert settings.max_prompt_len == 99


def test_unset_flags_take_the_dataclass_defaults():
    args = cli.build_parser().parse_args(["serve"])
    assert cli.serve_options(args) == ServeOptions()
    assert ServeOptions().enforce_eager is False  # CUDA graphs are on by default
    assert cli.server_settings(args, environ={}) == ServerSettings()


def test_profile_takes_the_model_and_hardware_flags_of_serve():
    model_flags = ["--model", "/m", "--load-format", "dummy", "--dummy-config", "tiny",
                   "--device", "cpu", "--dtype", "float32", "--cpu-attention-threads", "3",
                   "--seed", "5"]
    profile_args = profiler.build_parser().parse_args(model_flags + ["--output", "o.json"])
    serve_args = cli.build_parser().parse_args(["serve"] + model_flags)
    assert from_args(ModelOptions, profile_args) == ModelOptions(
        model="/m", load_format="dummy", dummy_config="tiny", device="cpu", dtype="float32",
        cpu_attention_threads=3, seed=5)
    assert from_args(ModelOptions, profile_args) == from_args(ModelOptions, serve_args)


def test_profile_command_writes_a_profile_that_matches_its_flags(tmp_path):
    tiny = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128}
    config_path, output = tmp_path / "tiny.json", tmp_path / "profile.json"
    config_path.write_text(json.dumps(tiny))
    assert cli.main(["profile", "--load-format", "dummy", "--dummy-config", str(config_path),
                     "--device", "cpu", "--dtype", "float32", "--cpu-attention-threads", "1",
                     "--quick", "--budget-s", "1", "--output", str(output)]) == 0
    Profile.load(str(output)).check_matches(ModelConfig.from_hf_dict(tiny), "float32",
                                            device_name(torch.device("cpu")), 1)


def test_engine_config_keeps_every_scheduling_option():
    options = ServeOptions(block_size=32, max_num_seqs=8, max_batched_tokens=512,
                           policy=Policy.NEO, kv_placement=KVPlacement.GPU, max_waiting=5,
                           max_step_stretch=1.5, max_model_len=1000)
    model = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, max_position_embeddings=4096)
    config = engine_config(options, model, num_gpu_blocks=20, num_host_blocks=7,
                           cpu_attention_threads=3)
    for field in dataclasses.fields(SchedulingOptions):
        assert getattr(config, field.name) == getattr(options, field.name), field.name
    assert (config.num_gpu_blocks, config.num_host_blocks) == (20, 7)
    assert (config.cpu_attention_threads, config.max_model_len) == (3, 20 * 32)


def test_defaults_bind_loopback_and_token_comes_from_the_environment():
    args = cli.build_parser().parse_args(["serve"])
    settings = cli.server_settings(args, environ={AUTH_TOKEN_ENV: "from-env"})
    assert (settings.host, settings.port, settings.auth_token) == ("127.0.0.1", 50051, "from-env")
    assert cli.server_settings(args, environ={}).auth_token is None
    assert cli.serve_options(args).policy is Policy.APEX


@pytest.mark.parametrize("command,module", [("profile", "apex_grpc.perf.profiler"),
                                            ("simulate", "apex_grpc.perf.simulate")])
def test_delegated_commands_get_their_argv(monkeypatch, command, module):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--out", "x.json", "--help"]) == 3
    assert seen == [["--out", "x.json", "--help"]]


def test_bad_serve_flags_exit_2_with_one_line(capsys):
    assert cli.main(["serve", "--tls-cert", "only-cert.pem", "--port", "0"]) == 2
    assert "--tls-cert and --tls-key" in capsys.readouterr().err
    assert cli.main(["serve", "--max-num-seqs", "0", "--port", "0"]) == 2
    assert "max_num_seqs must be positive" in capsys.readouterr().err


SERVER_SCRIPT = """
import logging, sys
sys.path.insert(0, {unit_dir!r})
from fake_engine import FakeEngine
from apex_grpc.cli import configure_logging
from apex_grpc.server.app import ServerSettings, run_server
configure_logging("info")
settings = ServerSettings(port=0, shutdown_grace_s=10.0, health_poll_s=0.05)
sys.exit(run_server(settings, lambda: FakeEngine(step_delay_s=0.05)))
"""


def test_sigterm_drains_in_flight_streams_and_exits_zero():
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT.format(unit_dir=str(UNIT_DIR))],
        stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    lines: list[str] = []
    try:
        listening = read_until(process, "event=listening", lines, timeout_s=20)
        ready = read_until(process, "apex-grpc ready on 127.0.0.1:", lines, timeout_s=20)
        assert "event_loop=uvloop" in listening
        assert "model=fake-model device=cpu policy=apex" in ready
        port = int(ready.split("127.0.0.1:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            stream = stub.GenerateStream(pb.GenerateRequest(text="q"), timeout=20)
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            read_until(process, "event=draining", lines, timeout_s=20)
            with pytest.raises(grpc.RpcError) as late:
                stub.Generate(pb.GenerateRequest(text="late"), timeout=5)
            rest = list(stream)
        # Drain the pipe so the child never blocks on a full stderr while exiting.
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        exit_code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert late.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rest[-1].finish_reason == pb.FINISH_REASON_EOS
    assert first.text + "".join(r.text for r in rest) == "Hello from the fake engine."
    assert exit_code == 0
