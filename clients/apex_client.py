"""`apex-client`: send one request (text, token ids or chat) and stream the answer.

Owns the command-line flags (input, sampling, stopping, response options, connection) and the
terminal output: text deltas as they arrive and a one-line summary on stderr, or with --json a
single JSON object on stdout. Exit code 0 on success, 1 on an RPC error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from clients.client import AUTH_TOKEN_ENV, DEFAULT_TARGET, ApexClient, ApexError, GenerationResult


def _chat_message(value: str) -> tuple[str, str]:
    role, sep, content = value.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"--chat expects ROLE:CONTENT, got {value!r}")
    return role.strip(), content


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-client",
                                     description="Send one generation request to apex-grpc.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="prompt text")
    source.add_argument("--tokens", type=int, nargs="+", metavar="ID", help="prompt token ids")
    source.add_argument("--chat", type=_chat_message, nargs="+", metavar="ROLE:CONTENT",
                        help="chat messages, e.g. --chat system:'Be brief' user:'Hi'")
    connection = parser.add_argument_group("connection")
    connection.add_argument("--target", default=DEFAULT_TARGET, help="HOST:PORT")
    connection.add_argument("--tls", action="store_true", help="use TLS (system roots)")
    connection.add_argument("--ca-cert", help="PEM root certificate (implies --tls)")
    connection.add_argument("--auth-token", help=f"bearer token (default ${AUTH_TOKEN_ENV})")
    connection.add_argument("--timeout", type=float, help="deadline in seconds")
    connection.add_argument("--request-id")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int)
    stopping = parser.add_argument_group("stopping")
    stopping.add_argument("--max-new-tokens", type=int)
    stopping.add_argument("--min-new-tokens", type=int, default=0)
    stopping.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    stopping.add_argument("--stop-token-id", type=int, action="append", default=[])
    stopping.add_argument("--include-stop-strings", action="store_true")
    stopping.add_argument("--ignore-eos", action="store_true")
    stopping.add_argument("--time-limit-ms", type=int)
    output = parser.add_argument_group("output")
    output.add_argument("--no-special-tokens", action="store_true",
                        help="do not add BOS when tokenizing text")
    output.add_argument("--show-token-ids", action="store_true")
    output.add_argument("--logprobs", action="store_true")
    output.add_argument("--top-logprobs", type=int, default=0)
    output.add_argument("--unary", action="store_true", help="one Generate call, no streaming")
    output.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return parser


def request_kwargs(args: argparse.Namespace) -> dict:
    return {
        "text": args.text, "token_ids": args.tokens, "chat": args.chat,
        "request_id": args.request_id,
        "add_special_tokens": False if args.no_special_tokens else None,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
        "stop": args.stop, "stop_token_ids": args.stop_token_id,
        "include_stop_strings": args.include_stop_strings, "ignore_eos": args.ignore_eos,
        "time_limit_ms": args.time_limit_ms, "return_token_ids": args.show_token_ids,
        "logprobs": args.logprobs, "top_logprobs": args.top_logprobs,
    }


def _merge(chunks: list[GenerationResult]) -> GenerationResult:
    """A stream's messages folded into one result, as Generate would return it."""
    last = chunks[-1]
    return dataclasses.replace(
        last, text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        logprobs=tuple(lp for c in chunks for lp in c.logprobs))


def _summary(result: GenerationResult) -> str:
    timing = result.timing
    line = (f"[{result.request_id}] finish={result.finish_reason} "
            f"prompt_tokens={result.prompt_tokens} completion_tokens={result.completion_tokens}")
    if result.matched_stop:
        line += f" matched_stop={result.matched_stop!r}"
    if timing is not None:
        line += f" queue_ms={timing.queue_ms:.1f} ttft_ms={timing.ttft_ms:.1f} " \
                f"decode_ms={timing.decode_ms:.1f} preemptions={timing.num_preemptions}"
    return line


def _run(client: ApexClient, args: argparse.Namespace) -> GenerationResult:
    kwargs = request_kwargs(args)
    if args.unary:
        result = client.generate(timeout=args.timeout, **kwargs)
        if not args.json:
            print(result.text, flush=True)
        return result
    chunks = []
    stream = client.generate_stream(timeout=args.timeout, **kwargs)
    try:
        for chunk in stream:
            chunks.append(chunk)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()  # aborts the request on the server
        raise
    if not args.json:
        sys.stdout.write("\n")
    return _merge(chunks)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.auth_token or os.environ.get(AUTH_TOKEN_ENV) or None
    client = ApexClient(args.target, tls=args.tls or bool(args.ca_cert),
                        root_certificates=args.ca_cert, auth_token=token)
    try:
        with client:
            result = _run(client, args)
    except ApexError as exc:
        print(f"apex-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"apex-client: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        if args.show_token_ids:
            print(f"token_ids: {list(result.token_ids)}", file=sys.stderr)
        print(_summary(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
