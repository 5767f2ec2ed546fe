"""The relaxed arg-max loss of DD-VAE (Section 2.2, Eq. 11-13): validation, op, autograd, API.

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
  inputs once and pick a backend (``ddvae_fast.backends``, the one dispatch
  point);
- backend 'reference' runs the differentiable rows of ``loss/reference.py``
  and lets autograd compute the gradient: the oracle of the fused kernels;
- backends 'cpp' and 'triton' go through one torch.library custom op
  (``ddvae_fast::relaxed_argmax``) around the backend's fused forward
  (docs/loss_backend_contract.md). The kernel returns the loss rows and, in
  the same pass, the gradient already scaled for the reduction; the op's
  backward only multiplies that saved gradient by the upstream gradient.

Losses are returned in float32 for half-precision logits (every backend
accumulates in float32) and in the logits dtype otherwise.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_choice, check_finite_real, check_int, check_tau
from ..backends import BACKENDS, implementation, resolve_backend, supported_dtypes
from . import reference
from .reference import accumulate_dtype, reduce_rows

__all__ = [
    "SKIP_TARGET_CHECK_ENV",
    "DecoderLoss",
    "decoder_loss",
    "relaxed_argmax_loss",
]

SCORES = ("logit", "prob")
REDUCTIONS = ("mean", "sum", "none")
# Setting this to 1 skips the target range check on CUDA tensors (it costs one
# device->host read per call); the kernels still mask out-of-range targets and
# write NaN to those rows. CPU tensors are always checked.
SKIP_TARGET_CHECK_ENV = "DDVAE_FAST_SKIP_TARGET_CHECK"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DecoderLoss(NamedTuple):
    """What ``decoder_loss`` returns. Only ``loss`` carries a gradient."""

    loss: Tensor  # argmax_weight * argmax_loss + nll_weight * nll
    argmax_loss: Tensor  # relaxed arg-max loss, mean over non-ignored tokens
    nll: Tensor  # token cross-entropy, mean over non-ignored tokens
    token_accuracy: Tensor  # fraction of non-ignored tokens that are the strict unique arg max
    sequence_accuracy: Tensor  # fraction of sequences with every non-ignored token correct


# --------------------------------------------------------------------------
# Input validation (runs before any kernel)
# --------------------------------------------------------------------------


def _check_logits_target(logits, target) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a last (vocabulary) dimension of size >= 1, got shape "
            f"{tuple(logits.shape)}"
        )
    for name, t in (("logits", logits), ("target", target)):
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(f"{name} must be a dense strided tensor, got layout {t.layout}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (torch.long), got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}"
        )
    if target.device != logits.device:
        raise ValueError(
            f"logits and target must be on the same device, got {logits.device} and {target.device}"
        )


@torch.compiler.assume_constant_result
def _resolve_backend(backend, device: torch.device) -> str:
    # torch.compile evaluates this once while tracing (resolve_backend's
    # cached import probes are not traceable) and guards on the result.
    return resolve_backend(backend, device)


def _select_backend(backend, logits: Tensor) -> str:
    name = _resolve_backend(backend, logits.device)
    dtypes = supported_dtypes("relaxed_argmax", name)
    if logits.dtype not in dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in dtypes)
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
# The custom op around a fused backend forward, and its autograd
# --------------------------------------------------------------------------


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
    need_grad is False). Checks its own preconditions (it can be called
    directly as ``torch.ops.ddvae_fast.relaxed_argmax``): metadata only, no
    host sync beyond the target range check.
    """
    _check_logits_target(logits, target)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    check_tau(tau)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(backend, "backend", BACKENDS)
    _select_backend(backend, logits)
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
    forward = implementation("relaxed_argmax", backend)
    argmax_rows, nll_rows, correct_rows, grad = forward(
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        grad_scale,
        need_grad,
        need_nll,
    )
    if need_grad and reduction == "mean" and not scale_in_kernel:
        grad.div_(count.clamp(min=1))
    rows = argmax_weight * argmax_rows
    if need_nll:
        rows = rows + nll_weight * nll_rows
    return reduce_rows(rows, count, reduction), argmax_rows, nll_rows, correct_rows, count, grad


@_relaxed_argmax_op.register_fake
def _(
    logits,
    target,
    tau,
    prob_mode,
    ignore_index,
    argmax_weight,
    nll_weight,
    reduction,
    need_grad,
    need_nll,
    backend,
):
    num_rows, num_classes = logits.shape
    acc = accumulate_dtype(logits.dtype)
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


def _fused(
    logits,
    target,
    tau,
    score,
    ignore_index,
    argmax_weight,
    nll_weight,
    reduction,
    need_nll,
    backend,
):
    """Flatten to rows and call the custom op; returns its outputs."""
    num_classes = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.reshape(-1, num_classes)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    return torch.ops.ddvae_fast.relaxed_argmax(
        rows,
        target.reshape(-1),
        tau,
        score == "prob",
        ignore_index,
        argmax_weight,
        nll_weight,
        reduction,
        need_grad,
        need_nll,
        backend,
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
    tau = check_tau(tau)
    check_choice(score, "score", SCORES)
    check_choice(reduction, "reduction", REDUCTIONS)
    ignore_index = check_int(ignore_index, "ignore_index")
    _check_logits_target(logits, target)
    backend = _select_backend(backend, logits)
    if backend == "reference":
        count = _count_valid_targets(target.reshape(-1), logits.shape[-1], ignore_index)
        rows = reference.relaxed_argmax_rows(logits, target, tau, score, ignore_index)
        return reduce_rows(rows.to(accumulate_dtype(logits.dtype)), count, reduction)
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
    tau = check_tau(tau)
    check_choice(score, "score", SCORES)
    ignore_index = check_int(ignore_index, "ignore_index")
    argmax_weight = check_finite_real(argmax_weight, "argmax_weight")
    nll_weight = check_finite_real(nll_weight, "nll_weight")
    _check_logits_target(logits, target)
    if logits.dim() != 3:
        raise ValueError(
            f"decoder_loss expects batch-first (B, L, V) logits, got shape {tuple(logits.shape)}"
        )
    backend = _select_backend(backend, logits)
    return _decoder_loss(
        logits,
        target,
        tau,
        argmax_weight,
        nll_weight,
        score,
        ignore_index,
        backend,
        fused=backend != "reference",
    )


def _decoder_loss(
    logits, target, tau, argmax_weight, nll_weight, score, ignore_index, backend, fused
):
    """decoder_loss after validation; fused=True runs the custom op on ``backend``'s forward."""
    batch, length, num_classes = logits.shape
    acc = accumulate_dtype(logits.dtype)

    if not fused:
        count = _count_valid_targets(target.reshape(-1), num_classes, ignore_index)
        denom = count.clamp(min=1)
        argmax_rows = reference.relaxed_argmax_rows(logits, target, tau, score, ignore_index)
        nll_rows = reference.nll_rows(logits, target, ignore_index)
        argmax_loss = argmax_rows.to(acc).sum() / denom
        nll = nll_rows.to(acc).sum() / denom
        loss = argmax_weight * argmax_loss + nll_weight * nll
        correct_rows = reference.correct_rows(logits, target, ignore_index)
    else:
        loss, argmax_rows, nll_rows, correct_rows, count, _ = _fused(
            logits,
            target,
            tau,
            score,
            ignore_index,
            argmax_weight,
            nll_weight,
            "mean",
            True,
            backend,
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
