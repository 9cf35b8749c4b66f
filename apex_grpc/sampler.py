"""Batched next-token sampling: the one place where a step's logits become token ids.

Per row, in this order:
  1. repetition penalty over the row's prompt+output ids (HF semantics: positive logits are
     divided by the penalty, negative ones multiplied), only for rows that set it != 1;
  2. greedy rows (temperature 0) take the argmax; ties go to the lowest token id;
  3. sampled rows divide by their temperature, then apply top-k, top-p and min-p, each filter
     acting on the distribution the previous one left, and draw one token by exponential race.

Logprob convention: a reported logprob (and the top-n alternatives) is log_softmax of the raw
model logits, before the repetition penalty, temperature and every filter. It describes the
model's own belief and does not change with the request's sampling settings.

Seeds: the exponential race draws exactly vocab_size Exponential(1) values per row and step.
A seeded row draws them from its own torch.Generator (created once per request by the engine,
on the logits' device), so its tokens depend only on its logits and its seed, never on which
other rows share the batch or where it sits. Unseeded rows share one draw from the default RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from apex_grpc.request import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per logits row
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


class Sampler:
    """Stateless; per-request state (generators, prior ids) is passed in on every call."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prior_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """Pick one token per row of logits [num_rows, vocab_size].

        generators[i] is row i's seeded generator or None; prior_token_ids[i] is row i's
        prompt+output ids, needed only for rows with a repetition penalty.
        """
        _check_inputs(logits, params, generators, prior_token_ids)
        num_rows = logits.shape[0]
        if all(_is_plain_greedy(p) for p in params):
            # The common decode batch: one argmax, no copies, no randomness consumed.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_rows)

        processed = apply_repetition_penalty(logits, params, prior_token_ids)
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if greedy_rows:
            token_ids[greedy_rows] = processed[greedy_rows].argmax(dim=-1)
        if sampled_rows:
            token_ids[sampled_rows] = _sample_rows(
                processed[sampled_rows],
                [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows],
            )
        logprobs = _gather_logprobs(logits, params, token_ids)
        return SamplerOutput(token_ids.tolist(), logprobs)


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.is_greedy and not params.wants_logprobs and params.repetition_penalty == 1.0


def _check_inputs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prior_token_ids: Sequence[Sequence[int]] | None,
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab_size], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    num_rows = logits.shape[0]
    if len(params) != num_rows or len(generators) != num_rows:
        raise ValueError(
            f"logits has {num_rows} rows but {len(params)} params and "
            f"{len(generators)} generators were given"
        )
    if prior_token_ids is not None and len(prior_token_ids) != num_rows:
        raise ValueError(
            f"logits has {num_rows} rows but prior_token_ids has {len(prior_token_ids)}"
        )
    for row, p in enumerate(params):
        if not p.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"row {row}: temperature must be >= 0, got {p.temperature}")
        if not p.repetition_penalty > 0.0:
            raise ValueError(
                f"row {row}: repetition_penalty must be > 0, got {p.repetition_penalty}"
            )


def apply_repetition_penalty(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prior_token_ids: Sequence[Sequence[int]] | None,
) -> torch.Tensor:
    """Return logits [num_rows, vocab] with each row's penalty applied to its prior ids.

    Returns the input tensor itself when no row sets a penalty; never modifies it in place.
    """
    penalized_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not penalized_rows:
        return logits
    if prior_token_ids is None:
        raise ValueError("prior_token_ids is required when a row sets repetition_penalty")
    vocab_size = logits.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    for row in penalized_rows:
        ids = prior_token_ids[row]
        row_index.extend([row] * len(ids))
        token_index.extend(ids)
    if token_index and not 0 <= min(token_index) <= max(token_index) < vocab_size:
        raise ValueError(f"prior_token_ids holds ids outside [0, {vocab_size})")
    device = logits.device
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # [num_rows, vocab]
    seen[torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)] = True
    penalties = torch.ones(logits.shape[0], dtype=logits.dtype, device=device)
    penalties[penalized_rows] = torch.tensor(
        [params[i].repetition_penalty for i in penalized_rows], dtype=logits.dtype, device=device
    )
    penalties = penalties[:, None]
    penalized = torch.where(logits > 0, logits / penalties, logits * penalties)
    return torch.where(seen, penalized, logits)


def filter_logits(
    scaled_logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Set to -inf every token that top-k, then top-p, then min-p removes.

    scaled_logits [num_rows, vocab] are already divided by temperature; top_k [num_rows] long
    (0 = off), top_p and min_p [num_rows] float. One sort serves the whole batch. The top token
    always survives; ties at the top-k boundary keep the lowest token ids.
    """
    num_rows, vocab_size = scaled_logits.shape
    device = scaled_logits.device
    sorted_logits, sorted_ids = scaled_logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab_size, device=device)
    num_kept = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    drop = positions[None, :] >= num_kept[:, None]  # [num_rows, vocab], sorted order
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)

    # A token is kept while the mass strictly above it is still short of top_p: this keeps
    # the smallest prefix whose mass reaches top_p. Rows with top_p >= 1 skip the test so that
    # cumsum rounding can never drop a tail token.
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    top_p_threshold = torch.where(top_p < 1.0, top_p, math.inf)
    drop |= mass_before >= top_p_threshold[:, None]

    # prob / max prob == exp(logit - top logit), whatever the renormalisation after top-k and
    # top-p, so min-p needs no second softmax. log(0) = -inf turns it off.
    log_min_p = torch.log(min_p)
    drop |= (sorted_logits - sorted_logits[:, :1]) < log_min_p[:, None]
    drop[:, 0] = False

    drop_in_vocab_order = torch.empty_like(drop).scatter_(1, sorted_ids, drop)
    return scaled_logits.masked_fill(drop_in_vocab_order, -math.inf)


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Draw one token id per row of logits [num_rows, vocab]; returns [num_rows] long."""
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    scaled = logits / temperatures[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        scaled = filter_logits(
            scaled,
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device),
            torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=device),
        )
    noise = _exponential_noise(scaled.shape, generators, device)
    # Exponential race: argmax(prob / noise) samples from prob. In log space the row's softmax
    # normaliser is a constant, so logit - log(noise) has the same argmax without a softmax.
    return (scaled - noise.log()).argmax(dim=-1)


def _exponential_noise(
    shape: torch.Size,
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:
    """Exponential(1) noise [num_rows, vocab]; seeded rows draw from their own generator."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded_rows = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded_rows) == len(generators):
        noise.exponential_()
    else:
        if unseeded_rows:
            noise[unseeded_rows] = torch.empty(
                (len(unseeded_rows), shape[1]), dtype=torch.float32, device=device
            ).exponential_()
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
    # A draw of exactly 0 would give log(0) = -inf and a NaN beside a masked -inf logit.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def _gather_logprobs(
    raw_logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_ids: torch.Tensor,
) -> list[TokenLogprob | None]:
    """Logprobs of the chosen tokens and top-n alternatives under the raw model distribution."""
    result: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.wants_logprobs]
    if not rows:
        return result
    logprobs = raw_logits[rows].float().log_softmax(dim=-1)  # [num_logprob_rows, vocab]
    chosen_ids = token_ids[rows]
    chosen = logprobs.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
    max_top = min(MAX_TOP_LOGPROBS, raw_logits.shape[1], max(params[i].top_logprobs for i in rows))
    top_values, top_ids = logprobs.topk(max_top, dim=-1)  # sorted, best first
    top_values_list = top_values.tolist()
    top_ids_list = top_ids.tolist()
    for slot, (row, token_id) in enumerate(zip(rows, chosen_ids.tolist())):
        num_top = min(params[row].top_logprobs, max_top)
        top = list(zip(top_ids_list[slot][:num_top], top_values_list[slot][:num_top]))
        result[row] = TokenLogprob(token_id=token_id, logprob=chosen[slot], top=top)
    return result
