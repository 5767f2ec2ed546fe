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
from torch.autograd import forward_ad

from .._checks import check_bool, check_choice, check_finite_real, check_int, check_tau
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
    """What ``decoder_loss`` returns. The three losses carry gradients; the accuracies do not."""

    loss: Tensor  # argmax_weight * argmax_loss + nll_weight * nll
    argmax_loss: Tensor  # relaxed arg-max loss, mean over non-ignored tokens
    nll: Tensor  # token cross-entropy, mean over non-ignored tokens
    token_accuracy: Tensor  # fraction of non-ignored tokens that are the strict unique arg max
    sequence_accuracy: Tensor  # fraction of sequences with every non-ignored token correct


# --------------------------------------------------------------------------
# Input validation (runs before any kernel)
# --------------------------------------------------------------------------


def _check_tensor_types(logits, target) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    # Before any shape is read: a nested tensor has no sizes to read.
    for name, t in (("logits", logits), ("target", target)):
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(f"{name} must be a dense strided tensor, got layout {t.layout}")


def _check_logits_target(logits, target) -> None:
    _check_tensor_types(logits, target)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
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
            f"{tuple(logits.shape[:-1])} (classes are read from the last dimension of the "
            "logits; relaxed_argmax_loss takes class_dim=1 for nn.CrossEntropyLoss's "
            "(N, C, d1, ...) layout)"
        )
    if target.device != logits.device:
        raise ValueError(
            f"logits and target must be on the same device, got {logits.device} and {target.device}"
        )


def _resolve_backend(backend, device: torch.device) -> str:
    # torch.compile evaluates this once while tracing (resolve_backend's
    # cached import probes are not traceable) and guards on the result.
    return resolve_backend(backend, device)


# What torch.compiler.assume_constant_result(_resolve_backend) does, without
# importing torch._dynamo when this module loads (2-5 s in every process);
# tests/test_loss_derivatives.py checks that the decorator still sets only this.
_resolve_backend._dynamo_marked_constant = True


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


