"""The decode-step bench (apex_grpc.bench.decode_step): its CPU smoke run prints every figure.
On a CPU nothing is captured, so the figures are only checked for shape and sanity."""

from __future__ import annotations

import json

import torch

from apex_grpc.bench import decode_step


def test_smoke_run_prints_every_batch_and_the_hybrid_pair(capsys):
    assert decode_step.main(["--dummy-config", "smollm2-135m", "--device", "cpu",
                             "--batch-sizes", "1,3", "--ctx", "20", "--hybrid-ctx", "20",
                             "--steps", "2", "--threads", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["captured"] is torch.cuda.is_available()
    for batch in ("B1", "B3"):
        row = figures[batch]
        assert row["step_ms_graphed"] > 0 and row["step_ms_eager"] > 0 and row["floor_ms"] > 0
        assert row["graphed_over_floor"] == row["step_ms_graphed"] / row["floor_ms"]
    hybrid = figures["hybrid"]
    assert hybrid["step_ms_G2"] > 0 and hybrid["step_ms_G2_plus_C6"] > 0
    assert hybrid["tok_s_ratio"] == 8 / hybrid["step_ms_G2_plus_C6"] / (2 / hybrid["step_ms_G2"])
