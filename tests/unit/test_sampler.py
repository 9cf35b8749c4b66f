"""Batched sampler against naive per-row references, sampling statistics and seed invariance."""

from __future__ import annotations

import math

import pytest
import torch

from apex_grpc.request import MAX_TOP_LOGPROBS, SamplingParams
from apex_grpc.sampler import (
    Sampler,
    apply_repetition_penalty,
    filter_logits,
)

sampler = Sampler()


def reference_distribution(
    scaled_logits: list[float], top_k: int, top_p: float, min_p: float
) -> dict[int, float]:
    """Token -> probability after top-k, top-p, min-p, computed one row at a time."""
    order = sorted(range(len(scaled_logits)), key=lambda i: (-scaled_logits[i], i))
    if top_k > 0:
        order = order[:top_k]
    weights = {i: math.exp(scaled_logits[i] - scaled_logits[order[0]]) for i in order}
    probs = {i: w / sum(weights.values()) for i, w in weights.items()}
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in order:
            kept.append(i)
            mass += probs[i]
            if mass >= top_p:
                break
        probs = {i: probs[i] / mass for i in kept}
    top_prob = max(probs.values())
    probs = {i: p for i, p in probs.items() if p >= min_p * top_prob}
    total = sum(probs.values())
    return {i: p / total for i, p in probs.items()}


def reference_repetition_penalty(logits: torch.Tensor, penalties, prior_token_ids):
    out = logits.clone()
    for row, penalty in enumerate(penalties):
        for token in set(prior_token_ids[row]):
            value = out[row, token].item()
            out[row, token] = value / penalty if value > 0 else value * penalty
    return out


FILTER_CASES = [  # (top_k, top_p, min_p)
    (0, 1.0, 0.0),
    (1, 1.0, 0.0),
    (5, 1.0, 0.0),
    (100, 1.0, 0.0),  # top_k above the vocab size keeps everything
    (0, 0.5, 0.0),
    (0, 0.9, 0.0),
    (0, 0.001, 0.0),  # only the top token reaches the mass
    (0, 1.0, 0.1),
    (0, 1.0, 0.9),
    (10, 0.8, 0.05),
    (3, 0.3, 0.5),
    (20, 0.95, 0.2),
]


def test_filter_logits_matches_naive_per_row_reference():
    generator = torch.Generator().manual_seed(0)
    num_rows, vocab_size = len(FILTER_CASES), 40
    scaled = torch.randn(num_rows, vocab_size, generator=generator) * 2.0
    filtered = filter_logits(
        scaled,
        torch.tensor([case[0] for case in FILTER_CASES]),
        torch.tensor([case[1] for case in FILTER_CASES]),
        torch.tensor([case[2] for case in FILTER_CASES]),
    )
    for row, (top_k, top_p, min_p) in enumerate(FILTER_CASES):
        expected = set(reference_distribution(scaled[row].tolist(), top_k, top_p, min_p))
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == expected, (top_k, top_p, min_p)
        assert torch.equal(filtered[row][list(kept)], scaled[row][list(kept)])


def test_filter_logits_keeps_the_top_token_and_breaks_top_k_ties_by_lowest_id():
    scaled = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 2.0, 1.0, 0.5], [0.0, 2.0, 1.0, 0.5]])
    filtered = filter_logits(
        scaled,
        top_k=torch.tensor([2, 0, 0]),
        top_p=torch.tensor([1.0, 0.0, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 1.5]),
    )
    # Row 0: three-way tie for the top, top_k=2. Rows 1-2: top_p=0 and min_p>1 would drop all.
    assert torch.isfinite(filtered).tolist() == [
        [False, True, True, False],
        [False, True, False, False],
        [False, True, False, False],
    ]


DISTRIBUTION_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.9, min_p=0.1),
]
DISTRIBUTION_LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])


def chi_square(counts: torch.Tensor, expected: dict[int, float], num_draws: int) -> float:
    return sum(
        (counts[token].item() - num_draws * prob) ** 2 / (num_draws * prob)
        for token, prob in expected.items()
    )


