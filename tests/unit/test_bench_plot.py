"""apex-bench plot: renders throughput vs latency per policy from result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.bench.cli import main
from clients.bench.plot import PlotError, group_by_policy, load_results, plot_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(policy: str, rate: float | str, throughput: float) -> dict:
    return {"policy": policy, "request_rate": rate, "output_throughput": throughput,
            "median_tpot_ms": 10.0 + throughput / 100, "p99_tpot_ms": 20.0 + throughput / 50,
            "median_ttft_ms": 50.0 + throughput / 10, "p99_ttft_ms": 90.0 + throughput / 5}


def _write_results(directory: Path) -> list[Path]:
    paths = []
    for policy, scale in (("gpu-only", 1.0), ("apex", 1.4)):
        for rate in (1.0, 4.0, "inf"):
            throughput = scale * (100.0 if rate == "inf" else 20.0 * rate)
            path = directory / f"{policy}-{rate}.json"
            path.write_text(json.dumps(_result(policy, rate, throughput)), encoding="utf-8")
            paths.append(path)
    return paths


def test_plot_renders_a_png(tmp_path: Path) -> None:
    output = plot_results(load_results(_write_results(tmp_path)), tmp_path / "out" / "plot.png")
    data = output.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plot_command(tmp_path: Path) -> None:
    paths = [str(path) for path in _write_results(tmp_path)]
    assert main(["plot", *paths, "--output", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes().startswith(PNG_SIGNATURE)


def test_points_are_grouped_by_policy_in_rate_order(tmp_path: Path) -> None:
    groups = group_by_policy(load_results(_write_results(tmp_path)))
    assert list(groups) == ["apex", "gpu-only"]
    assert [run["request_rate"] for run in groups["apex"]] == [1.0, 4.0, "inf"]


def test_bad_result_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "partial.json").write_text(json.dumps({"output_throughput": 1.0}))
    with pytest.raises(PlotError, match="partial.json lacks median_tpot_ms"):
        load_results([tmp_path / "partial.json"])
    with pytest.raises(PlotError, match="does not exist"):
        load_results([tmp_path / "absent.json"])
    assert main(["plot", str(tmp_path / "absent.json")]) == 2
