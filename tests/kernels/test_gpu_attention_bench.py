"""The CUDA-graph decode attention benchmark (apex_grpc.bench.gpu_attention): its dense SDPA
baseline attends over the same context as the paged kernel, its L2-defeating copy count, a clean
exit without CUDA, and (on CUDA) one small case end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import pytest
import torch

from apex_grpc.bench import gpu_attention


def _float64_decode(case: gpu_attention.DecodeCase, scale: float) -> torch.Tensor:
    """Each sequence's context read token by token through its block table, in float64."""
    block_size = case.k_cache.shape[2]
    group = gpu_attention.NUM_HEADS // gpu_attention.NUM_KV_HEADS
    outs = []
    for seq, table in enumerate(case.block_tables.long()):
        positions = torch.arange(case.context_len)
        pages = table[positions // block_size]
        keys = case.k_cache.double()[pages, :, positions % block_size]  # [ctx, kv_heads, d]
        values = case.v_cache.double()[pages, :, positions % block_size]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", case.q[seq].double(), keys) * scale
        outs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(outs)


def test_dense_sdpa_baseline_attends_over_the_paged_context():
    torch.manual_seed(0)
    case = gpu_attention.build_case(batch=3, context_len=100, block_size=16,
                                    dtype=torch.float32, device=torch.device("cpu"))
    scale = gpu_attention.HEAD_DIM ** -0.5
    out = gpu_attention.sdpa_dense(case.q, *gpu_attention.dense_kv(case), scale)
    expected = _float64_decode(case, scale)
    assert out.shape == case.q.shape
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_kv_copies_cover_the_l2_factor_within_bounds():
    assert gpu_attention.kv_copies(2 << 20, 50 << 20, 4.0) == 64  # capped
    assert gpu_attention.kv_copies(16 << 20, 50 << 20, 4.0) == 13  # 208 MiB >= 200 MiB
    assert gpu_attention.kv_copies(512 << 20, 50 << 20, 4.0) == 1
    assert gpu_attention.kv_copies(2 << 20, 50 << 20, 0.0) == 1  # L2-hot


def _eager_timer(calls, replays):
    """Stands in for the CUDA-graph timer: runs each call once, time per call in us."""
    start = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - start) * 1e6 / len(calls)


@pytest.fixture
def small_cases():
    torch.manual_seed(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [gpu_attention.build_case(1, 300, 16, torch.bfloat16, device) for _ in range(2)]


def test_run_case_checks_and_reports_every_split_count(monkeypatch, small_cases):
    """The kernels run (under Triton's interpreter on the CPU) with eager timing in place of
    the graph timer: every swept split count is checked and reported, ratios to SDPA match."""
    pytest.importorskip("triton")
    from apex_grpc.attention import triton_paged

    monkeypatch.setattr(gpu_attention, "graph_us_per_call", _eager_timer)
    result = gpu_attention.run_case(triton_paged, small_cases, gpu_attention.HEAD_DIM ** -0.5, 1)
    # 300 keys: 2 splits of 192, 3 of 128, 5 of 64 keys (whole 64-key tiles).
    assert set(result["sweep_us"]) == {"1", "2", "3", "5"}
    assert str(result["num_splits"]) in result["sweep_us"]
    assert result["max_rel_err"] < 2e-2 and result["kv_copies"] == 2
    assert result["split_over_sdpa"] == pytest.approx(
        result["paged_split_us"] / result["sdpa_us"], rel=0.02)
    assert result["best_split_us"] == min(result["sweep_us"].values())


def test_run_case_refuses_to_time_a_wrong_kernel(monkeypatch, small_cases):
    pytest.importorskip("triton")
    from apex_grpc.attention import triton_paged

    def zeros(q, *args, out, **kwargs):
        return out.zero_()

    wrong = types.SimpleNamespace(paged_decode_attention=zeros,
                                  plan_decode_splits=triton_paged.plan_decode_splits)
    monkeypatch.setattr(gpu_attention, "graph_us_per_call", _eager_timer)
    with pytest.raises(RuntimeError, match="wrong output"):
        gpu_attention.run_case(wrong, small_cases, gpu_attention.HEAD_DIM ** -0.5, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_exits_with_a_message_and_no_traceback_without_cuda():
    done = subprocess.run([sys.executable, "-m", "apex_grpc.bench.gpu_attention"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "needs a CUDA device" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_small_case_prints_a_checked_json_line(capsys):
    pytest.importorskip("triton")
    gpu_attention.main(["--batch-sizes", "1", "--context-lens", "300", "--replays", "3",
                        "--l2-factor", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    assert len(lines) == 1
    result = lines[0]
    assert result["batch"] == 1 and result["context_len"] == 300
    assert result["num_splits"] > 1 and result["max_rel_err"] < 2e-2
    assert result["sdpa_us"] > 0 and result["paged_split_us"] > 0
    assert result["split_over_sdpa"] == pytest.approx(
        result["paged_split_us"] / result["sdpa_us"], rel=0.02)
