"""apex-bench workload generators: length ranges, seeds, ShareGPT parsing, cancellation marks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.bench.workloads import (
    BenchRequest,
    WorkloadError,
    check_fits_context,
    fixed_workload,
    inject_cancellations,
    length_bounds,
    random_workload,
    sharegpt_workload,
)


def test_length_bounds_follow_range_ratio() -> None:
    assert length_bounds(100, 0.0) == (100, 100)
    assert length_bounds(100, 0.25) == (75, 125)
    assert length_bounds(3, 0.9) == (1, 6)  # never below one token
    for bad_ratio in (-0.1, 1.0):
        with pytest.raises(WorkloadError, match="range-ratio"):
            length_bounds(100, bad_ratio)


def test_random_lengths_stay_in_range_and_cover_it() -> None:
    requests = random_workload(400, input_len=64, output_len=32, range_ratio=0.5,
                               vocab_size=1000, seed=7)
    input_lens = [req.input_len for req in requests]
    output_lens = [req.output_len for req in requests]
    assert min(input_lens) >= 32 and max(input_lens) <= 96
    assert min(output_lens) >= 16 and max(output_lens) <= 48
    # Uniform over the range: 400 draws reach close to both ends.
    assert min(input_lens) <= 36 and max(input_lens) >= 92
    for req in requests:
        assert len(req.prompt_ids) == req.input_len
        assert all(0 <= token < 1000 for token in req.prompt_ids)
        assert req.ignore_eos and req.prompt_text is None and req.cancel_after_tokens is None


def test_random_workload_is_deterministic_per_seed() -> None:
    first = random_workload(20, 16, 8, 0.5, vocab_size=50, seed=3)
    assert first == random_workload(20, 16, 8, 0.5, vocab_size=50, seed=3)
    assert first != random_workload(20, 16, 8, 0.5, vocab_size=50, seed=4)


def test_fixed_workload_has_one_shape() -> None:
    requests = fixed_workload(10, input_len=12, output_len=5, vocab_size=100, seed=0)
    assert {(req.input_len, len(req.prompt_ids), req.output_len) for req in requests} == {(12, 12, 5)}
    assert all(req.ignore_eos for req in requests)


def test_bad_counts_are_rejected() -> None:
    with pytest.raises(WorkloadError, match="num-prompts"):
        random_workload(0, 16, 8, 0.0, vocab_size=50, seed=0)
    with pytest.raises(WorkloadError, match="vocab_size"):
        random_workload(1, 16, 8, 0.0, vocab_size=0, seed=0)


def _write_sharegpt(path: Path) -> Path:
    entries = [
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there"},
                                      {"from": "gpt", "value": "x" * 40}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Only one turn"}]},
        {"id": "c", "conversations": [{"from": "human", "value": ""},
                                      {"from": "gpt", "value": "empty prompt"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "p" * 400},
                                      {"from": "gpt", "value": "y" * 9}]},
        {"id": "e"},
        "not a conversation",
        {"id": "f", "conversations": [{"from": "human", "value": "Third"},
                                      {"from": "gpt", "value": "z"},
                                      {"from": "human", "value": "ignored later turn"}]},
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_sharegpt_parsing(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    requests = sharegpt_workload(path, num_prompts=3, seed=0)
    by_prompt = {req.prompt_text: req for req in requests}
    assert set(by_prompt) == {"Hello there", "p" * 400, "Third"}
    # Output length = reference answer characters / 4, rounded up; input estimated the same way.
    assert by_prompt["Hello there"].output_len == 10 and by_prompt["Hello there"].input_len == 3
    assert by_prompt["p" * 400].output_len == 3 and by_prompt["p" * 400].input_len == 100
    assert by_prompt["Third"].output_len == 1
    assert all(req.prompt_ids is None and not req.ignore_eos for req in requests)


def test_sharegpt_flags(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    fixed = sharegpt_workload(path, 3, seed=0, output_len=7, ignore_eos=True)
    assert {req.output_len for req in fixed} == {7} and all(req.ignore_eos for req in fixed)
    # The 400-character prompt (about 100 tokens) does not fit a 64-token context.
    short = sharegpt_workload(path, 2, seed=0, max_model_len=64)
    assert {req.prompt_text for req in short} == {"Hello there", "Third"}
    orders = {tuple(req.prompt_text for req in sharegpt_workload(path, 3, seed=s))
              for s in range(8)}
    assert len(orders) > 1  # the seed shuffles
    with pytest.raises(WorkloadError, match="only 2 usable"):
        sharegpt_workload(path, 3, seed=0, max_model_len=64)


def test_sharegpt_bad_files(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="does not exist"):
        sharegpt_workload(tmp_path / "missing.json", 1, seed=0)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(WorkloadError, match="not valid JSON"):
        sharegpt_workload(tmp_path / "bad.json", 1, seed=0)
    (tmp_path / "dict.json").write_text("{}", encoding="utf-8")
    with pytest.raises(WorkloadError, match="JSON list"):
        sharegpt_workload(tmp_path / "dict.json", 1, seed=0)


def test_cancellation_injection() -> None:
    requests = random_workload(40, 8, 16, 0.0, vocab_size=100, seed=1)
    marked = inject_cancellations(requests, cancel_fraction=0.25, cancel_after_tokens=4, seed=1)
    assert sum(req.cancel_after_tokens == 4 for req in marked) == 10
    assert sum(req.cancel_after_tokens is None for req in marked) == 30
    assert [req.prompt_ids for req in marked] == [req.prompt_ids for req in requests]
    assert marked == inject_cancellations(requests, 0.25, 4, seed=1)
    assert inject_cancellations(requests, 1.0, 2, seed=0)[0].cancel_after_tokens == 2
    with pytest.raises(WorkloadError, match="cancel-fraction"):
        inject_cancellations(requests, 1.5, 4, seed=0)
    with pytest.raises(WorkloadError, match="cancel-after-tokens"):
        inject_cancellations(requests, 0.5, 0, seed=0)


def test_context_check_and_request_validation() -> None:
    requests = fixed_workload(2, input_len=100, output_len=30, vocab_size=10, seed=0)
    check_fits_context(requests, max_model_len=130)
    with pytest.raises(WorkloadError, match="max_model_len 129"):
        check_fits_context(requests, max_model_len=129)
    with pytest.raises(WorkloadError, match="exactly one"):
        BenchRequest(prompt_ids=(1,), prompt_text="x", input_len=1, output_len=1, ignore_eos=True)
    with pytest.raises(WorkloadError, match="output_len"):
        BenchRequest(prompt_ids=(1,), prompt_text=None, input_len=1, output_len=0,
                     ignore_eos=True)
