"""Benchmark workloads: the list of requests apex-bench sends, built without a tokenizer.

Owns the request description (BenchRequest) and the three generators: `random` (random token ids
with lengths drawn around a mean, vLLM's --random-* semantics), `fixed` (every request the same
lengths) and `sharegpt` (text prompts from a ShareGPT-format JSON file), plus cancellation
injection. Random and fixed workloads send token ids with ignore_eos and
max_new_tokens = output_len, so every request generates exactly output_len tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET_NAMES = ("random", "fixed", "sharegpt")
# Without a tokenizer, text lengths are estimated at about four characters per token.
CHARS_PER_TOKEN = 4


class WorkloadError(ValueError):
    """The workload cannot be built from the given flags or dataset file."""


@dataclass(frozen=True)
class BenchRequest:
    """One request to send; exactly one of prompt_ids / prompt_text is set."""

    prompt_ids: tuple[int, ...] | None
    prompt_text: str | None
    # Exact for token-id prompts; an estimate (characters / 4) for text prompts.
    input_len: int
    # Sent as max_new_tokens.
    output_len: int
    ignore_eos: bool
    # Cancel the stream once this many tokens have arrived (None: let it finish).
    cancel_after_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt_text is None):
            raise WorkloadError("a BenchRequest needs exactly one of prompt_ids and prompt_text")
        if self.output_len < 1:
            raise WorkloadError(f"output_len must be >= 1, got {self.output_len}")


def length_bounds(mean_len: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths drawn around mean_len: [len*(1-r), len*(1+r)]."""
    if mean_len < 1:
        raise WorkloadError(f"length must be >= 1, got {mean_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise WorkloadError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean_len * (1.0 - range_ratio)))
    high = max(low, math.ceil(mean_len * (1.0 + range_ratio)))
    return low, high


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    """Random token-id prompts; lengths uniform in length_bounds(), deterministic per seed."""
    _check_count(num_prompts)
    if vocab_size < 1:
        raise WorkloadError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    input_low, input_high = length_bounds(input_len, range_ratio)
    output_low, output_high = length_bounds(output_len, range_ratio)
    input_lens = rng.integers(input_low, input_high + 1, size=num_prompts)  # [num_prompts]
    output_lens = rng.integers(output_low, output_high + 1, size=num_prompts)  # [num_prompts]
    requests = []
    for prompt_len, new_len in zip(input_lens.tolist(), output_lens.tolist()):
        ids = rng.integers(0, vocab_size, size=prompt_len)  # [prompt_len]
        requests.append(BenchRequest(prompt_ids=tuple(ids.tolist()), prompt_text=None,
                                     input_len=prompt_len, output_len=new_len, ignore_eos=True))
    return requests


def fixed_workload(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                   seed: int) -> list[BenchRequest]:
    """Random token-id prompts, every one exactly input_len long and generating output_len."""
    return random_workload(num_prompts, input_len, output_len, 0.0, vocab_size, seed)


def sharegpt_workload(path: str | Path, num_prompts: int, seed: int,
                      output_len: int | None = None, max_model_len: int | None = None,
                      ignore_eos: bool = False) -> list[BenchRequest]:
    """Text prompts from a ShareGPT-format JSON list of {"conversations": [{"from", "value"}]}.

    The first turn is the prompt; the output length is the second turn's length in characters
    divided by four (rounded up), unless output_len fixes it. Conversations are shuffled with
    the seed; those whose estimated lengths exceed max_model_len are skipped.
    """
    _check_count(num_prompts)
    pairs = _read_sharegpt_pairs(Path(path))
    rng = np.random.default_rng(seed)
    requests: list[BenchRequest] = []
    for index in rng.permutation(len(pairs)).tolist():
        prompt, reference = pairs[index]
        new_len = output_len if output_len is not None else _estimate_tokens(reference)
        prompt_len = _estimate_tokens(prompt)
        if max_model_len is not None and prompt_len + new_len > max_model_len:
            continue
        requests.append(BenchRequest(prompt_ids=None, prompt_text=prompt, input_len=prompt_len,
                                     output_len=new_len, ignore_eos=ignore_eos))
        if len(requests) == num_prompts:
            return requests
    raise WorkloadError(f"{path}: only {len(requests)} usable conversations, "
                        f"--num-prompts asks for {num_prompts}")


def _read_sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first human turn, first answer) of every conversation with two non-empty turns."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkloadError(f"--dataset-path {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"--dataset-path {path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise WorkloadError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        texts = [turn.get("value") if isinstance(turn, dict) else None for turn in turns[:2]]
        if all(isinstance(text, str) and text for text in texts):
            pairs.append((texts[0], texts[1]))
    return pairs


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def inject_cancellations(requests: list[BenchRequest], cancel_fraction: float,
                         cancel_after_tokens: int, seed: int) -> list[BenchRequest]:
    """Mark round(fraction * n) requests, chosen with the seed, to be cancelled after k tokens.

    A marked request whose output_len is at most k simply finishes before it can be cancelled.
    """
    if not 0.0 <= cancel_fraction <= 1.0:
        raise WorkloadError(f"--cancel-fraction must be in [0, 1], got {cancel_fraction}")
    if cancel_after_tokens < 1:
        raise WorkloadError(f"--cancel-after-tokens must be >= 1, got {cancel_after_tokens}")
    num_cancelled = round(cancel_fraction * len(requests))
    # A separate stream so that cancellation does not change the prompts drawn for a seed.
    rng = np.random.default_rng([seed, 1])
    chosen = set(rng.choice(len(requests), size=num_cancelled, replace=False).tolist())
    return [dataclasses.replace(req, cancel_after_tokens=cancel_after_tokens)
            if index in chosen else req for index, req in enumerate(requests)]


def check_fits_context(requests: list[BenchRequest], max_model_len: int) -> None:
    """Raise when a token-id request cannot fit the server's context (it would be rejected)."""
    for index, req in enumerate(requests):
        if req.prompt_ids is not None and req.input_len + req.output_len > max_model_len:
            raise WorkloadError(
                f"request {index}: input_len {req.input_len} + output_len {req.output_len} "
                f"exceeds the server's max_model_len {max_model_len}; lower the input or output "
                f"length (or --random-range-ratio)")


def _check_count(num_prompts: int) -> None:
    if num_prompts < 1:
        raise WorkloadError(f"--num-prompts must be >= 1, got {num_prompts}")
