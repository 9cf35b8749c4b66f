"""`apex-grpc simulate`: the real Scheduler and choosers against a profile, in simulated time.

No model and no tensors: each step takes the performance model's predicted time for the plan
plus its KV moves (evictions, parks and restores copy whole blocks before the forward pass),
sampled tokens are placeholders, and Scheduler.update finishes requests exactly as in the
engine (here at max_new_tokens, each request's output length). Prints per-policy
output throughput, goodput under a TPOT target and TTFT/TPOT percentiles, or (--grid) the
acceptance grid over GPU KV budgets and TPOT targets.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from apex_grpc.config import EngineConfig, Policy, SchedulingOptions
from apex_grpc.perf.host_kv_costs import host_tokens_for, with_host_kv_dtype
from apex_grpc.kv_cache.manager import KVCacheManager
from apex_grpc.request import Request, SamplingParams, StoppingParams, Tier
from apex_grpc.perf.perf_model import PerfModel, Profile
from apex_grpc.scheduler.apex_chooser import make_chooser
from apex_grpc.scheduler.chooser import HostDecode
from apex_grpc.scheduler.host_gate import make_host_gate
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy
from apex_grpc.scheduler.scheduler import Scheduler

_CHOOSE_ROWS = 256
# The token every simulated row samples. The simulated scheduler knows no EOS ids, so it
# never ends a request; max_new_tokens does.
PLACEHOLDER_TOKEN = 0


@dataclass(frozen=True)
class Workload:
    num_requests: int = 200
    request_rate: float = math.inf  # requests/s; inf = all arrive at t=0
    input_len: int = 512
    output_len: int = 1024
    range_ratio: float = 0.2
    seed: int = 0

    def requests(self) -> list[tuple[float, int, int]]:
        """(arrival_ms, prompt_len, output_len) per request, reproducible from the seed."""
        if self.num_requests <= 0 or self.input_len <= 0 or self.output_len <= 0:
            raise ValueError("--num-requests, --input-len and --output-len must be positive")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--range-ratio must be in [0, 1)")
        rng = random.Random(self.seed)
        arrival_ms, result = 0.0, []
        for _ in range(self.num_requests):
            if math.isfinite(self.request_rate):
                arrival_ms += rng.expovariate(self.request_rate) * 1e3
            result.append((arrival_ms, self._draw(rng, self.input_len),
                           self._draw(rng, self.output_len)))
        return result

    def _draw(self, rng: random.Random, mean_len: int) -> int:
        low = max(1, round(mean_len * (1 - self.range_ratio)))
        return rng.randint(low, max(low, round(mean_len * (1 + self.range_ratio))))


@dataclass(frozen=True)
class Setup:
    gpu_kv_tokens: int
    host_kv_tokens: int = 65536
    block_size: int = SchedulingOptions.block_size
    max_num_seqs: int = 256  # more than serve's default: capacity planning for large batches
    max_batched_tokens: int = SchedulingOptions.max_batched_tokens
    max_step_stretch: float = SchedulingOptions.max_step_stretch
    tpot_slo_ms: float | None = None


def build_scheduler(policy: Policy, setup: Setup, model: PerfModel,
                    max_model_len: int) -> Scheduler:
    num_host_blocks = 0 if policy == Policy.GPU_ONLY else setup.host_kv_tokens // setup.block_size
    config = EngineConfig(
        block_size=setup.block_size, num_gpu_blocks=setup.gpu_kv_tokens // setup.block_size,
        num_host_blocks=num_host_blocks, max_num_seqs=setup.max_num_seqs,
        max_batched_tokens=setup.max_batched_tokens, max_model_len=max_model_len,
        policy=policy, max_step_stretch=setup.max_step_stretch)
    kv = KVCacheManager(setup.block_size, config.num_gpu_blocks, num_host_blocks)
    return Scheduler(config, kv, make_chooser(policy, model, config, setup.tpot_slo_ms),
                     make_host_gate(policy, model, config, setup.tpot_slo_ms))


@dataclass
class _Timeline:
    arrival_ms: float
    output_len: int = 0  # known once the request finishes
    first_token_ms: float | None = None
    finish_ms: float | None = None


@dataclass
class SimResult:
    lines: list[_Timeline]
    steps: dict[Strategy, int]
    counters: dict[str, int]
    busy_ms: float  # simulated time spent in steps (not waiting for arrivals)


def simulate(policy: Policy, setup: Setup, profile: Profile, workload: Workload,
             check_integrity: bool = False) -> SimResult:
    """Run one policy to completion (summarize() turns the result into metrics)."""
    model = PerfModel(profile)
    specs = workload.requests()
    scheduler = build_scheduler(policy, setup, model, max(p + o for _, p, o in specs))
    arrivals = [(arrival, Request(f"r{i}", [1] * prompt_len, SamplingParams(),
                                  StoppingParams(max_new_tokens=output_len)))
                for i, (arrival, prompt_len, output_len) in enumerate(specs)]
    return run_simulation(scheduler, model, arrivals, check_integrity=check_integrity)


def placeholder_tokens(plan: StepPlan) -> dict[str, int]:
    return {s.request_id: PLACEHOLDER_TOKEN for s in plan.all_seqs if s.samples}


def run_simulation(scheduler: Scheduler, model: PerfModel, arrivals: list[tuple[float, Request]],
                   sample: Callable[[StepPlan], Mapping[str, int]] = placeholder_tokens,
                   check_integrity: bool = False) -> SimResult:
    """Step scheduler in simulated time until every request finished: a request joins at its
    arrival (ms), a step takes the predicted time of its plan and moves, sample gives each
    step's tokens and Scheduler.update appends them and finishes requests."""
    timelines: dict[str, _Timeline] = {}
    pending = sorted(arrivals, key=lambda item: item[0])
    pending.reverse()  # pop() takes the earliest (the first of equal arrivals)
    block_size = scheduler.config.block_size
    now_ms, busy_ms, steps = 0.0, 0.0, {s: 0 for s in Strategy}
    while pending or scheduler.has_work:
        while pending and pending[-1][0] <= now_ms:
            arrival, req = pending.pop()
            scheduler.add_request(req)
            timelines[req.request_id] = _Timeline(arrival)
        plan = scheduler.schedule() if scheduler.has_work else None
        if plan is None or plan.is_empty:
            if not pending:
                raise RuntimeError(f"{scheduler.config.policy.value}: requests wait but nothing "
                                   "can be scheduled (a prompt larger than the KV tiers?)")
            now_ms = max(now_ms, pending[-1][0])
            continue
        step_ms = model.predict_plan_ms(plan) + sum(
            model.copy_ms(len(m.src_blocks) * block_size, m.dst_tier) for m in plan.moves)
        now_ms += step_ms
        busy_ms += step_ms
        steps[plan.strategy] += 1
        for new in scheduler.update(plan, sample(plan)):
            line = timelines[new.req.request_id]
            if line.first_token_ms is None:
                line.first_token_ms = now_ms
            if new.finished:
                line.finish_ms = now_ms
                line.output_len = new.req.num_output_tokens
        if check_integrity:
            scheduler.kv.check_integrity()
    counters = {"preemptions": scheduler.num_preemptions, "evictions": scheduler.num_evictions,
                "restores": scheduler.num_restores, "parks": scheduler.num_parks}
    return SimResult(list(timelines.values()), steps, counters, busy_ms)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(result: SimResult, tpot_slo_ms: float | None) -> dict[str, Any]:
    """Throughput counts every output token; goodput only those of requests whose mean TPOT
    met the target."""
    lines = result.lines
    makespan_s = max(line.finish_ms for line in lines) / 1e3
    tpots = [(line.finish_ms - line.first_token_ms) / (line.output_len - 1)
             for line in lines if line.output_len > 1]
    ttfts = [line.first_token_ms - line.arrival_ms for line in lines]
    total = sum(line.output_len for line in lines)
    good = sum(line.output_len for line in lines if tpot_slo_ms is None or line.output_len <= 1
               or (line.finish_ms - line.first_token_ms) / (line.output_len - 1) <= tpot_slo_ms)
    return {
        "output_throughput": total / makespan_s, "goodput": good / makespan_s,
        "p50_tpot_ms": _percentile(tpots, 50), "p99_tpot_ms": _percentile(tpots, 99),
        "mean_tpot_ms": sum(tpots) / len(tpots) if tpots else 0.0,
        "p50_ttft_ms": _percentile(ttfts, 50), "p99_ttft_ms": _percentile(ttfts, 99),
        "duration_s": makespan_s, "num_requests": len(lines),
        "mean_step_ms": result.busy_ms / max(1, sum(result.steps.values())),
        "steps": {s.name.lower(): n for s, n in result.steps.items()}, **result.counters,
    }


