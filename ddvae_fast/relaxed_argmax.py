"""The relaxed arg-max reconstruction loss of DD-VAE (Section 2.2, Eq. 11-13).

A deterministic decoder emits token t at a position iff t is the unique arg max
of the scores r there (Eq. 11: a product of indicators [r_t > r_s], s != t).
Replacing each indicator by sigma_tau(x) = sigmoid(x / tau - log(1/tau - 1))
(Eq. 12) and taking -log gives the per-position loss

    sum_{s != t} -log sigma_tau(r_t - r_s)                          (Eq. 13)

with r the raw logits (score='logit'; equal to log-softmax differences, the
form the authors' code trains with) or the softmax probabilities
(score='prob', the form printed in Eq. 13).

Layers, top to bottom:
- public functions ``relaxed_argmax_loss`` and ``decoder_loss`` validate their
  inputs and pick a backend (``ddvae_fast.backends.resolve_backend``);
- backend 'reference' runs plain differentiable PyTorch ops and lets autograd
  compute the gradient: it is the oracle for the kernels' hand-written
  gradients;
- backends 'cpp' and 'triton' go through one torch.library custom op
  (``ddvae_fast::relaxed_argmax``) around the backend's fused
  ``relaxed_argmax_forward`` (contract: docs/loss_backend_contract.md). The kernel
  returns the loss rows and, in the same pass, the gradient already scaled for
  the reduction; the op's backward only multiplies that saved gradient by the
  upstream gradient, in place, so peak memory stays about one logits tensor.
  ``reference_relaxed_argmax_forward`` implements the same contract with
  explicit formulas in PyTorch, so the op layer can run on it too.

Losses are returned in float32 for half-precision logits (every backend
accumulates in float32; rounding the loss back to 16 bits only loses
precision) and in the logits dtype otherwise.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_finite_real, check_int
from .backends import resolve_backend

__all__ = [
    "DecoderLoss",
    "SKIP_TARGET_CHECK_ENV",
    "decoder_loss",
    "reference_relaxed_argmax_forward",
    "reference_relaxed_argmax_rows",
    "relaxed_argmax_loss",
]

SCORES = ("logit", "prob")
REDUCTIONS = ("mean", "sum", "none")
# Setting this to 1 skips the target range check on CUDA tensors (it costs one
# device->host read per call); the kernels still mask out-of-range targets and
# write NaN to those rows. CPU tensors are always checked.
SKIP_TARGET_CHECK_ENV = "DDVAE_FAST_SKIP_TARGET_CHECK"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKEND_DTYPES = {
    "reference": _FLOAT_DTYPES,
    "cpp": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


class DecoderLoss(NamedTuple):
    """What ``decoder_loss`` returns. Only ``loss`` carries a gradient."""

    loss: Tensor  # argmax_weight * argmax_loss + nll_weight * nll
    argmax_loss: Tensor  # relaxed arg-max loss, mean over non-ignored tokens
    nll: Tensor  # token cross-entropy, mean over non-ignored tokens
    token_accuracy: Tensor  # fraction of non-ignored tokens that are the strict unique arg max
    sequence_accuracy: Tensor  # fraction of sequences with every non-ignored token correct


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_odds(tau: float) -> float:
    """c = log(1/tau - 1), the shift that makes sigma_tau(0) = tau."""
    return math.log1p(-tau) - math.log(tau)


# --------------------------------------------------------------------------
# Input validation (runs before any kernel)
# --------------------------------------------------------------------------


def _check_tau(tau) -> float:
    if isinstance(tau, Tensor):
        # A 0-dim CPU tensor is read on the host (no device sync); under
        # torch.compile pass a Python float instead.
        if tau.dim() != 0 or tau.device.type != "cpu":
            raise TypeError(
                f"tau must be a Python real or a 0-dim CPU tensor, got a tensor of shape "
                f"{tuple(tau.shape)} on {tau.device}"
            )
        if tau.dtype == torch.bool or tau.is_complex():
            raise TypeError(f"tau must be real, got a {tau.dtype} tensor")
        tau = tau.item()
    elif isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not 0.0 < tau < 1.0:  # also rejects NaN
        raise ValueError(f"tau must lie strictly inside (0, 1), got {tau}")
    return tau


def _check_choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


_check_int = check_int
_check_weight = check_finite_real


def _check_logits_target(logits, target) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a last (vocabulary) dimension of size >= 1, got shape "
            f"{tuple(logits.shape)}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (torch.long), got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}"
        )
    if target.device != logits.device:
        raise ValueError(
            f"logits and target must be on the same device, got {logits.device} and "
            f"{target.device}"
        )


@torch.compiler.assume_constant_result
def _resolve_backend(backend, device: torch.device) -> str:
    # torch.compile evaluates this once while tracing (resolve_backend's
    # cached import probes are not traceable) and guards on the result.
    return resolve_backend(backend, device)


def _select_backend(backend, logits: Tensor) -> str:
    name = _resolve_backend(backend, logits.device)
    if logits.dtype not in _BACKEND_DTYPES[name]:
        supported = ", ".join(str(d).replace("torch.", "") for d in _BACKEND_DTYPES[name])
        raise TypeError(
            f"backend {name!r} supports logits of dtype {supported}; got {logits.dtype}"
        )
    return name


def _count_valid_targets_impl(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Number of non-ignored targets (a device tensor); raises on out-of-range ones.

    The check reads one bool back to the host. It runs inside custom ops, so it
    runs eagerly even in a torch.compile'd graph.
    """
    valid = target != ignore_index
    check = target.device.type != "meta" and not (
        target.device.type == "cuda" and os.environ.get(SKIP_TARGET_CHECK_ENV, "0") == "1"
    )
    if check:
        bad = valid & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(
                f"target contains {value}, outside [0, {num_classes}) for logits with "
                f"{num_classes} classes (and not ignore_index={ignore_index})"
            )
    return valid.sum()


