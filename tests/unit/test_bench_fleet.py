"""apex-bench against a fleet of in-process replicas (FakeEngine): --replicas spreads the load
over round_robin, the result file counts requests per replica, GetStats are summed over the
replicas, and a refusal with UNAVAILABLE before any token is resent (and counted)."""

from __future__ import annotations

import contextlib
import json

from fake_engine import FakeEngine, ServerThread

from clients.bench.cli import main


def _bench(tmp_path, replicas: list[str], *extra: str) -> dict:
    result_path = tmp_path / "fleet.json"
    argv = ["--replicas", ",".join(replicas), "--num-prompts", "30", "--request-rate", "inf",
            "--max-concurrency", "3", "--dataset-name", "random", "--random-input-len", "8",
            "--random-output-len", "4", "--disable-tqdm", "--settle-timeout", "5",
            "--result-json", str(result_path), *extra]
    assert main(argv) == 0
    return json.loads(result_path.read_text())


def test_bench_counts_requests_per_replica_and_sums_their_stats(tmp_path):
    engines = [FakeEngine(reply="abcdefgh") for _ in range(3)]
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(ServerThread(engine, replica_id=f"r{i}"))
                    for i, engine in enumerate(engines)]
        result = _bench(tmp_path, [r.target for r in replicas], "--max-retries", "0")
    assert result["completed"] == 30 and result["failed"] == 0
    assert set(result["requests_per_replica"]) == {"r0", "r1", "r2"}
    assert sum(result["completed_per_replica"].values()) == 30
    assert sorted(set(result["replica_ids"])) == ["r0", "r1", "r2"]
    # Each fake engine counts its own prompt tokens; the bench sums the three replicas.
    prompt_tokens = sum(len(call.prompt_ids) for engine in engines for call in engine.calls)
    assert result["server_stats_delta"]["prompt_tokens_total"] == prompt_tokens
    assert "load_free_kv_tokens" in result["server_stats_after"]


def test_bench_resends_requests_refused_before_their_first_token(tmp_path):
    engine = FakeEngine(reply="abcdefgh", unavailable_first_calls=4)
    with ServerThread(engine, replica_id="only") as replica:
        result = _bench(tmp_path, [replica.target, replica.target])
    assert result["completed"] == 30 and result["total_retries"] == 4
    assert result["requests_per_replica"] == {"only": 30}


def test_bench_without_retries_reports_the_refusals_and_who_refused(tmp_path):
    engine = FakeEngine(reply="abcdefgh", unavailable_first_calls=2)
    with ServerThread(engine, replica_id="only") as replica:
        result = _bench(tmp_path, [replica.target], "--max-retries", "0")
    assert result["completed"] == 28 and result["failed"] == 2
    assert result["errors_by_code"] == {"UNAVAILABLE": 2} and result["total_retries"] == 0
    # A refusal names its replica in the trailing metadata.
    assert result["requests_per_replica"] == {"only": 30}
