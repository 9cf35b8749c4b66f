"""The engine and the simulator finish requests through the same Scheduler.update: given the
engine's sampled tokens, the simulator plans the same steps and ends a request on a stop
token id at the same step, for the same reason."""

from __future__ import annotations

from apex_grpc.engine.builder import build_engine_core
from apex_grpc.kv_cache.manager import KVCacheManager
from apex_grpc.perf.perf_model import PerfModel
from apex_grpc.perf.simulate import run_simulation
from apex_grpc.request import FinishReason, Request, SamplingParams, StoppingParams
from apex_grpc.scheduler.chooser import SimpleChooser
from apex_grpc.scheduler.scheduler import Scheduler
from tests.unit.perf_fixtures import make_profile

from tiny_options import tiny_serve_options

PROMPTS = {"gpu": [5, 6, 7, 8, 9], "host": [10, 11, 12], "long": list(range(20, 40))}
MAX_NEW_TOKENS = 12


def _requests(stopping: dict[str, StoppingParams]) -> list[Request]:
    return [Request(rid, list(ids), SamplingParams(), stopping[rid])
            for rid, ids in PROMPTS.items()]


def _rows(plan) -> list[tuple[str, int, int]]:
    return [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in plan.all_seqs]


class _EngineRun:
    """A fresh engine core (apex, alternate placement: every other request on the host tier)
    run to completion, recording each step's plan rows, sampled tokens and finishes."""

    def __init__(self, config_path: str, stopping: dict[str, StoppingParams]) -> None:
        self.plans: list[list[tuple[str, int, int]]] = []
        self.sampled: list[dict[str, int]] = []
        self.finished: dict[str, tuple[int, FinishReason]] = {}  # id -> (step, reason)
        self.tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
        self.num_host_decode_steps = 0
        core = build_engine_core(tiny_serve_options(config_path, policy="apex",
                                                    kv_placement="alternate")).core
        self.config, self.eos_token_ids = core.config, core.scheduler.eos_token_ids
        real_execute = core.runner.execute

        def recording_execute(plan):
            result = real_execute(plan)
            self.plans.append(_rows(plan))
            self.sampled.append(dict(result.sampled))
            self.num_host_decode_steps += bool(plan.host_decode_seqs)
            return result

        core.runner.execute = recording_execute
        try:
            for req in _requests(stopping):
                core.add_request(req)
            while core.has_work:
                for out in core.step():
                    self.tokens[out.request_id].extend(out.token_ids)
                    if out.finished:
                        self.finished[out.request_id] = (len(self.plans), out.finish_reason)
        finally:
            core.close()


def test_a_stop_token_id_finishes_on_the_same_step_in_engine_and_simulator(tiny_config_path):
    free = StoppingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    tokens = _EngineRun(tiny_config_path, dict.fromkeys(PROMPTS, free)).tokens["host"]
    # Stop "host" on its first token that did not occur before, past the first few steps.
    num_before = next(i for i in range(3, MAX_NEW_TOKENS) if tokens[i] not in tokens[:i])
    stopping = dict.fromkeys(PROMPTS, free)
    stopping["host"] = StoppingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                                      stop_token_ids=(tokens[num_before],))
    engine = _EngineRun(tiny_config_path, stopping)
    # Token i comes from step i + 1 (the prefill samples the first).
    assert engine.finished["host"] == (num_before + 1, FinishReason.STOP)
    assert engine.finished["gpu"] == (MAX_NEW_TOKENS, FinishReason.LENGTH)
    assert engine.num_host_decode_steps > 0

    config = engine.config
    scheduler = Scheduler(config, KVCacheManager(config.block_size, config.num_gpu_blocks,
                                                 config.num_host_blocks),
                          SimpleChooser(config.policy), eos_token_ids=engine.eos_token_ids)
    sim_requests = _requests(stopping)
    sim_plans: list[list[tuple[str, int, int]]] = []

    def replay_engine_tokens(plan):
        sim_plans.append(_rows(plan))
        return engine.sampled[len(sim_plans) - 1]

    run_simulation(scheduler, PerfModel(make_profile()), [(0.0, r) for r in sim_requests],
                   sample=replay_engine_tokens, check_integrity=True)
    assert sim_plans == engine.plans
    for req in sim_requests:
        last_step = max(step for step, rows in enumerate(sim_plans, 1)
                        if any(rid == req.request_id for rid, _, _ in rows))
        assert (last_step, req.finish_reason) == engine.finished[req.request_id]
