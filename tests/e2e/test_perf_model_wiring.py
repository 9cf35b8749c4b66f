"""The served engine and its performance model: a start-up profile drives the APEX chooser and
is corrected by measured steps; a profile for another model is refused by name."""

from __future__ import annotations

import pytest

from apex_grpc.engine.builder import build_engine, build_engine_core
from apex_grpc.engine.offline import run_to_completion
from apex_grpc.request import StoppingParams
from apex_grpc.scheduler.apex_chooser import ApexChooser
from apex_grpc.perf.perf_model import ProfileMismatchError
from tests.e2e.conftest import tiny_serve_options


def test_startup_profile_drives_the_apex_chooser_and_learns_from_measured_steps(
        tiny_config_path):
    core = build_engine_core(tiny_serve_options(tiny_config_path, profile="auto")).core
    assert isinstance(core.scheduler.chooser, ApexChooser)
    prompts = {f"p{i}": [5 + i, 6, 7, 8] for i in range(4)}
    run_to_completion(core, prompts, stopping=StoppingParams(max_new_tokens=6, ignore_eos=True))
    stats = core.stats()
    assert stats.last_step_predicted_ms > 0 and stats.last_step_measured_ms > 0
    assert core.perf_model.num_observations >= 6
    core.close()


def test_a_profile_for_another_model_is_refused_by_name(tiny_config_path):
    with pytest.raises(ProfileMismatchError, match="model shape"):
        build_engine(tiny_serve_options(tiny_config_path, profile="h200-llama-3.1-8b"))
