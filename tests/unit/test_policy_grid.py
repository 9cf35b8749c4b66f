"""The policy grid (apex_grpc.bench.policy_grid): its CPU smoke run end to end (profile,
simulate, a server per policy, apex-bench, the table), and the goodput and acceptance rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from apex_grpc.bench import policy_grid

NUMBER = r"-?\d+\.\d+"


def test_smoke_grid_measures_and_predicts_every_policy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "apex_grpc.bench.policy_grid", "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for policy in policy_grid.POLICIES:
        # budget | policy | tput | sim tput | tput/sim | goodput | sim goodput | ...
        row = re.compile(rf"^\| 256 \| {policy} \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| "
                         rf"({NUMBER}) \| ({NUMBER}) \|", re.MULTILINE)
        match = row.search(done.stdout)
        assert match, f"no complete row for {policy}:\n{done.stdout}"
        tput, sim_tput, ratio, goodput, sim_goodput = map(float, match.groups())
        # Goodput may be 0 (on a loaded 2-core machine a TPOT can miss even the loose target).
        assert tput > 0 and sim_tput > 0 and ratio >= 0 and goodput >= 0 and sim_goodput >= 0, \
            match.group(0)
    summary = json.loads(next(line for line in done.stdout.splitlines()
                              if line.startswith('{"bench": "policy_grid"')))
    assert summary["errors"] == []
    for policy, cell in summary["cells"]["256"].items():
        assert cell["measured"]["completed"] == summary["spec"]["num_requests"], policy
        assert cell["measured"]["failed"] == 0
        assert cell["predicted"]["num_requests"] == summary["spec"]["num_requests"]
    assert (tmp_path / "profile.json").is_file()


def test_goodput_counts_only_the_tokens_of_requests_within_the_tpot_target():
    result = {"duration": 2.0, "output_lens": [11, 11, 1, 0],
              # TPOT 10 ms, 30 ms, a one-token request (meets any target), a failed request
              "itls": [[0.01] * 10, [0.03] * 10, [], []]}
    assert policy_grid.token_goodput(result, 20.0) == pytest.approx((11 + 1) / 2.0)
    assert policy_grid.token_goodput(result, 30.5) == pytest.approx((11 + 11 + 1) / 2.0)


def _cell(tput: float, goodput: float, predicted: float) -> dict:
    return {"measured": {"output_throughput": tput, "goodput": goodput},
            "predicted": {"output_throughput": predicted}}


def test_acceptance_names_each_miss():
    cells = {2048: {"gpu-only": _cell(100, 100, 100), "neo": _cell(150, 0, 150),
                    "apex": _cell(125, 125, 90)},
             16384: {"gpu-only": _cell(1000, 1000, 1000), "neo": _cell(900, 900, 900),
                     "apex": _cell(990, 990, 1000)}}
    lines = policy_grid.acceptance(cells)
    assert "PASS 2048 tokens: apex goodput 1.25x the better baseline (>= 0.98)" in lines
    assert "MISS 2048 tokens: apex goodput 1.25x gpu-only (>= 1.3)" in lines
    assert any(line.startswith("MISS 2048 tokens apex: throughput +39%") for line in lines)
    assert "PASS 16384 tokens: apex goodput 0.99x the better baseline (>= 0.98)" in lines
    assert not any("16384 tokens: apex goodput" in line and "gpu-only" in line for line in lines)
    cells[16384]["neo"]["measured"] = None
    assert "MISS 16384 tokens: a policy has no measurement" in policy_grid.acceptance(cells)


def test_full_grid_exits_with_a_message_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the message of a machine without CUDA")
    done = subprocess.run([sys.executable, "-m", "apex_grpc.bench.policy_grid", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "needs a CUDA device" in done.stderr and "Traceback" not in done.stderr