@torch.library.custom_op("ddvae_fast::count_valid_targets", mutates_args=())
def _count_valid_targets(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return _count_valid_targets_impl(target, num_classes, ignore_index)


@_count_valid_targets.register_fake
def _(target, num_classes, ignore_index):
    return target.new_empty((), dtype=torch.int64)


# --------------------------------------------------------------------------
# Reference: plain differentiable PyTorch (autograd is the gradient oracle)
# --------------------------------------------------------------------------


def _safe_target(target: Tensor, num_classes: int, ignore_index: int):
    """(valid, in_range, index): index is target where usable, else 0 (never out of bounds)."""
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    index = torch.where(valid & in_range, target, torch.zeros_like(target))
    return valid, in_range, index


def reference_relaxed_argmax_rows(
    logits: Tensor,
    target: Tensor,
    tau: float,
    score: str = "logit",
    ignore_index: int = -100,
) -> Tensor:
    """Per-position relaxed arg-max loss, shape logits.shape[:-1], in the logits dtype.

    Plain differentiable PyTorch: sum over s != t of -log sigma_tau(r_t - r_s)
    with -log sigma_tau(x) = -logsigmoid(x / tau - c), c = log(1/tau - 1).
    Ignored positions give 0; an out-of-range target gives NaN. No validation:
    this is the building block of the reference path and the benchmarks.
    """
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    scores = torch.softmax(logits, dim=-1) if score == "prob" else logits
    score_t = scores.gather(-1, index.unsqueeze(-1))
    pair = -F.logsigmoid((score_t - scores) / tau - _log_odds(tau))
    others = torch.arange(num_classes, device=logits.device) != index.unsqueeze(-1)
    rows = torch.where(others, pair, torch.zeros_like(pair)).sum(dim=-1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return torch.where(valid & ~in_range, torch.full_like(rows, math.nan), rows)


def _reference_nll_rows(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    rows = torch.logsumexp(logits, dim=-1) - logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return torch.where(valid & ~in_range, torch.full_like(rows, math.nan), rows)


def _reference_correct_rows(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """True where the target is the strict unique arg max (ties are wrong) or is ignored."""
    num_classes = logits.shape[-1]
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    logit_t = logits.gather(-1, index.unsqueeze(-1))
    others = torch.arange(num_classes, device=logits.device) != index.unsqueeze(-1)
    beaten = ((logits >= logit_t) & others).any(dim=-1)
    return (~beaten & in_range) | ~valid


def _reduce(rows: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # An all-ignored batch gives 0 / 1 = 0 with a zero gradient, not NaN.
    return total / count.clamp(min=1)


def _reference_loss(logits, target, tau, score, ignore_index, reduction):
    acc = _accumulate_dtype(logits.dtype)
    count = _count_valid_targets(target.reshape(-1), logits.shape[-1], ignore_index)
    rows = reference_relaxed_argmax_rows(logits, target, tau, score, ignore_index).to(acc)
    return _reduce(rows, count, reduction)


def reference_relaxed_argmax_forward(
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
    """The backend contract of docs/loss_backend_contract.md, in PyTorch with explicit gradients.

    Returns (argmax_rows, nll_rows, correct_rows, grad) like the 'cpp' and
    'triton' backends. The gradient is written out (custom-op implementations
    run without autograd); tests check it against autograd of the reference rows.
    """
    num_rows, num_classes = logits.shape
    acc = _accumulate_dtype(logits.dtype)
    x = logits.to(acc)
    valid, in_range, index = _safe_target(target, num_classes, ignore_index)
    bad = valid & ~in_range
    cols = torch.arange(num_classes, device=logits.device)
    is_target = cols == index.unsqueeze(1)
    others = ~is_target
    prob = torch.softmax(x, dim=1) if (prob_mode or need_nll or nll_weight != 0.0) else None

    scores = prob if prob_mode else x
    z = (scores - scores.gather(1, index.unsqueeze(1))) / tau + _log_odds(tau)
    # softplus(z) = -log sigma_tau(r_t - r_s), stable for any z
    pair = -F.logsigmoid(-z)
    zero = x.new_zeros(())
    nan = x.new_full((), math.nan)
    argmax_rows = torch.where(others, pair, zero).sum(dim=1)
    argmax_rows = torch.where(bad, nan, torch.where(valid, argmax_rows, zero))

    if need_nll:
        nll_rows = torch.logsumexp(x, dim=1) - x.gather(1, index.unsqueeze(1)).squeeze(1)
        nll_rows = torch.where(bad, nan, torch.where(valid, nll_rows, zero))
    else:
        nll_rows = torch.zeros_like(argmax_rows)

    beaten = ((x >= x.gather(1, index.unsqueeze(1))) & others).any(dim=1)
    correct_rows = (~beaten & in_range) | ~valid

    if not need_grad:
        return argmax_rows, nll_rows, correct_rows, logits.new_empty((0,))
    # d/dr_s = sigmoid(z_s)/tau for s != t; d/dr_t = -(sum of the others)
    g = torch.where(others, torch.sigmoid(z) / tau, zero)
    g = g - is_target.to(acc) * g.sum(dim=1, keepdim=True)
    if prob_mode:  # chain through the softmax Jacobian
        g = prob * (g - (prob * g).sum(dim=1, keepdim=True))
    grad = argmax_weight * g
    if nll_weight != 0.0:
        grad = grad + nll_weight * (prob - is_target.to(acc))
    grad = grad * grad_scale.to(acc)
    grad = torch.where(valid.unsqueeze(1), grad, zero)
    return argmax_rows, nll_rows, correct_rows, grad.to(logits.dtype).contiguous()


# --------------------------------------------------------------------------
# The custom op around a fused backend forward, and its autograd
# --------------------------------------------------------------------------


def _backend_forward(backend: str):
    if backend == "reference":
        return reference_relaxed_argmax_forward
    if backend == "cpp":
        from .cpp_relaxed_argmax import relaxed_argmax_forward

        return relaxed_argmax_forward
    if backend == "triton":
        from .kernels.relaxed_argmax import relaxed_argmax_forward

        return relaxed_argmax_forward
    raise ValueError(f"no relaxed arg-max forward for backend {backend!r}")


def _rows_for_kernel(logits: Tensor) -> Tensor:
    """(N, V) with stride(1) == 1 and non-overlapping rows, copying only if needed."""
    num_rows, num_classes = logits.shape
    if logits.stride(1) != 1 or (num_rows > 1 and logits.stride(0) < num_classes):
        logits = logits.contiguous()
    return logits


@torch.library.custom_op("ddvae_fast::relaxed_argmax", mutates_args=())
def _relaxed_argmax_op(
    logits: Tensor,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight: float,
    nll_weight: float,
    reduction: str,
    need_grad: bool,
    need_nll: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(N, V) logits, (N,) target -> (loss, argmax_rows, nll_rows, correct_rows, count, grad).

    loss is the reduction of argmax_weight * argmax_rows + nll_weight * nll_rows;
    grad is d loss / d logits for an upstream gradient of 1 (empty when
    need_grad is False).
    """
    logits = _rows_for_kernel(logits)
    target = target.contiguous()
    count = _count_valid_targets_impl(target, logits.shape[1], ignore_index)
    # The kernel applies the 1/count of a 'mean' in float32 before rounding to
    # the logits dtype (float16 gradients would overflow otherwise). A float32
    # scale would cost float64 gradients their precision, so for float64 the
    # scale is applied here in float64 instead.
    scale_in_kernel = reduction == "mean" and logits.dtype != torch.float64
    if scale_in_kernel:
        grad_scale = (1.0 / count.clamp(min=1)).to(torch.float32)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    forward = _backend_forward(backend)
    argmax_rows, nll_rows, correct_rows, grad = forward(
        logits, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight,
        grad_scale, need_grad, need_nll,
    )
    if need_grad and reduction == "mean" and not scale_in_kernel:
        grad.div_(count.clamp(min=1))
    rows = argmax_weight * argmax_rows
    if need_nll:
        rows = rows + nll_weight * nll_rows
    return _reduce(rows, count, reduction), argmax_rows, nll_rows, correct_rows, count, grad


@_relaxed_argmax_op.register_fake
def _(logits, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight, reduction,
      need_grad, need_nll, backend):
    num_rows, num_classes = logits.shape
    acc = _accumulate_dtype(logits.dtype)
    loss = logits.new_empty((num_rows,) if reduction == "none" else (), dtype=acc)
    argmax_rows = logits.new_empty((num_rows,), dtype=acc)
    nll_rows = logits.new_empty((num_rows,), dtype=acc)
    correct_rows = logits.new_empty((num_rows,), dtype=torch.bool)
    count = logits.new_empty((), dtype=torch.int64)
    grad = logits.new_empty((num_rows, num_classes) if need_grad else (0,))
    return loss, argmax_rows, nll_rows, correct_rows, count, grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[7]
    ctx.need_grad = inputs[8]
    # Only the loss is differentiable; the rows, count and gradient are data.
    ctx.mark_non_differentiable(*output[1:])
    # Without this autograd would fill a zero (N, V) gradient for the unused
    # grad output: a second logits-sized buffer and a pass over memory.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[5])


def _backward(ctx, grad_loss, *unused_grads):
    (grad,) = ctx.saved_tensors
    nones = (None,) * 10
    if grad_loss is None or not ctx.need_grad:
        return (None,) + nones
    if getattr(ctx, "gradient_handed_out", False):
        raise RuntimeError(
            "the fused relaxed arg-max backward runs once per forward: its saved gradient "
            "buffer was handed to autograd by the first backward. Recompute the loss, or "
            "use backend='reference' to backpropagate through the same graph twice."
        )
    ctx.gradient_handed_out = True
    if (
        ctx.reduction != "none"
        and grad.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and bool(grad_loss == 1)
    ):
        # loss.backward(): the saved gradient is already the answer. Reading
        # a CPU scalar is no device sync; skipping saves a pass over (N, V).
        return (grad,) + nones
    scale = grad_loss.to(grad.dtype)
    # In place: no second (N, V) buffer.
    if ctx.reduction == "none":
        grad.mul_(scale.unsqueeze(1))
    else:
        grad.mul_(scale)
    return (grad,) + nones


_relaxed_argmax_op.register_autograd(_backward, setup_context=_setup_context)


def _fused(logits, target, tau, score, ignore_index, argmax_weight, nll_weight, reduction,
           need_nll, backend):
    """Flatten to rows and call the custom op; returns its outputs."""
    num_classes = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.reshape(-1, num_classes)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    return torch.ops.ddvae_fast.relaxed_argmax(
        rows, target.reshape(-1), tau, score == "prob", ignore_index, argmax_weight,
        nll_weight, reduction, need_grad, need_nll, backend,
    )


def _op_loss(logits, target, tau, score, ignore_index, reduction, backend):
    loss = _fused(logits, target, tau, score, ignore_index, 1.0, 0.0, reduction, False, backend)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def relaxed_argmax_loss(
    logits: Tensor,
    target: Tensor,
    tau,
    *,
    score: str = "logit",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Relaxed arg-max loss (Eq. 12-13): sum_{s != t} -log sigma_tau(r_t - r_s) per position.

    Args:
        logits: (..., V) float scores.
        target: (...) int64 token ids in [0, V), or ``ignore_index``.
        tau: temperature, a real strictly inside (0, 1).
        score: 'logit' (r = logits: log-softmax differences, the authors' code)
            or 'prob' (r = softmax(logits), Eq. 13 as printed).
        ignore_index: target value whose positions are skipped.
        reduction: 'mean' (over non-ignored positions; 0 with a zero gradient
            if all are ignored), 'sum', or 'none' (shape (...)).
        backend: 'auto' (triton for CUDA, cpp for CPU), 'reference', 'cpp' or
            'triton'. A requested backend that cannot run raises.
    """
    tau = _check_tau(tau)
    _check_choice(score, "score", SCORES)
    _check_choice(reduction, "reduction", REDUCTIONS)
    ignore_index = _check_int(ignore_index, "ignore_index")
    _check_logits_target(logits, target)
    backend = _select_backend(backend, logits)
    if backend == "reference":
        return _reference_loss(logits, target, tau, score, ignore_index, reduction)
    return _op_loss(logits, target, tau, score, ignore_index, reduction, backend)


def decoder_loss(
    logits: Tensor,
    target: Tensor,
    tau,
    *,
    argmax_weight: float = 1.0,
    nll_weight: float = 0.0,
    score: str = "logit",
    ignore_index: int = -100,
    backend: str = "auto",
) -> DecoderLoss:
    """Training loss of a DD-VAE decoder and its statistics, from one pass over the logits.

    Args:
        logits: (B, L, V) decoder scores, batch first.
        target: (B, L) int64 tokens; ``ignore_index`` marks padding.
        argmax_weight, nll_weight: loss = argmax_weight * argmax_loss + nll_weight * nll.

    Returns a :class:`DecoderLoss`. Token accuracy counts a position correct
    only if its target is the strict unique arg max (a tie decodes to the
    undefined token). With no non-ignored position, the losses are 0 and
    the accuracies 1 (vacuously every position is decoded correctly).
    """
    tau = _check_tau(tau)
    _check_choice(score, "score", SCORES)
    ignore_index = _check_int(ignore_index, "ignore_index")
    argmax_weight = _check_weight(argmax_weight, "argmax_weight")
    nll_weight = _check_weight(nll_weight, "nll_weight")
    _check_logits_target(logits, target)
    if logits.dim() != 3:
        raise ValueError(
            f"decoder_loss expects batch-first (B, L, V) logits, got shape {tuple(logits.shape)}"
        )
    backend = _select_backend(backend, logits)
    return _decoder_loss(logits, target, tau, argmax_weight, nll_weight, score, ignore_index,
                         backend, fused=backend != "reference")


def _decoder_loss(logits, target, tau, argmax_weight, nll_weight, score, ignore_index, backend,
                  fused):
    """decoder_loss after validation; fused=True runs the custom op on ``backend``'s forward."""
    batch, length, num_classes = logits.shape
    acc = _accumulate_dtype(logits.dtype)

    if not fused:
        count = _count_valid_targets(target.reshape(-1), num_classes, ignore_index)
        denom = count.clamp(min=1)
        argmax_rows = reference_relaxed_argmax_rows(logits, target, tau, score, ignore_index)
        nll_rows = _reference_nll_rows(logits, target, ignore_index)
        argmax_loss = argmax_rows.to(acc).sum() / denom
        nll = nll_rows.to(acc).sum() / denom
        loss = argmax_weight * argmax_loss + nll_weight * nll
        correct_rows = _reference_correct_rows(logits, target, ignore_index)
    else:
        loss, argmax_rows, nll_rows, correct_rows, count, _ = _fused(
            logits, target, tau, score, ignore_index, argmax_weight, nll_weight, "mean",
            True, backend,
        )
        denom = count.clamp(min=1)
        argmax_loss = argmax_rows.sum() / denom
        nll = nll_rows.sum() / denom

    correct_rows = correct_rows.reshape(batch, length)
    # Ignored positions count as correct in correct_rows; take them out of the token count.
    num_ignored = batch * length - count
    token_correct = correct_rows.sum() - num_ignored
    token_accuracy = torch.where(
        count > 0, token_correct.to(acc) / denom, torch.ones((), dtype=acc, device=logits.device)
    )
    if batch == 0:
        sequence_accuracy = torch.ones((), dtype=acc, device=logits.device)
    else:
        sequence_accuracy = correct_rows.all(dim=1).to(acc).mean()
    return DecoderLoss(
        loss,
        argmax_loss.detach(),
        nll.detach(),
        token_accuracy.detach(),
        sequence_accuracy.detach(),
    )
