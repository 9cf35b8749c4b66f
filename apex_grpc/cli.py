"""The `apex-grpc` command line: `serve`, and lazy dispatch of `profile` and `simulate`.

Owns the grouping of serve's flags (apex_grpc.flags makes them from the fields of
config.ServeOptions and server.app.ServerSettings, which define them), logging set-up and the
exit code. Heavy modules (torch, the engine) are imported only when a command needs them, so
`--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from apex_grpc.config import ModelOptions, ServeOptions
from apex_grpc.flags import add_flags, from_args

# Subcommands owned by other modules; each gets the remaining argv untouched.
DELEGATED_COMMANDS = {
    "profile": ("apex_grpc.perf.profiler",
                "measure the performance-model tables and write them as JSON"),
    "simulate": ("apex_grpc.perf.simulate",
                 "run the real scheduler against a profile with no model"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    # What to load and where: `apex-grpc profile` takes this group too.
    add_flags(parser.add_argument_group("model and hardware"), ModelOptions)
    # The rest of ServeOptions: scheduling, KV sizing, performance model.
    add_flags(parser.add_argument_group("engine"), ServeOptions, without=ModelOptions)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    from apex_grpc.server.app import ServerSettings

    group = parser.add_argument_group("server")
    add_flags(group, ServerSettings)
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
    return from_args(ServeOptions, args)


def server_settings(args: argparse.Namespace, environ: dict[str, str] | None = None):
    from apex_grpc.server.app import AUTH_TOKEN_ENV, ServerSettings

    environ = os.environ if environ is None else environ
    return from_args(ServerSettings, args,
                     auth_token=args.auth_token or environ.get(AUTH_TOKEN_ENV) or None)


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
