"""Step executors: one per execution strategy, each owning its layer loop over the model's
layer-stack API (model/llama.py) and the two attention sides (attention/base.py).

Adding a strategy means one new module here, its entry in EXECUTORS, and the chooser that picks
it (scheduler/).
"""

from __future__ import annotations

from apex_grpc.runner.executors.async_overlap import AsyncOverlapExecutor
from apex_grpc.runner.executors.common import StepExecutor
from apex_grpc.runner.executors.gpu_only import GpuOnlyExecutor
from apex_grpc.runner.executors.pipeline import AsymmetricPipelineExecutor
from apex_grpc.scheduler.plan import Strategy

EXECUTORS: dict[Strategy, type[StepExecutor]] = {
    Strategy.GPU_ONLY: GpuOnlyExecutor,
    Strategy.ASYNC_OVERLAP: AsyncOverlapExecutor,
    Strategy.ASYMMETRIC_PIPELINE: AsymmetricPipelineExecutor,
}
assert set(EXECUTORS) == set(Strategy), "every strategy needs an executor"

__all__ = ["EXECUTORS", "StepExecutor"]
