"""The real-device policy grid: one command that profiles the card, serves dummy weights of a
model's shapes (Llama-3.1-8B by default) with each policy at several GPU KV budgets under a
decode-heavy load, and prints measured throughput and goodput next to `apex-grpc simulate`'s
prediction from the measured profile.

Every step is a subprocess of the project's own tools, with its own timeout (a hung CUDA call
must not burn a lease), and the whole grid has a deadline after which the remaining cells are
reported as not run:
1. `apex-grpc profile --quick` on the dummy model -> profile.json in the --out directory.
2. Per GPU KV budget: `apex-grpc simulate --json` with that profile (every policy, the same
   engine limits and workload shape); per policy: `apex-grpc serve` with the profile and the
   TPOT target, ready through its health service, `apex-bench` (all requests at t=0, the
   random dataset, --result-json), then the server is stopped.
3. One table. Goodput is the simulator's: output tokens/s of requests whose mean TPOT met the
   target, computed from apex-bench's per-request arrays (apex-bench's own request_goodput
   counts requests). Then the acceptance checks of issue 15, and one JSON line of every cell.

    python -m apex_grpc.bench.policy_grid [--out DIR]   # GPU: about 4 minutes
    python -m apex_grpc.bench.policy_grid --smoke       # CPU: tiny model, one budget, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLICIES = ("gpu-only", "neo", "apex")
# A Llama-shaped model small enough for a 2-core CPU: 2 layers, GQA 4/2, head_dim 32.
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
# Acceptance (issue 15): apex goodput >= 0.98x the better baseline at every budget and >= 1.3x
# gpu-only at the smallest; measured throughput within 20% of the simulator's.
MIN_GOODPUT_VS_BEST, MIN_GOODPUT_VS_GPU_ONLY_SMALLEST, MAX_SIM_DEVIATION = 0.98, 1.3, 0.2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class GridSpec:
    dummy_config: str
    device: str
    dtype: str
    budgets: tuple[int, ...]  # GPU KV tokens
    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float
    tpot_slo_ms: float
    host_kv_tokens: int
    max_num_seqs: int
    max_batched_tokens: int
    block_size: int
    profile_budget_s: float
    num_warmups: int
    seed: int


class StepError(RuntimeError):
    """A subprocess failed or timed out; the message carries the tail of its log."""


class Interrupted(Exception):
    """SIGTERM (e.g. the outer timeout of scripts/gpu_check.sh): stop, kill the current
    subprocess, print what was measured."""


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted()


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run_step(name: str, cmd: list[str], timeout_s: float, log_path: Path) -> str:
    """Run cmd to completion within timeout_s (its whole process group is killed past it);
    return its stdout, the log keeping stdout and stderr."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise StepError(f"{name}: timed out after {timeout_s:.0f} s\n{_tail(log_path)}")
        except BaseException:
            _kill_group(proc)
            raise
        log.write(out)
    if proc.returncode != 0:
        raise StepError(f"{name}: exit {proc.returncode}\n{_tail(log_path)}")
    return out


