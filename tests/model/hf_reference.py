"""What the model tests compare against transformers with: greedy tokens from an HF model and
the relative error of logits."""

from __future__ import annotations

import torch


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """num_tokens greedy tokens after prompt, recomputing the whole sequence each step."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
