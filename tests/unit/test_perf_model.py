"""Performance model: interpolation, step formulas, JSON round trip, mismatch, EWMA."""

from __future__ import annotations

import pytest

from apex_grpc.config import ModelConfig
from apex_grpc.perf.perf_model import (PerfModel, Profile, ProfileMismatchError, Table1D,
                                            Table2D)
from apex_grpc.scheduler.plan import Strategy
from tests.unit.perf_fixtures import SHAPE, make_profile


def test_table1d_interpolates_clamps_and_extrapolates():
    table = Table1D((10.0, 20.0, 40.0), (1.0, 2.0, 6.0))
    assert table.at(15) == pytest.approx(1.5)
    assert table.at(30) == pytest.approx(4.0)
    assert table.at(5) == pytest.approx(1.0)  # below the first point: its cost
    assert table.at(60) == pytest.approx(10.0)  # past the end: the last slope continues
    assert table.at(0) == 0.0


def test_table2d_is_bilinear():
    table = Table2D((1.0, 3.0), (100.0, 300.0), ((1.0, 3.0), (5.0, 7.0)))
    assert table.at(2, 200) == pytest.approx(4.0)
    assert table.at(1, 200) == pytest.approx(2.0)
    assert table.at(3, 300) == pytest.approx(7.0)


def test_tables_reject_bad_axes():
    with pytest.raises(ValueError, match="increasing"):
        Table1D((2.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="times"):
        Table1D((1.0, 2.0), (1.0,))


def test_step_formulas_match_architecture():
    model = PerfModel(make_profile(linear_ms=1.0, gpu_ms_per_ktok=0.1, cpu_ms_per_ktok=0.5,
                                   sync_ms=0.05))
    layers, head = SHAPE.num_layers, 0.5
    gpu_only = model.predict_step_ms(Strategy.GPU_ONLY, [], [1000, 1000], [1000])
    assert gpu_only == pytest.approx(layers * (1.0 + 0.2) + head)
    overlap = model.predict_step_ms(Strategy.ASYNC_OVERLAP, [], [1000, 1000], [1000])
    # T_lin + max(T_gatt 0.2, T_catt 0.5) + sync, copies free.
    assert overlap == pytest.approx(layers * (1.0 + 0.5 + 0.05) + head, rel=1e-3)
    pipeline = model.predict_step_ms(Strategy.ASYMMETRIC_PIPELINE, [], [1000, 1000], [1000])
    # Two passes over the weights plus GPU attention; CPU attention hides under them.
    assert pipeline == pytest.approx(layers * (2.0 + 0.2 + 0.05) + head, rel=1e-3)


def test_profile_json_round_trip(tmp_path):
    profile = make_profile()
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path) == profile


def test_shipped_profiles_load_by_name():
    for name in ("h200-llama-3.1-8b", "t4-llama-2-7b", "a10-llama-3.1-8b"):
        assert Profile.load(name).name == name
    with pytest.raises(FileNotFoundError, match="t4-llama-2-7b"):
        Profile.load("no-such-profile")


def _config(**changes) -> ModelConfig:
    fields = dict(architecture="LlamaForCausalLM", vocab_size=SHAPE.vocab_size,
                  hidden_size=SHAPE.hidden_size, intermediate_size=SHAPE.intermediate_size,
                  num_hidden_layers=SHAPE.num_layers, num_attention_heads=SHAPE.num_heads,
                  num_key_value_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim)
    fields.update(changes)
    return ModelConfig(**fields)


def test_check_matches_names_each_difference():
    profile = make_profile()
    profile.check_matches(_config(), "float32", "test-gpu", 4)
    with pytest.raises(ProfileMismatchError, match="device: profile has test-gpu"):
        profile.check_matches(_config(), "float32", "other-gpu", 4)
    with pytest.raises(ProfileMismatchError, match="model shape.*dtype"):
        profile.check_matches(_config(num_hidden_layers=8), "bfloat16", "test-gpu", 4)
    with pytest.raises(ProfileMismatchError, match="cpu threads"):
        profile.check_matches(_config(), "float32", "test-gpu", 8)


def test_ewma_correction_converges_within_ten_percent():
    model = PerfModel(make_profile())
    shape = model.shape_of([], [1000] * 4, [1000] * 2)
    raw = model.raw_step_ms(Strategy.ASYNC_OVERLAP, shape)
    measured = 1.4 * raw  # the machine is 40% slower than its profile
    assert abs(model.predict_ms(Strategy.ASYNC_OVERLAP, shape) - measured) / measured > 0.25
    for _ in range(15):
        predicted = model.predict_ms(Strategy.ASYNC_OVERLAP, shape)
        model.observe(Strategy.ASYNC_OVERLAP, predicted, measured)
    assert model.predict_ms(Strategy.ASYNC_OVERLAP, shape) == pytest.approx(measured, rel=0.1)
    assert model.num_observations == 15
    # Each strategy keeps its own scale.
    assert model.scale[Strategy.GPU_ONLY] == 1.0


def test_profile_quick_measures_a_tiny_model_on_this_machine():
    torch = pytest.importorskip("torch")
    pytest.importorskip("apex_grpc.attention.cpu_kernel")
    from apex_grpc.model.llama import LlamaForCausalLM
    from apex_grpc.platform import device_name
    from apex_grpc.perf.profiler import profile_quick

    config = _config(name="tiny")
    device = torch.device("cpu")
    model = LlamaForCausalLM(config, torch.float32, device)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    profile = profile_quick(model, config, torch.float32, device, threads=1, budget_s=2.0)
    profile.check_matches(config, "float32", device_name(device), 1)
    for table in (profile.linear, profile.gpu_attention, profile.head):
        assert all(b >= a > 0 for a, b in zip(table.ms, table.ms[1:]))
    assert profile.d2h.gb_per_s > 0 and profile.layer_sync_ms > 0
    assert Profile.from_dict(profile.to_dict()) == profile


def test_park_round_trip_and_recompute_costs():
    # 256 bytes of KV per token and layer; 0.001 GB/s is 1000 bytes per ms.
    model = PerfModel(make_profile(copy_gb_per_s=0.001))
    assert model.park_round_trip_ms(100) == pytest.approx(2 * SHAPE.num_layers * 25.6)
    assert model.park_round_trip_ms(0) == 0.0
    # Recompute: the prompt's rows past T_lin's flat part (256 rows at 1 ms, 512 at 2 ms)
    # plus its causal attention, beside 200 GPU decode rows.
    recompute = model.recompute_ms(300, [1000] * 200)
    linear_extra = (1.0 + (500 - 256) / 256) - (1.0 + 0.0)
    attention = 0.01 + (300 - 16) / (1024 - 16) * (0.2 - 0.01)
    assert recompute == pytest.approx(SHAPE.num_layers * (linear_extra + attention))  # flat head
    assert model.recompute_ms(0, [1000]) == 0.0


def test_step_costs_price_host_rows_like_full_shapes():
    model = PerfModel(make_profile(gpu_ms_per_ktok=0.1, sync_ms=0.05))
    base = model.shape_of([(0, 100)], [1000] * 8)
    costs = model.step_costs(base)
    for strategy in Strategy:
        full = model.shape_of([(0, 100)], [1000] * 8, [900] * 5)
        assert costs.predict_ms(strategy, 5, 4500) == pytest.approx(
            model.predict_ms(strategy, full))
