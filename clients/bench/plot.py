"""`apex-bench plot`: output throughput against TPOT and TTFT, one line per policy.

Each result file (one run, as written by --result-json) is one point; points of the same policy
are joined in request-rate order. Median latencies are solid lines, p99 dashed. Rendered with
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REQUIRED_KEYS = ("output_throughput", "median_tpot_ms", "p99_tpot_ms", "median_ttft_ms",
                 "p99_ttft_ms")


class PlotError(ValueError):
    """A result file is missing or lacks the keys the plot needs."""


def load_results(paths: list[str | Path]) -> list[dict]:
    """Read result files; each holds one run (a JSON object) or a list of runs."""
    results = []
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlotError(f"result file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise PlotError(f"result file {path} is not valid JSON: {exc}") from None
        for run in loaded if isinstance(loaded, list) else [loaded]:
            missing = [key for key in REQUIRED_KEYS if not isinstance(run, dict) or key not in run]
            if missing:
                raise PlotError(f"result file {path} lacks {', '.join(missing)}")
            results.append(run)
    if not results:
        raise PlotError("no results to plot")
    return results


def _rate_order(run: dict) -> float:
    rate = run.get("request_rate", math.inf)
    return math.inf if rate in ("inf", None) else float(rate)


def group_by_policy(results: list[dict]) -> dict[str, list[dict]]:
    """Runs per policy, each list sorted by request rate (then throughput)."""
    groups: dict[str, list[dict]] = {}
    for run in results:
        groups.setdefault(run.get("policy") or "unknown", []).append(run)
    return {policy: sorted(runs, key=lambda run: (_rate_order(run), run["output_throughput"]))
            for policy, runs in sorted(groups.items())}


def plot_results(results: list[dict], output: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (tpot_axes, ttft_axes) = pyplot.subplots(1, 2, figsize=(12, 5))
    for index, (policy, runs) in enumerate(group_by_policy(results).items()):
        color = f"C{index}"
        throughput = [run["output_throughput"] for run in runs]
        for axes, metric in ((tpot_axes, "tpot"), (ttft_axes, "ttft")):
            axes.plot(throughput, [run[f"median_{metric}_ms"] for run in runs], "o-",
                      color=color, label=f"{policy} median")
            axes.plot(throughput, [run[f"p99_{metric}_ms"] for run in runs], "s--",
                      color=color, label=f"{policy} p99")
    for axes, title in ((tpot_axes, "TPOT"), (ttft_axes, "TTFT")):
        axes.set_xlabel("output throughput (tok/s)")
        axes.set_ylabel(f"{title} (ms)")
        axes.set_title(f"{title} vs output throughput")
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
    pyplot.close(figure)
    return output
