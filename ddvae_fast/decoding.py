"""Deterministic decoding (Eq. 3): arg max with ties mapped to an undefined token."""

from __future__ import annotations

import torch

UNDEFINED_TOKEN = -1


def deterministic_argmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Index of the maximum of ``scores`` along ``dim``, or -1 where it is not unique.

    The paper defines arg max as an "undefined" token when two tokens share the
    maximal score; -1 is that token. NaN scores are rejected, since no token
    is the maximum then.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    if scores.shape[dim] == 0:
        raise ValueError(f"cannot take the arg max over an empty dimension {dim}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the arg max is undefined")
    top = scores.max(dim=dim, keepdim=True).values
    n_max = (scores == top).sum(dim=dim)
    index = scores.argmax(dim=dim)
    return torch.where(n_max == 1, index, torch.full_like(index, UNDEFINED_TOKEN))
