"""The `apex-bench` console script: flags named as in `vllm bench serve`, over gRPC.

`apex-bench [flags]` runs a benchmark (or a sweep over --request-rates and --targets, one result
per run); `apex-bench plot RESULT.json ... --output plot.png` draws throughput vs latency.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from clients.bench.arrivals import ArrivalError, parse_rate
from clients.bench.metrics import MetricsError, compute_metrics, parse_goodput, parse_percentiles
from clients.bench.plot import PlotError, load_results, plot_results
from clients.bench.report import RunInfo, build_result, format_summary, result_path, write_result
from clients.bench.runner import (
    BenchError,
    ConnectionOptions,
    RunOptions,
    ServerDescription,
    describe_server,
    run_benchmark,
)
from clients.bench.workloads import (
    DATASET_NAMES,
    BenchRequest,
    WorkloadError,
    check_fits_context,
    fixed_workload,
    inject_cancellations,
    random_workload,
    sharegpt_workload,
)
from clients.fleet import LOAD_BALANCING_POLICIES

DEFAULT_TARGET = "127.0.0.1:50051"
USER_ERRORS = (ArrivalError, BenchError, MetricsError, PlotError, WorkloadError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apex-bench", description="Serving benchmark for apex-grpc (vLLM-style metrics). "
        "`apex-bench plot RESULT.json ... --output plot.png` plots results.")
    server = parser.add_argument_group("server")
    server.add_argument("--target", default=DEFAULT_TARGET,
                        help="host:port of the server, or any gRPC target (dns:///NAME:PORT "
                        "with --load-balancing round_robin for a fleet behind one name)")
    server.add_argument("--targets", help="comma-separated host:port list (one server per "
                        "policy); runs each in turn and overrides --target")
    server.add_argument("--replicas", help="comma-separated IP:PORT list of one fleet: the load "
                        "goes over gRPC round_robin to every ready replica, GetStats are summed; "
                        "overrides --target and --targets")
    server.add_argument("--load-balancing", choices=LOAD_BALANCING_POLICIES,
                        help="gRPC load-balancing policy of the channel (round_robin also "
                        "watches each replica's readiness); default: gRPC's pick_first, or "
                        "round_robin with --replicas")
    server.add_argument("--max-retries", type=int, default=RunOptions.max_retries,
                        help="resend a request refused with UNAVAILABLE before its first token "
                        "(never after one) up to this many times")
    server.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    server.add_argument("--tls-ca", help="PEM root certificate(s) of the server (implies TLS)")
    server.add_argument("--auth-token", help="bearer token sent as authorization metadata")
    server.add_argument("--request-timeout", type=float, help="per-request deadline in seconds")

    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=1000)
    load.add_argument("--request-rate", default="inf",
                      help="requests per second (Poisson/gamma arrivals); inf sends all at once")
    load.add_argument("--request-rates", help="comma-separated rates to sweep, e.g. 1,2,4,inf")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrivals: 1 = Poisson, < 1 burstier")
    load.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    load.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests first")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--cancel-fraction", type=float, default=0.0,
                      help="share of requests the client cancels after --cancel-after-tokens")
    load.add_argument("--cancel-after-tokens", type=int, default=8)

    data = parser.add_argument_group("workload")
    data.add_argument("--dataset-name", choices=DATASET_NAMES, default="random")
    data.add_argument("--dataset-path", help="ShareGPT-format JSON (for --dataset-name sharegpt)")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--fixed-input-len", type=int, default=1024)
    data.add_argument("--fixed-output-len", type=int, default=128)
    data.add_argument("--sharegpt-output-len", type=int,
                      help="fixed output length instead of the reference answer's chars / 4")
    data.add_argument("--ignore-eos", action="store_true",
                      help="ignore EOS for sharegpt prompts (random and fixed always do)")

    output = parser.add_argument_group("output")
    output.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                        help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    output.add_argument("--metric-percentiles", default="90,99",
                        help="comma-separated percentiles (90 and 99 are always reported)")
    output.add_argument("--result-json", help="write the result here (one file per sweep run)")
    output.add_argument("--disable-tqdm", action="store_true")
    output.add_argument("--settle-timeout", type=float, default=10.0,
                        help="seconds to wait for an idle server before each GetStats snapshot")
    return parser


def build_plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-bench plot",
                                     description="Output throughput vs TPOT/TTFT per policy.")
    parser.add_argument("results", nargs="+", help="result JSON files from --result-json")
    parser.add_argument("--output", default="plot.png", help="PNG file to write")
    return parser


def build_workload(args: argparse.Namespace, server: ServerDescription) -> list[BenchRequest]:
    if args.dataset_name == "random":
        requests = random_workload(args.num_prompts, args.random_input_len,
                                   args.random_output_len, args.random_range_ratio,
                                   server.vocab_size, args.seed)
    elif args.dataset_name == "fixed":
        requests = fixed_workload(args.num_prompts, args.fixed_input_len, args.fixed_output_len,
                                  server.vocab_size, args.seed)
    else:
        if not args.dataset_path:
            raise WorkloadError("--dataset-name sharegpt needs --dataset-path")
        requests = sharegpt_workload(args.dataset_path, args.num_prompts, args.seed,
                                     output_len=args.sharegpt_output_len,
                                     max_model_len=server.max_model_len or None,
                                     ignore_eos=args.ignore_eos)
    if server.max_model_len:
        check_fits_context(requests, server.max_model_len)
    if args.cancel_fraction > 0.0:
        requests = inject_cancellations(requests, args.cancel_fraction,
                                        args.cancel_after_tokens, args.seed)
    return requests


def _check_args(args: argparse.Namespace) -> None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise BenchError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise BenchError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.max_retries < 0:
        raise BenchError(f"--max-retries must be >= 0, got {args.max_retries}")


async def run_target(args: argparse.Namespace, target: str, rates: list[float],
                     num_runs: int) -> None:
    """Every rate against one server: print a summary and write a result per run."""
    replicas = tuple(_split(args.replicas)) if args.replicas else ()
    connection = ConnectionOptions(target=target, tls=args.tls, tls_ca=args.tls_ca,
                                   auth_token=args.auth_token, replicas=replicas,
                                   load_balancing=args.load_balancing)
    percentiles = parse_percentiles(args.metric_percentiles)
    goodput_slos = parse_goodput(args.goodput)
    stats_channels = connection.stats_channels()
    try:
        async with connection.open_channel() as channel:
            await _run_rates(args, target, rates, num_runs, connection, channel, stats_channels,
                             percentiles, goodput_slos)
    finally:
        for stats_channel in stats_channels:
            await stats_channel.close()


async def _run_rates(args: argparse.Namespace, target: str, rates: list[float], num_runs: int,
                     connection: ConnectionOptions, channel, stats_channels: list,
                     percentiles: tuple[float, ...], goodput_slos: dict[str, float]) -> None:
    try:
        server = await describe_server(channel, connection.metadata)
    except BenchError as exc:
        raise BenchError(f"{target}: {exc}") from None
    requests = build_workload(args, server)
    for rate in rates:
        options = RunOptions(request_rate=rate, burstiness=args.burstiness,
                             max_concurrency=args.max_concurrency,
                             num_warmups=args.num_warmups, seed=args.seed,
                             request_timeout_s=args.request_timeout,
                             settle_timeout_s=args.settle_timeout,
                             show_progress=not args.disable_tqdm,
                             max_retries=args.max_retries)
        run = await run_benchmark(channel, connection.metadata, requests, options,
                                  stats_channels)
        metrics = compute_metrics(run.records, run.duration_s, percentiles, goodput_slos)
        info = RunInfo(target=target, policy=server.policy, model_id=server.model_name,
                       dataset_name=args.dataset_name, num_prompts=len(requests),
                       request_rate=rate, burstiness=args.burstiness,
                       max_concurrency=args.max_concurrency, seed=args.seed)
        print(format_summary(info, metrics, run.stats_delta), flush=True)
        if args.result_json:
            result = build_result(info, metrics, run.records, run.stats_before,
                                  run.stats_after, run.stats_delta)
            path = result_path(args.result_json, info, num_runs)
            write_result(path, result)
            print(f"result written to {path}", flush=True)


async def run_sweep(args: argparse.Namespace) -> None:
    _check_args(args)
    rates = [parse_rate(text.strip())
             for text in (args.request_rates or args.request_rate).split(",") if text.strip()]
    targets = _split(args.targets or args.target)
    if args.replicas:  # one fleet: its label is the replica list
        targets = [",".join(_split(args.replicas))]
    if not rates or not targets:
        raise BenchError("no request rate or no target given")
    # Validate the metric flags before any server is contacted.
    parse_percentiles(args.metric_percentiles)
    parse_goodput(args.goodput)
    for target in targets:
        await run_target(args, target, rates, num_runs=len(rates) * len(targets))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "plot":
            plot_args = build_plot_parser().parse_args(argv[1:])
            path = plot_results(load_results(plot_args.results), plot_args.output)
            print(f"plot written to {path}")
        else:
            asyncio.run(run_sweep(build_parser().parse_args(argv)))
    except USER_ERRORS as exc:
        print(f"apex-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