def _kill_group(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """SIGTERM to the process group the step started, SIGKILL if it outlives the grace (short:
    gpu_check.sh's timeout SIGKILLs this script 5 s after its own SIGTERM, and a server left
    behind would hold the GPU)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join("    " + line for line in text[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_kv_gib(spec: GridSpec, host_kv_tokens: int) -> float:
    """The host tier of host_kv_tokens tokens in GiB (what `serve --host-kv-gb` takes)."""
    from apex_grpc.model.loader import resolve_dummy_config

    config = resolve_dummy_config(spec.dummy_config)
    per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                 * DTYPE_BYTES[spec.dtype])
    return host_kv_tokens * per_token / (1 << 30)


def profile_cmd(spec: GridSpec, out: Path) -> list[str]:
    return _python("apex_grpc", "profile", "--load-format", "dummy", "--dummy-config",
                   spec.dummy_config, "--device", spec.device, "--dtype", spec.dtype, "--quick", "--budget-s",
                   str(spec.profile_budget_s), "--output", str(out))


def simulate_cmd(spec: GridSpec, profile: Path, budget: int) -> list[str]:
    return _python("apex_grpc", "simulate", "--profile", str(profile), "--json",
                   "--policies", ",".join(POLICIES), "--gpu-kv-tokens", str(budget),
                   "--host-kv-tokens", str(spec.host_kv_tokens),
                   "--num-requests", str(spec.num_requests), "--input-len", str(spec.input_len),
                   "--output-len", str(spec.output_len), "--range-ratio", str(spec.range_ratio),
                   "--seed", str(spec.seed), "--tpot-slo-ms", str(spec.tpot_slo_ms),
                   "--max-num-seqs", str(spec.max_num_seqs), "--block-size", str(spec.block_size),
                   "--max-batched-tokens", str(spec.max_batched_tokens))


def serve_cmd(spec: GridSpec, profile: Path, budget: int, policy: str, port: int) -> list[str]:
    return _python("apex_grpc", "serve", "--load-format", "dummy", "--dummy-config",
                   spec.dummy_config, "--device", spec.device, "--dtype", spec.dtype,
                   "--policy", policy,
                   "--gpu-kv-blocks", str(budget // spec.block_size),
                   "--block-size", str(spec.block_size),
                   "--host-kv-gb", f"{host_kv_gib(spec, spec.host_kv_tokens):.6f}",
                   "--max-num-seqs", str(spec.max_num_seqs),
                   "--max-batched-tokens", str(spec.max_batched_tokens),
                   # No step holds more rows than the workload has requests: fewer graphs to
                   # capture at each server's start.
                   "--cuda-graph-max-batch", str(min(spec.max_num_seqs, spec.num_requests)),
                   "--profile", str(profile), "--tpot-slo-ms", str(spec.tpot_slo_ms),
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--shutdown-grace", "1")


def bench_cmd(spec: GridSpec, port: int, result: Path, timeout_s: float) -> list[str]:
    return _python("clients.bench.cli", "--target", f"127.0.0.1:{port}",
                   "--num-prompts", str(spec.num_requests), "--request-rate", "inf",
                   "--dataset-name", "random", "--random-input-len", str(spec.input_len),
                   "--random-output-len", str(spec.output_len),
                   "--random-range-ratio", str(spec.range_ratio), "--seed", str(spec.seed),
                   "--num-warmups", str(spec.num_warmups),
                   "--goodput", f"tpot:{spec.tpot_slo_ms:g}",
                   "--request-timeout", str(timeout_s), "--result-json", str(result),
                   "--disable-tqdm")


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log_path: Path) -> None:
    """Poll the server's readiness (health service) until SERVING; fail early if it exits."""
    from clients.client import ApexClient

    deadline = time.monotonic() + timeout_s
    client = ApexClient(f"127.0.0.1:{port}")
    try:
        while True:
            if proc.poll() is not None:
                raise StepError(f"server exited with {proc.returncode} before it was ready\n"
                                f"{_tail(log_path)}")
            try:
                client.wait_until_ready(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise StepError(f"server not ready after {timeout_s:.0f} s\n"
                                    f"{_tail(log_path)}") from None
    finally:
        client.close()


def token_goodput(result: dict, tpot_slo_ms: float) -> float:
    """Output tokens/s of requests whose mean TPOT met the target (the simulator's goodput):
    a request's TPOT is its last chunk minus its first over its tokens after the first."""
    good = 0
    for output_len, itls in zip(result["output_lens"], result["itls"]):
        if output_len <= 1 or sum(itls) / (output_len - 1) * 1e3 <= tpot_slo_ms:
            good += output_len
    return good / result["duration"]


def serve_and_bench(spec: GridSpec, profile: Path, budget: int, policy: str, out: Path,
                    timeouts: dict[str, float]) -> dict:
    port = _free_port()
    log_path = out / f"serve-{policy}-{budget}.log"
    result_path = out / f"bench-{policy}-{budget}.json"
    with open(log_path, "w") as log:
        server = subprocess.Popen(serve_cmd(spec, profile, budget, policy, port),
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(server, port, timeouts["ready"], log_path)
        run_step(f"apex-bench {policy} {budget}", bench_cmd(spec, port, result_path,
                                                           timeouts["bench"]),
                 timeouts["bench"], out / f"bench-{policy}-{budget}.log")
    finally:
        _kill_group(server)
    result = json.loads(result_path.read_text())
    return {"output_throughput": result["output_throughput"],
            "goodput": token_goodput(result, spec.tpot_slo_ms),
            "median_tpot_ms": result["median_tpot_ms"], "completed": result["completed"],
            "failed": result["failed"]}


def run_grid(spec: GridSpec, out: Path, timeouts: dict[str, float], deadline_s: float
             ) -> tuple[dict[int, dict[str, dict]], list[str]]:
    """cells[budget][policy] = {"measured": {...} | None, "predicted": {...} | None} and the
    errors met. A step that fails or times out costs its cell, not the grid; past deadline_s
    the remaining cells are not run."""
    cells = {b: {p: {"measured": None, "predicted": None} for p in POLICIES} for b in spec.budgets}
    errors: list[str] = []
    try:
        _measure_cells(spec, out, timeouts, deadline_s, cells, errors)
    except Interrupted:
        errors.append("interrupted by SIGTERM: the cells left are not run")
    return cells, errors


def _measure_cells(spec: GridSpec, out: Path, timeouts: dict[str, float], deadline_s: float,
                   cells: dict[int, dict[str, dict]], errors: list[str]) -> None:
    start = time.monotonic()
    profile = out / "profile.json"
    try:
        run_step("profile", profile_cmd(spec, profile), timeouts["profile"], out / "profile.log")
    except StepError as exc:
        errors.append(str(exc))
        return
    print(f"# profile measured in {time.monotonic() - start:.0f} s", flush=True)
    for budget in spec.budgets:
        try:
            report = json.loads(run_step(f"simulate {budget}", simulate_cmd(spec, profile, budget),
                                         timeouts["simulate"], out / f"simulate-{budget}.log"))
            for policy in POLICIES:
                cells[budget][policy]["predicted"] = report["policies"][policy]
        except StepError as exc:
            errors.append(str(exc))
        for policy in POLICIES:
            if time.monotonic() - start > deadline_s:
                errors.append(f"{policy} at {budget} tokens: not run, past the {deadline_s:.0f} "
                              "s deadline")
                continue
            began = time.monotonic()
            try:
                cells[budget][policy]["measured"] = serve_and_bench(spec, profile, budget,
                                                                    policy, out, timeouts)
            except Exception as exc:  # a failed cell must not stop the grid
                errors.append(f"{policy} at {budget} tokens: {type(exc).__name__}: {exc}")
            print(f"# {policy:8s} at {budget:6d} GPU KV tokens: {time.monotonic() - began:.0f} s",
                  flush=True)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(spec: GridSpec, cells: dict[int, dict[str, dict]]) -> str:
    header = ("| GPU KV tokens | policy | tput tok/s | sim tput | tput / sim | goodput tok/s | "
              "sim goodput | goodput / best baseline | median TPOT ms | failed |")
    lines = [f"TPOT target {spec.tpot_slo_ms:g} ms, {spec.num_requests} requests of "
             f"{spec.input_len} + {spec.output_len} tokens (+-{spec.range_ratio:g}), all at t=0",
             header, "|" + "---|" * (header.count("|") - 1)]
    for budget, row in cells.items():
        good = {p: (c["measured"] or {}).get("goodput") for p, c in row.items()}
        best = max((good[p] for p in ("gpu-only", "neo") if good[p] is not None), default=None)
        for policy, cell in row.items():
            measured, predicted = cell["measured"] or {}, cell["predicted"] or {}
            tput, sim_tput = measured.get("output_throughput"), predicted.get("output_throughput")
            ratio = tput / sim_tput if tput is not None and sim_tput else None
            vs_best = good[policy] / best if good[policy] is not None and best else None
            lines.append(
                f"| {budget} | {policy} | {_fmt(tput)} | {_fmt(sim_tput)} | {_fmt(ratio, 2)} | "
                f"{_fmt(good[policy])} | {_fmt(predicted.get('goodput'))} | {_fmt(vs_best, 2)} | "
                f"{_fmt(measured.get('median_tpot_ms'))} | "
                f"{measured.get('failed', '-')} |")
    return "\n".join(lines)


def acceptance(cells: dict[int, dict[str, dict]]) -> list[str]:
    """One PASS/MISS line per check of issue 15 (cells without a figure say so)."""
    lines = []
    smallest = min(cells)
    for budget, row in cells.items():
        good = {p: (c["measured"] or {}).get("goodput") for p, c in row.items()}
        if None in good.values():
            lines.append(f"MISS {budget} tokens: a policy has no measurement")
            continue
        best = max(good["gpu-only"], good["neo"])
        ratio = good["apex"] / best if best else float("inf")
        lines.append(f"{'PASS' if ratio >= MIN_GOODPUT_VS_BEST else 'MISS'} {budget} tokens: "
                     f"apex goodput {ratio:.2f}x the better baseline (>= {MIN_GOODPUT_VS_BEST})")
        if budget == smallest:
            ratio = good["apex"] / good["gpu-only"] if good["gpu-only"] else float("inf")
            lines.append(f"{'PASS' if ratio >= MIN_GOODPUT_VS_GPU_ONLY_SMALLEST else 'MISS'} "
                         f"{budget} tokens: apex goodput {ratio:.2f}x gpu-only "
                         f"(>= {MIN_GOODPUT_VS_GPU_ONLY_SMALLEST})")
        for policy, cell in row.items():
            predicted = (cell["predicted"] or {}).get("output_throughput")
            if not predicted:
                lines.append(f"MISS {budget} tokens {policy}: no prediction")
                continue
            deviation = cell["measured"]["output_throughput"] / predicted - 1
            lines.append(f"{'PASS' if abs(deviation) <= MAX_SIM_DEVIATION else 'MISS'} {budget} "
                         f"tokens {policy}: throughput {deviation:+.0%} vs the simulator "
                         f"(within {MAX_SIM_DEVIATION:.0%})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m apex_grpc.bench.policy_grid",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run: tiny Llama-shaped model, one budget, few requests")
    parser.add_argument("--out", default="/tmp/apex-policy-grid",
                        help="where logs, the profile and apex-bench results go")
    parser.add_argument("--dummy-config", default=None, help="default llama-3.1-8b")
    parser.add_argument("--budgets", default=None, help="GPU KV tokens, comma separated "
                        "(default 2048,4096,16384,65536)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--tpot-slo-ms", type=float, default=None)
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no serving run after this long (default 235; smoke 50)")
    return parser


def grid_spec(args: argparse.Namespace) -> GridSpec:
    """Sized for about 4 minutes on an H100/H200 with eager decode steps: the quick profile
    (~45 s with the model load), 12 server starts of ~10-15 s each and their runs, the slowest
    being gpu-only at 2K GPU KV tokens (~6 requests at a time, ~10 s); budgets run smallest
    first, so a deadline cuts the least telling one. --smoke: under a minute on 2 cores."""
    smoke = args.smoke
    budgets = args.budgets or ("256" if smoke else "2048,4096,16384,65536")
    return GridSpec(
        dummy_config=args.dummy_config or "llama-3.1-8b", device="cpu" if smoke else "cuda",
        dtype="float32" if smoke else "bfloat16",
        budgets=tuple(sorted(int(b) for b in budgets.split(",") if b)),
        num_requests=args.num_requests or (6 if smoke else 24),
        input_len=args.input_len or (48 if smoke else 256),
        output_len=args.output_len or (12 if smoke else 96), range_ratio=0.2,
        tpot_slo_ms=args.tpot_slo_ms or (1000.0 if smoke else 50.0),
        host_kv_tokens=4096 if smoke else 16384, max_num_seqs=64, max_batched_tokens=2048,
        block_size=16, profile_budget_s=3.0 if smoke else 25.0,
        num_warmups=0 if smoke else 1, seed=0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke and args.dummy_config is None:
        config_dir = out / "tiny-llama"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "config.json").write_text(json.dumps(SMOKE_CONFIG))
        args.dummy_config = str(config_dir / "config.json")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit("policy_grid: the grid needs a CUDA device (use --smoke on the CPU)")
    spec = grid_spec(args)
    timeouts = ({"profile": 60, "simulate": 30, "ready": 30, "bench": 30} if args.smoke else
                {"profile": 120, "simulate": 60, "ready": 45, "bench": 45})
    deadline = args.deadline_s or (50.0 if args.smoke else 235.0)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    cells, errors = run_grid(spec, out, timeouts, deadline)
    print(format_table(spec, cells))
    for line in acceptance(cells):
        print(line)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(json.dumps({"bench": "policy_grid", "spec": spec.__dict__, "cells": {
        str(budget): row for budget, row in cells.items()}, "errors": errors}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
