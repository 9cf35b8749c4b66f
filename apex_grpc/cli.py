"""The `apex-grpc` command line: `serve`, and lazy dispatch of `profile` and `simulate`.

Owns the mapping of serve flags onto config.ServeOptions (engine) and server.app.ServerSettings
(transport, limits, security, shutdown), logging set-up and the exit code. Heavy modules (torch,
the engine) are imported only when a command needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from apex_grpc.config import CUDA_LAYER_WAITS, HostKVDtype, KVPlacement, Policy, ServeOptions

AUTH_TOKEN_ENV = "APEX_GRPC_AUTH_TOKEN"
# Subcommands owned by other modules; each gets the remaining argv untouched.
DELEGATED_COMMANDS = {
    "profile": ("apex_grpc.scheduler.profiler",
                "measure the performance-model tables and write them as JSON"),
    "simulate": ("apex_grpc.scheduler.simulate",
                 "run the real scheduler against a profile with no model"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    defaults = ServeOptions()
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default=None, help="HF directory (config.json + safetensors + "
                       "tokenizer) or a .gguf file; default: the embedded SmolLM2-135M-Instruct")
    group.add_argument("--load-format", choices=("auto", "dummy"), default=defaults.load_format,
                       help="dummy = random weights of the given config (benchmarks)")
    group.add_argument("--dummy-config", default=None,
                       help="with --load-format dummy: a shipped config name or a config.json")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device)
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       default=defaults.dtype)
    group.add_argument("--policy", choices=[p.value for p in Policy],
                       default=defaults.policy.value)
    group.add_argument("--kv-placement", choices=[p.value for p in KVPlacement],
                       default=defaults.kv_placement.value,
                       help="force where new requests' KV goes (tests and benchmarks)")
    group.add_argument("--gpu-kv-blocks", type=int, default=None)
    group.add_argument("--gpu-kv-gb", type=float, default=None)
    group.add_argument("--host-kv-gb", type=float, default=defaults.host_kv_gb)
    group.add_argument("--host-kv-dtype", choices=[d.value for d in HostKVDtype],
                       default=defaults.host_kv_dtype.value,
                       help="host KV tier element type: auto (the model's dtype) or int8 "
                            "(8-bit rows + a scale per token and kv head: half the bytes)")
    group.add_argument("--block-size", type=int, default=defaults.block_size)
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    group.add_argument("--max-batched-tokens", type=int, default=defaults.max_batched_tokens)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--cpu-attention-threads", type=int, default=None)
    group.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                       help="waiting-queue bound; past it requests get RESOURCE_EXHAUSTED")
    group.add_argument("--max-step-stretch", type=float, default=defaults.max_step_stretch)
    group.add_argument("--profile", default=None,
                       help="performance-model profile: a JSON path or shipped name, 'auto' "
                            "(measure at start-up, the default on CUDA) or 'none' (fixed "
                            "per-policy rules, the default on the CPU)")
    group.add_argument("--cuda-layer-wait", choices=CUDA_LAYER_WAITS,
                       default=defaults.cuda_layer_wait,
                       help="CUDA: who waits for each layer's CPU attention (stream-wait: "
                            "the compute stream itself, on a pinned flag; host-func: a CUDA "
                            "host function on the compute stream; engine-thread: the engine "
                            "thread, natively; auto, the default: stream-wait where the GPU "
                            "supports it, else host-func)")
    group.add_argument("--tpot-slo-ms", type=float, default=None,
                       help="TPOT target the apex chooser keeps decode steps under")
    group.add_argument("--seed", type=int, default=defaults.seed)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    from apex_grpc.server.app import DEFAULT_MAX_MESSAGE_BYTES, ServerSettings

    defaults = ServerSettings()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=defaults.host)
    group.add_argument("--port", type=int, default=defaults.port)
    group.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on this port (off when unset)")
    group.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    group.add_argument("--tls-key", default=None, help="PEM private key")
    group.add_argument("--auth-token", default=None,
                       help=f"require 'authorization: Bearer TOKEN' (or set ${AUTH_TOKEN_ENV})")
    group.add_argument("--max-concurrent-streams", type=int,
                       default=defaults.max_concurrent_streams)
    group.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    group.add_argument("--max-prompt-len", type=int, default=None,
                       help="reject longer prompts (INVALID_ARGUMENT); default: the context")
    group.add_argument("--max-queue-time-ms", type=int, default=None,
                       help="give up (RESOURCE_EXHAUSTED) on requests with no output by then")
    group.add_argument("--shutdown-grace", type=float, default=defaults.shutdown_grace_s,
                       help="seconds in-flight streams get to finish on SIGTERM/SIGINT")
    group.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apex-grpc", description="LLM inference server for memory-tight GPUs (gRPC)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="start the gRPC server")
    _add_engine_flags(serve)
    _add_server_flags(serve)
    for name, (_, help_text) in DELEGATED_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        model=args.model, load_format=args.load_format, dummy_config=args.dummy_config,
        device=args.device, dtype=args.dtype, policy=Policy(args.policy),
        kv_placement=KVPlacement(args.kv_placement), gpu_kv_blocks=args.gpu_kv_blocks,
        gpu_kv_gb=args.gpu_kv_gb, host_kv_gb=args.host_kv_gb,
        host_kv_dtype=HostKVDtype(args.host_kv_dtype), block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len, cpu_attention_threads=args.cpu_attention_threads,
        max_waiting=args.max_waiting, max_step_stretch=args.max_step_stretch,
        profile=args.profile, tpot_slo_ms=args.tpot_slo_ms,
        cuda_layer_wait=args.cuda_layer_wait, seed=args.seed)


def server_settings(args: argparse.Namespace, environ: dict[str, str] | None = None):
    from apex_grpc.server.app import ServerSettings

    environ = os.environ if environ is None else environ
    return ServerSettings(
        host=args.host, port=args.port, metrics_port=args.metrics_port, tls_cert=args.tls_cert,
        tls_key=args.tls_key, auth_token=args.auth_token or environ.get(AUTH_TOKEN_ENV) or None,
        max_concurrent_streams=args.max_concurrent_streams,
        max_message_bytes=args.max_message_bytes, max_queue_time_ms=args.max_queue_time_ms,
        max_prompt_len=args.max_prompt_len,
        shutdown_grace_s=args.shutdown_grace)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _serve(args: argparse.Namespace) -> int:
    from apex_grpc.server.app import run_server

    configure_logging(args.log_level)
    options = serve_options(args)
    settings = server_settings(args)

    def engine_factory():
        from apex_grpc.engine.builder import build_engine

        return build_engine(options)

    return run_server(settings, engine_factory)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED_COMMANDS:
        module = importlib.import_module(DELEGATED_COMMANDS[argv[0]][0])
        return module.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _serve(args)
    except (ValueError, OSError) as exc:
        # Bad flags (ConfigError is a ValueError), a busy port, a missing TLS file: one line.
        print(f"apex-grpc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
