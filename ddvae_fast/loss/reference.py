"""The 'reference' relaxed arg-max backend: plain PyTorch, the oracle of the fused kernels.

Two forms of the same math (docs/loss_backend_contract.md):
- ``relaxed_argmax_rows``, ``nll_rows``, ``correct_rows``: differentiable
  per-position terms; autograd through them is the gradient oracle, and the
  public functions run them for ``backend='reference'``;
- ``forward``: the backend contract with explicit gradient formulas, so the
  custom op can run on this backend too (custom ops run without autograd);
- ``gradient``: that explicit gradient as a differentiable function of the
  logits. The custom op's backward runs it for double backward and for
  weights known only at backward time (docs/loss_backend_contract.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "accumulate_dtype",
    "correct_rows",
    "forward",
    "gradient",
    "log_odds",
    "nll_rows",
    "reduce_rows",
    "relaxed_argmax_rows",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every backend accumulates in float32, and in float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_odds(tau: float) -> float:
    """c = log(1/tau - 1), the shift that makes sigma_tau(0) = tau; accurate near tau = 1."""
    return math.log1p(-tau) - math.log(tau)


def _safe_target(target: Tensor, num_classes: int, ignore_index: int):
    """(valid, in_range, index): index is target where usable, else 0 (never out of bounds)."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    index = torch.where(valid & in_range, target, torch.zeros_like(target))
    return valid, in_range, index


def _mask_rows(rows: Tensor, valid: Tensor, in_range: Tensor) -> Tensor:
    """0 for ignored positions, NaN for an out-of-range target."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return torch.where(valid & ~in_range, torch.full_like(rows, math.nan), rows)


def relaxed_argmax_rows(
    logits: Tensor,
    target: Tensor,
    tau: float,
    score: str = "logit",
    ignore_index: int = -100,
) -> Tensor:
    """Per-position relaxed arg-max loss, shape logits.shape[:-1], in the logits dtype.

    sum over s != t of -log sigma_tau(r_t - r_s) with
    -log sigma_tau(x) = -logsigmoid(x / tau - c), c = log(1/tau - 1).
    Ignored positions give 0; an out-of-range target gives NaN. No validation:
    the building block of the reference path and the benchmarks.
    """
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    scores = torch.softmax(logits, dim=-1) if score == "prob" else logits
    score_t = scores.gather(-1, index.unsqueeze(-1))
    pair = -F.logsigmoid((score_t - scores) / tau - log_odds(tau))
    others = torch.arange(num_classes, device=logits.device) != index.unsqueeze(-1)
    rows = torch.where(others, pair, torch.zeros_like(pair)).sum(dim=-1)
    return _mask_rows(rows, valid, in_range)


def nll_rows(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Per-position token cross-entropy, differentiable; 0 ignored, NaN out of range."""
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    rows = torch.logsumexp(logits, dim=-1) - logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return _mask_rows(rows, valid, in_range)


def correct_rows(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """True where the target is the strict unique arg max or is ignored.

    A tie is wrong (it decodes to the undefined token), and so is a row with a
    NaN logit: NaN compares false, so a NaN target logit is beaten by nothing,
    which is why the test is written as "every other logit is below", not
    "no other logit is above".
    """
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    logit_t = logits.gather(-1, index.unsqueeze(-1))
    others = torch.arange(num_classes, device=logits.device) != index.unsqueeze(-1)
    below = (logits < logit_t) | ~others
    unique_max = below.all(dim=-1) & ~logit_t.squeeze(-1).isnan()
    return (unique_max & in_range) | ~valid


def reduce_rows(rows: Tensor, count: Tensor, reduction: str) -> Tensor:
    """'none' | 'sum' | 'mean' over non-ignored positions (count of them)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # An all-ignored batch gives 0 / 1 = 0 with a zero gradient, not NaN.
    return total / count.clamp(min=1)


def gradient(
    x: Tensor,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight,
    nll_weight,
) -> Tensor:
    """d(argmax_weight * argmax_row + nll_weight * nll_row)/dx for (N, V) logits x, in x's dtype.

    The weights are Python floats or tensors broadcasting against (N, 1) (a
    weight per row). Written in differentiable torch ops, so autograd through
    it gives exact second derivatives. Ignored rows get a zero gradient.
    """
    num_classes = x.shape[1]
    valid, _, index = _safe_target(target, num_classes, ignore_index)
    is_target = torch.arange(num_classes, device=x.device) == index.unsqueeze(1)
    zero = x.new_zeros(())
    with_nll = not (isinstance(nll_weight, (int, float)) and nll_weight == 0.0)
    prob = torch.softmax(x, dim=1) if (prob_mode or with_nll) else None
    scores = prob if prob_mode else x
    z = (scores - scores.gather(1, index.unsqueeze(1))) / tau + log_odds(tau)
    # d/dr_s = sigmoid(z_s)/tau for s != t; d/dr_t = -(sum of the others)
    g = torch.where(is_target, zero, torch.sigmoid(z) / tau)
    g = g - is_target.to(x.dtype) * g.sum(dim=1, keepdim=True)
    if prob_mode:  # chain through the softmax Jacobian
        g = prob * (g - (prob * g).sum(dim=1, keepdim=True))
    grad = argmax_weight * g
    if with_nll:
        grad = grad + nll_weight * (prob - is_target.to(x.dtype))
    return torch.where(valid.unsqueeze(1), grad, zero)


def forward(
    logits: Tensor,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight: float,
    nll_weight: float,
    grad_scale: Tensor,
    need_grad: bool,
    need_nll: bool,
):
    """The backend contract of docs/loss_backend_contract.md with explicit gradients.

    Returns (argmax_rows, nll_rows, correct_rows, grad) like the 'cpp' and
    'triton' backends; tests check the gradient against autograd of the rows.
    """
    num_classes = logits.shape[1]
    acc = accumulate_dtype(logits.dtype)
    x = logits.to(acc)
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    bad = valid & ~in_range
    others = torch.arange(num_classes, device=logits.device) != index.unsqueeze(1)
    scores = torch.softmax(x, dim=1) if prob_mode else x
    z = (scores - scores.gather(1, index.unsqueeze(1))) / tau + log_odds(tau)
    # softplus(z) = -log sigma_tau(r_t - r_s), stable for any z
    pair = -F.logsigmoid(-z)
    zero = x.new_zeros(())
    nan = x.new_full((), math.nan)
    argmax_out = torch.where(others, pair, zero).sum(dim=1)
    argmax_out = torch.where(bad, nan, torch.where(valid, argmax_out, zero))

    if need_nll:
        nll_out = nll_rows(x, target, ignore_index)
    else:
        nll_out = torch.zeros_like(argmax_out)

    correct_out = correct_rows(x, target, ignore_index)

    if not need_grad:
        return argmax_out, nll_out, correct_out, logits.new_empty((0,))
    grad = gradient(x, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight)
    grad = grad * grad_scale.to(acc)
    return argmax_out, nll_out, correct_out, grad.to(logits.dtype).contiguous()