@torch.library.custom_op("ddvae_fast::checked_target", mutates_args=())
def _checked_target(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(a copy of target, the number of non-ignored targets); raises on out-of-range ones.

    The reference path computes its rows from the copy, so the check is an
    input of the result: torch.compile cannot drop it as dead code (it did
    when only a 'mean' used the count) and raises as eager does.
    """
    count = _count_valid_targets_impl(target, num_classes, ignore_index)
    return target.clone(), count


@_checked_target.register_fake
def _(target, num_classes, ignore_index):
    return torch.empty_like(target), target.new_empty((), dtype=torch.int64)


# --------------------------------------------------------------------------
# The custom op around a fused backend forward, and its autograd
# --------------------------------------------------------------------------


def _rows_for_kernel(logits: Tensor) -> Tensor:
    """(N, V) with stride(1) == 1 and non-overlapping rows, copying only if needed."""
    num_rows, num_classes = logits.shape
    if logits.stride(1) != 1 or (num_rows > 1 and logits.stride(0) < num_classes):
        logits = logits.contiguous()
    return logits


def _backend_forward(
    logits,
    target,
    count,
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
    """The backend's fused forward, its gradient scaled for the reduction (upstream grad 1)."""
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
    return argmax_rows, nll_rows, correct_rows, grad


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
    """(N, V) logits, (N,) target -> (loss, argmax, nll, correct_rows, count, grad).

    argmax and nll are the reductions of the per-row terms, loss that of
    argmax_weight * argmax_rows + nll_weight * nll_rows; all three are
    differentiable. The nll rows are computed if need_nll or nll_weight != 0
    (else nll is 0). grad is d loss / d logits for an upstream gradient of 1
    (empty when need_grad is False): backward rescales it in place when only
    the loss is used, and recomputes from the logits otherwise. Checks its own
    preconditions (it can be called directly as
    ``torch.ops.ddvae_fast.relaxed_argmax``): metadata only, no host sync
    beyond the target range check.
    """
    _check_logits_target(logits, target)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    check_tau(tau)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(backend, "backend", BACKENDS)
    _select_backend(backend, logits)
    need_nll = need_nll or nll_weight != 0.0
    logits = _rows_for_kernel(logits)
    target = target.contiguous()
    count = _count_valid_targets_impl(target, logits.shape[1], ignore_index)
    argmax_rows, nll_rows, correct_rows, grad = _backend_forward(
        logits,
        target,
        count,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        reduction,
        need_grad,
        need_nll,
        backend,
    )
    rows = argmax_weight * argmax_rows
    if need_nll:
        rows = rows + nll_weight * nll_rows
    return (
        reduce_rows(rows, count, reduction),
        reduce_rows(argmax_rows, count, reduction),
        reduce_rows(nll_rows, count, reduction),
        correct_rows,
        count,
        grad,
    )


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
    reduced = (num_rows,) if reduction == "none" else ()
    loss = logits.new_empty(reduced, dtype=acc)
    argmax = logits.new_empty(reduced, dtype=acc)
    nll = logits.new_empty(reduced, dtype=acc)
    correct_rows = logits.new_empty((num_rows,), dtype=torch.bool)
    count = logits.new_empty((), dtype=torch.int64)
    grad = logits.new_empty((num_rows, num_classes) if need_grad else (0,))
    return loss, argmax, nll, correct_rows, count, grad


def _setup_context(ctx, inputs, output):
    (
        _,
        _,
        ctx.tau,
        ctx.prob_mode,
        ctx.ignore_index,
        ctx.argmax_weight,
        ctx.nll_weight,
        ctx.reduction,
        ctx.need_grad,
        need_nll,
        ctx.backend,
    ) = inputs
    ctx.with_nll = need_nll or ctx.nll_weight != 0.0
    # The loss and the two reduced terms are differentiable; correctness, count
    # and the gradient buffer are data (and the nll term when it is not computed).
    ctx.mark_non_differentiable(*output[3:])
    if not ctx.with_nll:
        ctx.mark_non_differentiable(output[2])
    # Without this autograd would fill a zero (N, V) gradient for the unused
    # grad output: a second logits-sized buffer and a pass over memory.
    ctx.set_materialize_grads(False)
    # The logits are saved only as a reference (no copy; they are normally
    # alive anyway): the general backward recomputes from them.
    ctx.save_for_backward(inputs[0], inputs[1], output[4])
    # The gradient buffer is held outside the saved tensors: backward hands it
    # to autograd (or writes it in place) once and drops it, so a later
    # backward through a retained graph recomputes instead of seeing a
    # modified saved tensor.
    ctx.grad_buffer = output[5] if ctx.need_grad else None


# Row block of the recomputing backward: about 1/128 of the rows, at least
# 2**15 elements, so its temporaries stay a few percent of the logits.
_RECOMPUTE_BLOCK_FRACTION = 128
_RECOMPUTE_BLOCK_MIN_ELEMENTS = 2**15


def _row_coefficient(ctx, grad, count):
    """d(reduced output)/d(row) times the upstream grad: (N, 1) for 'none', else 0-dim."""
    if grad is None:
        return None
    if ctx.reduction == "none":
        return grad.unsqueeze(1)
    if ctx.reduction == "mean":
        return grad / count.clamp(min=1)
    return grad


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _backward(ctx, grad_loss, grad_argmax, grad_nll, *unused_grads):
    logits, target, count = ctx.saved_tensors
    nones = (None,) * 10
    if not ctx.needs_input_grad[0] or (
        grad_loss is None and grad_argmax is None and grad_nll is None
    ):
        return (None,) + nones
    create_graph = torch.is_grad_enabled()
    grad = ctx.grad_buffer
    ctx.grad_buffer = None
    if grad_argmax is None and grad_nll is None and not create_graph:
        if grad is None:
            # A second backward through a retained graph: the first handed the
            # buffer to autograd. Rerun the kernel as the forward did (same
            # values, bit for bit) into a new buffer.
            grad = _backend_forward(
                _rows_for_kernel(logits),
                target.contiguous(),
                count,
                ctx.tau,
                ctx.prob_mode,
                ctx.ignore_index,
                ctx.argmax_weight,
                ctx.nll_weight,
                ctx.reduction,
                True,
                False,
                ctx.backend,
            )[3]
        # loss.backward(): the gradient buffer rescaled in place (no second
        # (N, V) buffer).
        if (
            ctx.reduction != "none"
            and grad.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and bool(grad_loss == 1)
        ):
            # Reading a CPU scalar is no device sync; skipping saves a pass over (N, V).
            return (grad,) + nones
        scale = grad_loss.to(grad.dtype)
        if ctx.reduction == "none":
            grad.mul_(scale.unsqueeze(1))
        else:
            grad.mul_(scale)
        return (grad,) + nones

    # General case: weights known only now (the terms used with other
    # weights than the forward's) or a differentiable gradient
    # (create_graph=True). Recompute from the logits with
    # reference.gradient, the contract's explicit formula in torch ops.
    loss_coef = _row_coefficient(ctx, grad_loss, count)
    argmax_coef = _add(
        None if loss_coef is None else loss_coef * ctx.argmax_weight,
        _row_coefficient(ctx, grad_argmax, count),
    )
    nll_coef = None
    if ctx.with_nll:
        nll_coef = _add(
            None if loss_coef is None else loss_coef * ctx.nll_weight,
            _row_coefficient(ctx, grad_nll, count),
        )
    acc = accumulate_dtype(logits.dtype)
    argmax_coef = 0.0 if argmax_coef is None else argmax_coef
    nll_coef = 0.0 if nll_coef is None else nll_coef

    def block_gradient(rows: slice) -> Tensor:
        def part(coef):
            if isinstance(coef, Tensor) and coef.dim() == 2:
                return coef[rows]
            return coef

        return reference.gradient(
            logits[rows].to(acc),
            target[rows],
            ctx.tau,
            ctx.prob_mode,
            ctx.ignore_index,
            part(argmax_coef),
            part(nll_coef),
        ).to(logits.dtype)

    num_rows, num_classes = logits.shape
    if create_graph:
        # Differentiable in the logits and in the upstream gradients: double
        # backward, Hessians and gradient penalties are exact.
        return (block_gradient(slice(None)),) + nones
    with torch.no_grad():
        # Into the forward's buffer while it is ours, else a new one; row
        # blocks keep the temporaries small (peak extra memory ~1.0x logits).
        out = grad if grad is not None else logits.new_empty((num_rows, num_classes))
        if torch.compiler.is_compiling():
            block = max(num_rows, 1)  # one block: the compiler plans the memory
        else:
            block = max(
                -(-num_rows // _RECOMPUTE_BLOCK_FRACTION),
                _RECOMPUTE_BLOCK_MIN_ELEMENTS // max(num_classes, 1),
                1,
            )
        for start in range(0, num_rows, block):
            rows = slice(start, min(start + block, num_rows))
            out[rows] = block_gradient(rows)
    return (out,) + nones


_relaxed_argmax_op.register_autograd(_backward, setup_context=_setup_context)


# Under torch.autocast the op runs in float32, as F.cross_entropy does: 16-bit
# logits are cast up (a direct op call); the public functions cast before
# they pick a backend, so 'auto' never meets a dtype the backend lacks.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("ddvae_fast::relaxed_argmax", _device_type, torch.float32)


def _autocast_logits(logits: Tensor) -> Tensor:
    """Half-precision logits in float32 when autocast is on for their device (as CE does)."""
    device_type = logits.device.type
    if (
        logits.dtype in (torch.float16, torch.bfloat16)
        and device_type in ("cpu", "cuda")
        and torch.is_autocast_enabled(device_type)
    ):
        return logits.float()
    return logits


def _needs_reference_graph(logits: Tensor) -> bool:
    """True under a forward-mode tangent or a torch.func transform (jvp, jacfwd, vmap, ...).

    The fused op has a reverse-mode formula only; these transforms then run on
    the reference graph, whose derivatives of every order are exact. Under
    torch.compile neither can be active (dynamo traces the op).
    """
    if torch.compiler.is_compiling():
        return False
    # torch.func keeps its transforms on an interpreter stack; empty means none.
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(logits).tangent is not None


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


def _reference_loss(logits, target, tau, score, ignore_index, reduction):
    checked, count = _checked_target(target.reshape(-1), logits.shape[-1], ignore_index)
    rows = reference.relaxed_argmax_rows(
        logits, checked.reshape(target.shape), tau, score, ignore_index
    )
    return reduce_rows(rows.to(accumulate_dtype(logits.dtype)), count, reduction)


def _class_last(logits, target, class_dim):
    """logits with the class dimension last (a view); refuses a shape that reads two ways."""
    _check_tensor_types(logits, target)
    ndim = logits.dim()
    if class_dim is None:
        # (N, C, d1, ...) with target (N, d1, ...) is nn.CrossEntropyLoss's
        # layout; it equals the class-last reading's shapes iff
        # shape[1:-1] == shape[2:]. Then the call is ambiguous: refuse it.
        if (
            ndim >= 3
            and logits.shape[1:-1] == logits.shape[2:]
            and target.shape == logits.shape[:-1]
        ):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} with target of shape "
                f"{tuple(target.shape)} read two ways: classes in the last dimension, or in "
                "dimension 1 as nn.CrossEntropyLoss reads (N, C, d1, ...). Pass class_dim=-1 "
                "or class_dim=1"
            )
        return logits
    class_dim = check_int(class_dim, "class_dim")
    if not -ndim <= class_dim < ndim:
        raise ValueError(
            f"class_dim must lie in [{-ndim}, {ndim}) for logits of shape "
            f"{tuple(logits.shape)}, got {class_dim}"
        )
    return logits.movedim(class_dim, -1)