def measure_choose_us(profile: Profile, policy: Policy, num_rows: int = _CHOOSE_ROWS,
                      repeats: int = 200, tpot_slo_ms: float | None = None
                      ) -> tuple[float, float]:
    """Median choose() time in us for num_rows decode rows (an eighth on the GPU), and the
    predicted step time in ms of the choice, for the decision-cost budget (< 2% of a step)."""
    model = PerfModel(profile)
    config = EngineConfig(num_host_blocks=1, max_num_seqs=num_rows, policy=policy)
    chooser = make_chooser(policy, model, config, tpot_slo_ms)
    num_gpu = num_rows // 8
    gpu = [ScheduledSeq(f"g{i}", (1,), 900 + i, tuple(range(57)), Tier.GPU, True)
           for i in range(num_gpu)]
    host = [HostDecode(f"h{i}", 900 + num_gpu + i, i % 4, False)
            for i in range(num_rows - num_gpu)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        choice = chooser.choose(gpu, host)
        times.append((time.perf_counter() - start) * 1e6)
    return _percentile(times, 50), choice.predicted_step_ms


def run_grid(profile: Profile, workload: Workload, base: Setup, gpu_kv_budgets: Sequence[int],
             tpot_targets: Sequence[float]) -> list[dict[str, Any]]:
    """One row per (GPU KV budget, TPOT target). gpu-only and neo ignore the target, so they
    run once per budget; apex runs once per target (it is its step limit)."""
    rows = []
    for budget in gpu_kv_budgets:
        setup = Setup(**{**base.__dict__, "gpu_kv_tokens": budget})
        baselines = {p: simulate(p, setup, profile, workload) for p in (Policy.GPU_ONLY,
                                                                        Policy.NEO)}
        for target in tpot_targets:
            apex_setup = Setup(**{**setup.__dict__, "tpot_slo_ms": target})
            results = {**baselines, Policy.APEX: simulate(Policy.APEX, apex_setup, profile,
                                                          workload)}
            metrics = {p.value: summarize(r, target) for p, r in results.items()}
            rows.append({"gpu_kv_tokens": budget, "tpot_slo_ms": target, "policies": metrics})
    return rows


def format_grid(rows: list[dict[str, Any]]) -> str:
    """A markdown table: throughput and goodput (tok/s) per policy, and the acceptance ratios."""
    header = ("| GPU KV tokens | TPOT target ms | tput gpu-only | tput neo | tput apex | "
              "apex/gpu-only | goodput gpu-only | goodput neo | goodput apex | "
              "apex/best goodput | p50 TPOT apex ms |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        m = row["policies"]
        tput = [m[p]["output_throughput"] for p in ("gpu-only", "neo", "apex")]
        good = [m[p]["goodput"] for p in ("gpu-only", "neo", "apex")]
        best = max(good[0], good[1])
        lines.append(
            f"| {row['gpu_kv_tokens']} | {row['tpot_slo_ms']:g} | {tput[0]:.1f} | {tput[1]:.1f} "
            f"| {tput[2]:.1f} | {tput[2] / tput[0]:.2f} | {good[0]:.1f} | {good[1]:.1f} | "
            f"{good[2]:.1f} | {good[2] / best if best else float('inf'):.2f} | "
            f"{m['apex']['p50_tpot_ms']:.1f} |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-grpc simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True,
                        help="a profile name shipped in apex_grpc/perf/profiles or a JSON path")
    parser.add_argument("--policies", default="gpu-only,neo,apex")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second (Poisson); inf = all at t=0")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--range-ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-kv-tokens", type=int, default=4096)
    parser.add_argument("--host-kv-tokens", type=int, default=Setup.host_kv_tokens,
                        help="host tier capacity in tokens of the model's dtype (its memory)")
    parser.add_argument("--host-kv-dtype", choices=("auto", "int8"), default="auto",
                        help="int8: the same host memory holds ~1.9x the tokens and the CPU "
                             "table is the profile's for (or derived for) an int8 tier")
    parser.add_argument("--block-size", type=int, default=Setup.block_size)
    parser.add_argument("--max-num-seqs", type=int, default=Setup.max_num_seqs)
    parser.add_argument("--max-batched-tokens", type=int, default=Setup.max_batched_tokens)
    parser.add_argument("--max-step-stretch", type=float, default=Setup.max_step_stretch)
    parser.add_argument("--tpot-slo-ms", type=float, default=None,
                        help="goodput counts requests whose mean TPOT meets it; apex also "
                        "uses it as its step limit")
    parser.add_argument("--check-integrity", action="store_true",
                        help="verify both KV tiers after every step")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--grid", action="store_true",
                        help="print the acceptance grid (GPU KV budgets x TPOT targets)")
    parser.add_argument("--grid-gpu-kv-tokens", type=_int_list, default=[2048, 4096, 16384, 65536])
    parser.add_argument("--grid-tpot-ms", type=_float_list, default=None,
                        help="TPOT targets of the grid (required with --grid)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = with_host_kv_dtype(Profile.load(args.profile), args.host_kv_dtype)
    args.host_kv_tokens = host_tokens_for(args.host_kv_tokens, args.host_kv_dtype,
                                          profile.dtype_bytes, profile.shape.head_dim)
    workload = Workload(args.num_requests, args.request_rate, args.input_len, args.output_len,
                        args.range_ratio, args.seed)
    setup = Setup(args.gpu_kv_tokens, args.host_kv_tokens, args.block_size, args.max_num_seqs,
                  args.max_batched_tokens, args.max_step_stretch, args.tpot_slo_ms)
    if args.grid:
        if not args.grid_tpot_ms:
            raise SystemExit("--grid needs --grid-tpot-ms (comma-separated TPOT targets)")
        rows = run_grid(profile, workload, setup, args.grid_gpu_kv_tokens, args.grid_tpot_ms)
        print(json.dumps({"grid": rows}) if args.json else format_grid(rows))
        return 0
    try:
        policies = [Policy(p.strip()) for p in args.policies.split(",") if p.strip()]
    except ValueError as exc:
        raise SystemExit(f"--policies: {exc}; use gpu-only, neo, apex") from None
    report: dict[str, Any] = {}
    for policy in policies:
        metrics = summarize(simulate(policy, setup, profile, workload, args.check_integrity),
                            args.tpot_slo_ms)
        if policy != Policy.GPU_ONLY:
            choose_us, step_ms = measure_choose_us(profile, policy, tpot_slo_ms=args.tpot_slo_ms)
            metrics["choose_us_256_rows"] = choose_us
            metrics["choose_share_of_step"] = choose_us / 1e3 / step_ms if step_ms else 0.0
            # The decision budget: under 2% of this profile's mean predicted step in the run.
            metrics["choose_share_of_mean_step"] = choose_us / 1e3 / metrics["mean_step_ms"]
        report[policy.value] = metrics
    if args.json:
        print(json.dumps({"policies": report}))
    else:
        _print_report(profile, report)
    return 0


def _print_report(profile: Profile, report: dict[str, Any]) -> None:
    print(f"profile {profile.name or profile.device_name}")
    print(f"{'policy':10} {'tok/s':>9} {'goodput':>9} {'p50 TPOT':>9} {'p99 TPOT':>9} "
          f"{'p50 TTFT':>10} {'mean step':>10} {'choose us@256 (% of mean step)':>31}")
    for name, m in report.items():
        choose = f"{m['choose_us_256_rows']:.0f} ({100 * m['choose_share_of_mean_step']:.2f}%)" \
            if "choose_us_256_rows" in m else "-"
        print(f"{name:10} {m['output_throughput']:9.1f} {m['goodput']:9.1f} "
              f"{m['p50_tpot_ms']:9.2f} {m['p99_tpot_ms']:9.2f} {m['p50_ttft_ms']:10.1f} "
              f"{m['mean_step_ms']:10.2f} {choose:>31}")