def assert_counts_follow(counts: torch.Tensor, expected: dict[int, float], num_draws: int):
    outside = [t for t in range(len(counts)) if t not in expected]
    assert counts[outside].sum().item() == 0, "a filtered-out token was sampled"
    degrees = max(len(expected) - 1, 1)
    # Far beyond the 99.99th percentile of chi-square for <= 8 degrees of freedom.
    assert chi_square(counts, expected, num_draws) < 3 * degrees + 25


@pytest.mark.parametrize("params", DISTRIBUTION_CASES, ids=str)
def test_unseeded_draws_follow_the_filtered_distribution(params):
    torch.manual_seed(1)
    num_draws = 20000
    logits = DISTRIBUTION_LOGITS.expand(num_draws, -1).contiguous()
    output = sampler(logits, [params] * num_draws, [None] * num_draws)
    counts = torch.bincount(torch.tensor(output.token_ids), minlength=len(DISTRIBUTION_LOGITS))
    scaled = (DISTRIBUTION_LOGITS / params.temperature).tolist()
    expected = reference_distribution(scaled, params.top_k, params.top_p, params.min_p)
    assert_counts_follow(counts, expected, num_draws)


def test_seeded_draws_follow_the_filtered_distribution():
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    num_draws = 4000
    logits = DISTRIBUTION_LOGITS.expand(num_draws, -1).contiguous()
    generators = [torch.Generator().manual_seed(seed) for seed in range(num_draws)]
    output = sampler(logits, [params] * num_draws, generators)
    counts = torch.bincount(torch.tensor(output.token_ids), minlength=len(DISTRIBUTION_LOGITS))
    scaled = (DISTRIBUTION_LOGITS / params.temperature).tolist()
    assert_counts_follow(counts, reference_distribution(scaled, 6, 0.95, 0.0), num_draws)


def test_all_greedy_batch_takes_argmax_and_consumes_no_randomness():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    rng_before = torch.get_rng_state()
    output = sampler(logits, [SamplingParams()] * 6, [None] * 6)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert output.token_ids == logits.argmax(dim=-1).tolist()
    assert output.logprobs == [None] * 6


def test_greedy_ties_go_to_the_lowest_token_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    for params in (SamplingParams(), SamplingParams(top_logprobs=2)):  # fast and full paths
        assert sampler(logits, [params] * 2, [None] * 2).token_ids == [1, 0]


def test_greedy_rows_in_a_mixed_batch_still_take_the_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0)
    params = [greedy, sampled, greedy, sampled]
    output = sampler(logits, params, [None] * 4)
    argmax = logits.argmax(dim=-1).tolist()
    assert [output.token_ids[0], output.token_ids[2]] == [argmax[0], argmax[2]]


def test_repetition_penalty_matches_naive_loop():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(4)) * 3.0
    logits[0, 2] = 0.0
    penalties = [1.5, 1.0, 0.7, 2.0]  # 1.0 leaves its row alone, < 1 boosts
    prior_token_ids = [[2, 3, 3, 7, 19], [0, 1, 2], [5, 6], []]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    penalized = apply_repetition_penalty(logits, params, prior_token_ids)
    expected = reference_repetition_penalty(logits, penalties, prior_token_ids)
    assert torch.equal(penalized, expected)
    assert not torch.equal(penalized, logits)