def _refuse_cross_entropy_options(weight, label_smoothing) -> None:
    """nn.CrossEntropyLoss options with no meaning for the relaxed arg-max loss."""
    if weight is not None:
        raise ValueError(
            "weight is not supported: in cross-entropy it rescales each class's -log p_t "
            "term, but the relaxed arg-max loss of a position is a sum of margins of its "
            "target over every other class (Eq. 13), with no per-class likelihood to "
            "rescale. To weight positions, use reduction='none' and weight the rows"
        )
    if label_smoothing is not None and label_smoothing != 0:
        raise ValueError(
            "label_smoothing is not supported: it trains towards a mixture of the target "
            "and the uniform distribution, but the relaxed arg-max loss trains the target "
            "to be the strict arg max (Eq. 11-13), which a smoothed target does not define"
        )


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
    class_dim: int | None = None,
    weight=None,
    label_smoothing=None,
) -> Tensor:
    """Relaxed arg-max loss (Eq. 12-13): sum_{s != t} -log sigma_tau(r_t - r_s) per position.

    Args:
        logits: (..., V) float scores (or classes in ``class_dim``).
        target: (...) int64 token ids in [0, V), or ``ignore_index``.
        tau: temperature, a real strictly inside (0, 1): a Python or NumPy
            number or a 0-dim CPU tensor.
        score: 'logit' (r = logits: log-softmax differences, the authors' code)
            or 'prob' (r = softmax(logits), Eq. 13 as printed).
        ignore_index: target value whose positions are skipped.
        reduction: 'mean' (over non-ignored positions; 0 with a zero gradient
            if all are ignored), 'sum', or 'none' (shape of target).
        backend: 'auto' (triton for CUDA, cpp for CPU), 'reference', 'cpp' or
            'triton'. A requested backend that cannot run raises.
        class_dim: the dimension of the V classes. None: the last one, and a
            shape that nn.CrossEntropyLoss would read otherwise (logits
            (N, C, d1, ...) with shape[1:-1] == shape[2:]) raises. Pass 1 for
            CE's (N, C, d1, ...) layout (read through one transposing copy
            when there are d dimensions: the kernels read each position's
            classes contiguously).
        weight, label_smoothing: nn.CrossEntropyLoss options, accepted only at
            their defaults (None, 0): they have no meaning here (ValueError).

    Under torch.autocast, 16-bit logits are read in float32, as F.cross_entropy
    does. Derivatives: reverse mode of any order (create_graph=True recomputes
    a differentiable gradient), forward mode and torch.func transforms (run on
    the reference graph); see docs/integration.md.
    """
    tau = check_tau(tau)
    check_choice(score, "score", SCORES)
    check_choice(reduction, "reduction", REDUCTIONS)
    ignore_index = check_int(ignore_index, "ignore_index")
    _refuse_cross_entropy_options(weight, label_smoothing)
    logits = _class_last(logits, target, class_dim)
    _check_logits_target(logits, target)
    logits = _autocast_logits(logits)
    backend = _select_backend(backend, logits)
    if backend == "reference" or _needs_reference_graph(logits):
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
    batch_first: bool = True,
) -> DecoderLoss:
    """Training loss of a DD-VAE decoder and its statistics, from one pass over the logits.

    Args:
        logits: (B, L, V) decoder scores if ``batch_first`` (the default), else
            time-major (L, B, V) as nn.GRU(batch_first=False) emits them; read
            in place either way (no copy).
        target: (B, L) or (L, B) int64 tokens; ``ignore_index`` marks padding.
        argmax_weight, nll_weight: loss = argmax_weight * argmax_loss + nll_weight * nll.
        batch_first: which dimension holds the sequences' positions; sequence
            accuracy groups positions by it. Never inferred from the shapes.

    Returns a :class:`DecoderLoss`. ``loss``, ``argmax_loss`` and ``nll`` are
    differentiable, so ``a * out.argmax_loss + b * out.nll`` trains for any a
    and b; the accuracies are detached. Cost: the forward reads the logits
    once and writes the gradient of ``loss``; a backward through ``loss``
    alone rescales that gradient in place. A backward through
    ``argmax_loss`` or ``nll`` (or with create_graph=True) recomputes the
    gradient from the logits in one more read, with the reference formula in
    row blocks written into the same buffer (peak extra memory stays about
    1.0x the logits). A fixed blend is cheapest through argmax_weight and
    nll_weight and ``out.loss``.

    Token accuracy counts a position correct only if its target is the strict
    unique arg max (a tie, or a NaN logit in the row, is wrong). With no
    non-ignored position, the losses are 0 and the accuracies 1 (vacuously
    every position is decoded correctly).
    """
    tau = check_tau(tau)
    check_choice(score, "score", SCORES)
    ignore_index = check_int(ignore_index, "ignore_index")
    argmax_weight = check_finite_real(argmax_weight, "argmax_weight")
    nll_weight = check_finite_real(nll_weight, "nll_weight")
    batch_first = check_bool(batch_first, "batch_first")
    _check_logits_target(logits, target)
    if logits.dim() != 3:
        layout = "(B, L, V)" if batch_first else "(L, B, V)"
        raise ValueError(
            f"decoder_loss expects {layout} logits with batch_first={batch_first}, got shape "
            f"{tuple(logits.shape)}"
        )
    logits = _autocast_logits(logits)
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
        fused=backend != "reference" and not _needs_reference_graph(logits),
        batch_first=batch_first,
    )


