"""A hybrid step that fails mid-forward releases the CPU jobs of the layers it never staged:
the error surfaces, no worker is left waiting, and the next step runs normally."""

from __future__ import annotations

import pytest
import torch

from apex_grpc.engine.builder import build_engine_core
from apex_grpc.request import Tier
from apex_grpc.scheduler.plan import ScheduledSeq, StepPlan, Strategy

from tiny_options import tiny_serve_options


def host_decode_plan(block_size: int) -> StepPlan:
    assert block_size > 5  # one host block holds each sequence's 5 cached tokens + 1 new
    seqs = tuple(ScheduledSeq(f"h{i}", (7,), 5, (i,), Tier.HOST, True) for i in range(2))
    return StepPlan(Strategy.ASYNC_OVERLAP, (), (), seqs, ())


def test_failure_in_a_middle_layer_releases_the_later_layers_jobs(tiny_config_path,
                                                                   monkeypatch):
    core = build_engine_core(tiny_serve_options(tiny_config_path, policy="apex")).core
    runner = core.runner
    plan = host_decode_plan(core.config.block_size)
    reference = runner.execute(plan).sampled

    layer = runner.model.layers[0]
    monkeypatch.setattr(layer, "post_attention",
                        lambda *args: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        runner.execute(plan)  # would hang in end_step if a job stayed gated
    assert not runner.host._jobs

    monkeypatch.undo()
    assert runner.execute(plan).sampled == reference
    core.close()


def test_host_rows_not_laid_out_as_one_qkv_buffer_are_refused(tiny_config_path):
    """One copy moves a host row's q|k|v, so q, k and v must be views of one buffer."""
    core = build_engine_core(tiny_serve_options(tiny_config_path, policy="apex")).core
    host = core.runner.host
    heads = (host.num_heads, host.num_kv_heads, host.num_kv_heads)
    q, k, v = torch.zeros((2, sum(heads), host.head_dim)).split(heads, dim=1)
    with pytest.raises(ValueError, match="one q\\|k\\|v buffer"):
        host.stage(0, q, k.clone(), v, 0)
    with pytest.raises(ValueError, match="one q\\|k\\|v buffer"):
        host.stage(0, q, v, k, 0)  # k and v swapped
    core.close()