def test_repetition_penalty_steers_greedy_away_from_a_repeated_token():
    logits = torch.tensor([[4.0, 3.0, -1.0], [4.0, 3.0, -1.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    output = sampler(logits, params, [None, None], prior_token_ids=[[0], [0]])
    assert output.token_ids == [1, 0]  # 4 / 2 < 3 for the penalized row only


def test_repetition_penalty_without_prior_ids_is_rejected():
    with pytest.raises(ValueError, match="prior_token_ids is required"):
        sampler(torch.zeros(1, 5), [SamplingParams(repetition_penalty=1.2)], [None])
    with pytest.raises(ValueError, match="outside"):
        sampler(torch.zeros(1, 5), [SamplingParams(repetition_penalty=1.2)], [None], [[5]])


def test_logprobs_are_raw_log_softmax_with_top_alternatives_best_first():
    vocab_size = 64
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(5)) * 2.0
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3, top_logprobs=5),
        SamplingParams(top_logprobs=0),
        SamplingParams(temperature=1.0),  # no logprobs asked
        SamplingParams(temperature=1.0, top_p=0.5, top_logprobs=50),  # capped
        SamplingParams(top_logprobs=1),
    ]
    prior = [[0, 1, 2], [], [], [], []]
    output = sampler(logits, params, [None] * 5, prior)
    expected_logprobs = logits.log_softmax(dim=-1)
    assert output.logprobs[2] is None
    for row, num_top in [(0, 5), (1, 0), (3, MAX_TOP_LOGPROBS), (4, 1)]:
        entry = output.logprobs[row]
        assert entry.token_id == output.token_ids[row]
        expected = expected_logprobs[row, entry.token_id].item()
        assert entry.logprob == pytest.approx(expected, abs=1e-6)
        values, ids = expected_logprobs[row].topk(num_top)
        assert [token for token, _ in entry.top] == ids.tolist()
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-6)


def run_steps(batch_builder, target_seed: int, num_steps: int) -> list[int]:
    """Sample num_steps tokens for a target row placed by batch_builder among other rows."""
    target_params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2)
    target_generator = torch.Generator().manual_seed(target_seed)
    target_ids = [3, 1, 4]  # prompt
    for step in range(num_steps):
        # The target's logits depend only on the step, as a model would make them.
        target_logits = torch.randn(64, generator=torch.Generator().manual_seed(100 + step))
        others = batch_builder()
        position = len(others) // 2
        params = [p for p, _ in others]
        generators = [g for _, g in others]
        params.insert(position, target_params)
        generators.insert(position, target_generator)
        logits = torch.randn(len(params), 64)  # other rows: fresh noise from the default RNG
        logits[position] = target_logits
        prior = [[0, 1] for _ in params]
        prior[position] = list(target_ids)
        output = sampler(logits, params, generators, prior)
        target_ids.append(output.token_ids[position])
    return target_ids[3:]


def test_seeded_row_gives_the_same_tokens_whatever_else_is_in_the_batch():
    other_seeded = torch.Generator().manual_seed(77)
    compositions = [
        lambda: [],
        lambda: [(SamplingParams(temperature=1.0), None)] * 3,
        lambda: [
            (SamplingParams(), None),
            (SamplingParams(temperature=0.6, min_p=0.2), None),
            (SamplingParams(temperature=1.1, top_p=0.5), other_seeded),
            (SamplingParams(top_logprobs=3, repetition_penalty=1.5), None),
        ],
        lambda: [(SamplingParams(temperature=2.0, top_k=2, top_logprobs=1), None)] * 8,
    ]
    torch.manual_seed(6)
    sequences = [run_steps(build, target_seed=1234, num_steps=24) for build in compositions]
    assert all(sequence == sequences[0] for sequence in sequences)
    assert len(set(sequences[0])) > 5  # genuinely sampled, not a constant
    assert run_steps(compositions[0], target_seed=4321, num_steps=24) != sequences[0]


def test_unseeded_sampling_is_reproducible_under_a_fixed_global_seed():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(7))
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 8
    torch.manual_seed(8)
    first = sampler(logits, params, [None] * 8).token_ids
    torch.manual_seed(8)
    assert sampler(logits, params, [None] * 8).token_ids == first


def test_bad_inputs_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="num_rows, vocab_size"):
        sampler(torch.zeros(5), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="2 rows but 1 params"):
        sampler(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampler(torch.zeros(1, 5), [SamplingParams(temperature=float("nan"))], [None])
    with pytest.raises(ValueError, match="floating point"):
        sampler(torch.zeros(1, 5, dtype=torch.long), [SamplingParams()], [None])