def decoder_accuracies(correct_rows: Tensor, count: Tensor, time_dim: int, dtype: torch.dtype):
    """(token_accuracy, sequence_accuracy), detached, from per-position correctness.

    ``correct_rows`` marks ignored positions correct (the op's convention), so they
    are taken out of the token count; a sequence is correct if every position along
    ``time_dim`` is. With no counted position both are 1 (vacuously correct).
    """
    acc = dtype
    one = torch.ones((), dtype=acc, device=correct_rows.device)
    token_correct = correct_rows.sum() - (correct_rows.numel() - count)
    token_accuracy = torch.where(count > 0, token_correct.to(acc) / count.clamp(min=1), one)
    if correct_rows.numel() == 0 or correct_rows.shape[1 - time_dim] == 0:
        sequence_accuracy = one
    else:
        sequence_accuracy = correct_rows.all(dim=time_dim).to(acc).mean()
    return token_accuracy.detach(), sequence_accuracy.detach()


def _decoder_loss(
    logits,
    target,
    tau,
    argmax_weight,
    nll_weight,
    score,
    ignore_index,
    backend,
    fused,
    batch_first=True,
):
    """decoder_loss after validation; fused=True runs the custom op on ``backend``'s forward."""
    num_classes = logits.shape[-1]
    acc = accumulate_dtype(logits.dtype)

    if not fused:
        checked, count = _checked_target(target.reshape(-1), num_classes, ignore_index)
        checked = checked.reshape(target.shape)
        denom = count.clamp(min=1)
        argmax_rows = reference.relaxed_argmax_rows(logits, checked, tau, score, ignore_index)
        nll_rows = reference.nll_rows(logits, checked, ignore_index)
        argmax_loss = argmax_rows.to(acc).sum() / denom
        nll = nll_rows.to(acc).sum() / denom
        loss = argmax_weight * argmax_loss + nll_weight * nll
        correct_rows = reference.correct_rows(logits.detach(), checked, ignore_index)
    else:
        loss, argmax_loss, nll, correct_rows, count, _ = _fused(
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

    token_accuracy, sequence_accuracy = decoder_accuracies(
        correct_rows.reshape(target.shape), count, 1 if batch_first else 0, acc
    )
    return DecoderLoss(
        loss,
        argmax_loss,
        nll,
        token_accuracy,
        sequence_accuracy,
    )
