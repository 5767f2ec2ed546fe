"""The output projection fused with the relaxed arg-max loss: logits never materialized.

``linear_relaxed_argmax_loss(hidden, weight, target, tau, bias=...)`` equals
``relaxed_argmax_loss(hidden @ weight.T + bias, target, tau)`` and
``linear_decoder_loss`` equals ``decoder_loss`` of those logits, with gradients
for hidden, weight and bias. ``weight`` is (V, H), as ``nn.Linear`` stores it.
For a large vocabulary the (N, V) logits, their gradient and eager PyTorch's
temporaries dominate a decoder's memory; here they exist one chunk of rows at
a time.

Backends:
- 'reference': the materialized formula (``F.linear`` then the reference
  loss, autograd for the gradients): the oracle.
- 'cpp' and 'triton': one torch.library custom op
  (``ddvae_fast::linear_relaxed_argmax``) that walks the rows in chunks sized
  from a memory budget (``chunk_rows_for``). Per chunk: a torch matmul gives
  the logits, the backend's fused forward (docs/loss_backend_contract.md,
  through ``backends.implementation``) gives the loss rows and the logits
  gradient in one pass, and that gradient is contracted at once into
  grad_hidden (g @ W), grad_weight (g.T @ h) and grad_bias (sum of g), then
  dropped. As in Liger-Kernel's fused linear cross-entropy, the forward
  computes the gradients and the backward only scales them. 'mean' needs the
  global count of non-ignored targets first (it scales every chunk), so the op
  counts (and range-checks) the targets before the first chunk.
  With reduction='none' the row weights of the upstream gradient are unknown
  in the forward, so the forward computes the loss rows only and the backward
  (``ddvae_fast::linear_relaxed_argmax_backward``) recomputes the logits chunk
  by chunk: two passes, the same peak memory.

Peak extra memory of the fused path: one chunk of logits plus its gradient
(2 * chunk_rows * V elements) on top of the gradients it returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_bool, check_choice, check_finite_real, check_int, check_tau
from ..backends import BACKENDS, implementation
from . import api
from .api import (
    REDUCTIONS,
    SCORES,
    DecoderLoss,
    decoder_accuracies,
    decoder_loss,
    relaxed_argmax_loss,
)
from .reference import accumulate_dtype, reduce_rows

__all__ = [
    "CHUNK_BYTES",
    "chunk_rows_for",
    "linear_decoder_loss",
    "linear_relaxed_argmax_loss",
]

# Default budget for one chunk's logits and their gradient. 32 MiB keeps the
# chunk at 128 rows for V = 32000 in float32: row chunks of 64-512 rows ran the
# three matmuls about as fast as one (N, V) matmul on this project's CPU box
# (benchmarks/results/cpu_linear_loss.json), and the workspace stays a few
# percent of the (N, V) logits for N in the thousands.
CHUNK_BYTES = 32 * 2**20


def chunk_rows_for(num_rows: int, num_classes: int, dtype: torch.dtype, budget=CHUNK_BYTES) -> int:
    """Rows per chunk such that a chunk's logits and their gradient fit in ``budget`` bytes.

    At least 1 (a single row over budget still runs) and at most ``num_rows``.
    """
    per_row = 2 * num_classes * torch.empty((), dtype=dtype).element_size()
    return max(1, min(num_rows, budget // per_row))


# --------------------------------------------------------------------------
# Validation (runs before any kernel)
# --------------------------------------------------------------------------


def _check_chunk_rows(chunk_rows) -> int:
    """None (0 inside the op: choose from CHUNK_BYTES) or an int >= 1."""
    if chunk_rows is None:
        return 0
    chunk_rows = check_int(chunk_rows, "chunk_rows")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    return chunk_rows


def _check_linear(hidden, weight, bias, target) -> Tensor:
    """Check hidden, weight and bias; return a zero-memory stand-in for the logits.

    The stand-in (a 0-dim tensor expanded to hidden.shape[:-1] + (V,)) has the
    logits' shape, dtype and device, so the loss's own checks of the target
    and of the backend's dtypes (``loss/api.py``) run unchanged on it.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    named = [("hidden", hidden), ("weight", weight)] + (
        [("bias", bias)] if bias is not None else []
    )
    for name, t in named:
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(f"{name} must be a dense strided tensor, got layout {t.layout}")
    if hidden.dtype not in api._FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have a last (feature) dimension, got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be (V, H) with V >= 1, as nn.Linear stores it; got shape "
            f"{tuple(weight.shape)}"
        )
    num_classes = weight.shape[0]
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight is (V, H) = {tuple(weight.shape)} but hidden's last dimension is "
            f"{hidden.shape[-1]}; H must match"
        )
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"bias must have shape (V,) = ({num_classes},), got {tuple(bias.shape)}")
    for name, t in named[1:]:
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal hidden's dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")
    return hidden.new_empty(()).expand(*hidden.shape[:-1], num_classes)


def _check_common(hidden, weight, bias, target, tau, score, ignore_index, backend):
    """The checks both public functions share; returns (tau, ignore_index, backend)."""
    tau = check_tau(tau)
    check_choice(score, "score", SCORES)
    ignore_index = check_int(ignore_index, "ignore_index")
    logits_like = _check_linear(hidden, weight, bias, target)
    api._check_logits_target(logits_like, target)
    return tau, ignore_index, api._select_backend(backend, logits_like)


# --------------------------------------------------------------------------
# The chunked pass and the custom ops
# --------------------------------------------------------------------------


def _chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight: float,
    nll_weight: float,
    grad_scale: Tensor,
    row_scale: Tensor | None,
    needs: tuple[bool, bool, bool],
    need_nll: bool,
    backend: str,
    chunk_rows: int,
):
    """Loss rows and (if any of ``needs``) the gradients, one chunk of rows at a time.

    hidden (N, H), weight (V, H), bias (V,) or None, target (N,) contiguous.
    The logits gradient of a chunk is grad_scale * d rows / d logits
    (docs/loss_backend_contract.md), times row_scale per row if given.
    Returns (argmax_rows, nll_rows, correct_rows, grad_hidden, grad_weight,
    grad_bias); a gradient not asked for is an empty (0,) tensor.
    """
    forward = implementation("relaxed_argmax", backend)
    num_rows, features = hidden.shape
    num_classes = weight.shape[0]
    dtype = hidden.dtype
    acc = accumulate_dtype(dtype)
    rows_per_chunk = chunk_rows or chunk_rows_for(num_rows, num_classes, dtype)
    need_grad = any(needs)
    argmax_rows = hidden.new_empty((num_rows,), dtype=acc)
    nll_rows = hidden.new_zeros((num_rows,), dtype=acc)
    correct_rows = hidden.new_empty((num_rows,), dtype=torch.bool)
    # A gradient not asked for is a distinct empty tensor (op outputs may not alias).
    grad_hidden = hidden.new_empty((num_rows, features) if needs[0] else (0,))
    # Accumulated over chunks in the accumulation dtype (float32 for 16-bit inputs).
    grad_weight = hidden.new_zeros((num_classes, features) if needs[1] else (0,), dtype=acc)
    grad_bias = hidden.new_zeros((num_classes,) if needs[2] else (0,), dtype=acc)
    # One logits buffer, reused by every chunk (the last one uses its first rows).
    buffer = hidden.new_empty((min(rows_per_chunk, num_rows), num_classes))
    weight_t = weight.t()
    for start in range(0, num_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_rows)
        h = hidden[start:stop]
        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        a, n, c, g = forward(
            logits,
            target[start:stop],
            tau,
            prob_mode,
            ignore_index,
            argmax_weight,
            nll_weight,
            grad_scale,
            need_grad,
            need_nll,
        )
        argmax_rows[start:stop] = a
        if need_nll:
            nll_rows[start:stop] = n
        correct_rows[start:stop] = c
        if not need_grad:
            continue
        if row_scale is not None:
            g.mul_(row_scale[start:stop].to(g.dtype).unsqueeze(1))
        if needs[0]:
            torch.mm(g, weight, out=grad_hidden[start:stop])
        if needs[1]:
            if grad_weight.dtype == dtype:
                grad_weight.addmm_(g.t(), h)
            else:  # 16-bit: the matmul accumulates in float32, the chunk sum too
                grad_weight.add_(torch.mm(g.t(), h))
        if needs[2]:
            grad_bias.add_(g.sum(dim=0, dtype=acc))
        del g  # the chunk's logits gradient is not kept
    return (
        argmax_rows,
        nll_rows,
        correct_rows,
        grad_hidden,
        grad_weight.to(dtype),
        grad_bias.to(dtype),
    )


def _check_op_inputs(hidden, weight, bias, target, tau, reduction, backend, chunk_rows):
    """The op's own preconditions (it can be called as torch.ops.ddvae_fast.*): metadata only."""
    logits_like = _check_linear(hidden, weight, bias, target)
    api._check_logits_target(logits_like, target)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    check_tau(tau)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(backend, "backend", BACKENDS)
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be >= 0 (0: from the memory budget), got {chunk_rows}")
    api._select_backend(backend, logits_like)


@torch.library.custom_op("ddvae_fast::linear_relaxed_argmax", mutates_args=())
def _linear_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight: float,
    nll_weight: float,
    reduction: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    need_nll: bool,
    backend: str,
    chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(N, H) hidden, (V, H) weight -> (loss, argmax_rows, nll_rows, correct_rows, count,
    grad_hidden, grad_weight, grad_bias).

    loss reduces argmax_weight * argmax_rows + nll_weight * nll_rows. For 'mean'
    and 'sum' the gradients are d loss / d input for an upstream gradient of 1
    (empty where not asked for); for 'none' they are empty (the backward op
    computes them).
    """
    _check_op_inputs(hidden, weight, bias, target, tau, reduction, backend, chunk_rows)
    target = target.contiguous()
    count = api._count_valid_targets_impl(target, weight.shape[0], ignore_index)
    in_forward = reduction != "none"
    needs = (
        need_grad_hidden and in_forward,
        need_grad_weight and in_forward,
        need_grad_bias and in_forward and bias is not None,
    )
    # As in loss/api.py: a 'mean' scale goes into the kernel in float32 (16-bit
    # gradients would overflow otherwise), except for float64, which would lose
    # its precision to a float32 scale; that is applied to the results instead.
    scale_in_kernel = reduction == "mean" and hidden.dtype != torch.float64
    if scale_in_kernel:
        grad_scale = (1.0 / count.clamp(min=1)).to(torch.float32)
    else:
        grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    argmax_rows, nll_rows, correct_rows, *grads = _chunked_pass(
        hidden,
        weight,
        bias,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        grad_scale,
        None,
        needs,
        need_nll,
        backend,
        chunk_rows,
    )
    if reduction == "mean" and not scale_in_kernel:
        for grad in grads:
            grad.div_(count.clamp(min=1))
    rows = argmax_weight * argmax_rows
    if need_nll:
        rows = rows + nll_weight * nll_rows
    loss = reduce_rows(rows, count, reduction)
    return (loss, argmax_rows, nll_rows, correct_rows, count, *grads)


def _grad_shapes(hidden, weight, bias, needs):
    num_rows, features = hidden.shape
    num_classes = weight.shape[0]
    return (
        hidden.new_empty((num_rows, features) if needs[0] else (0,)),
        hidden.new_empty((num_classes, features) if needs[1] else (0,)),
        hidden.new_empty((num_classes,) if needs[2] and bias is not None else (0,)),
    )


@_linear_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    tau,
    prob_mode,
    ignore_index,
    argmax_weight,
    nll_weight,
    reduction,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    need_nll,
    backend,
    chunk_rows,
):
    num_rows = hidden.shape[0]
    acc = accumulate_dtype(hidden.dtype)
    loss = hidden.new_empty((num_rows,) if reduction == "none" else (), dtype=acc)
    in_forward = reduction != "none"
    needs = tuple(n and in_forward for n in (need_grad_hidden, need_grad_weight, need_grad_bias))
    return (
        loss,
        hidden.new_empty((num_rows,), dtype=acc),
        hidden.new_empty((num_rows,), dtype=acc),
        hidden.new_empty((num_rows,), dtype=torch.bool),
        hidden.new_empty((), dtype=torch.int64),
        *_grad_shapes(hidden, weight, bias, needs),
    )


@torch.library.custom_op("ddvae_fast::linear_relaxed_argmax_backward", mutates_args=())
def _linear_backward_op(
    grad_rows: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    tau: float,
    prob_mode: bool,
    ignore_index: int,
    argmax_weight: float,
    nll_weight: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    backend: str,
    chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_n grad_rows[n] * loss_row[n] (reduction='none'), logits recomputed."""
    _check_op_inputs(hidden, weight, bias, target, tau, "none", backend, chunk_rows)
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    return tuple(
        _chunked_pass(
            hidden,
            weight,
            bias,
            target.contiguous(),
            tau,
            prob_mode,
            ignore_index,
            argmax_weight,
            nll_weight,
            grad_scale,
            grad_rows,
            needs,
            False,
            backend,
            chunk_rows,
        )[3:]
    )


@_linear_backward_op.register_fake
def _(
    grad_rows,
    hidden,
    weight,
    bias,
    target,
    tau,
    prob_mode,
    ignore_index,
    argmax_weight,
    nll_weight,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    backend,
    chunk_rows,
):
    return _grad_shapes(hidden, weight, bias, (need_grad_hidden, need_grad_weight, need_grad_bias))


_NUM_INPUTS = 16  # of _linear_op


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight) = (
        inputs[:9]
    )
    ctx.reduction = inputs[9]
    ctx.needs = tuple(inputs[10:13])
    ctx.op_args = (tau, prob_mode, ignore_index, argmax_weight, nll_weight)
    ctx.backend, ctx.chunk_rows = inputs[14], inputs[15]
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        # Recomputed in the backward: keep the inputs, not (N, V) anything.
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[5:])


def _backward(ctx, grad_loss, *unused_grads):
    nones = (None,) * (_NUM_INPUTS - 3)
    if grad_loss is None or not any(ctx.needs):
        return (None, None, None) + nones
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grads = torch.ops.ddvae_fast.linear_relaxed_argmax_backward(
            grad_loss,
            hidden,
            weight,
            bias,
            target,
            *ctx.op_args,
            *ctx.needs,
            ctx.backend,
            ctx.chunk_rows,
        )
    else:
        if getattr(ctx, "gradient_handed_out", False):
            raise RuntimeError(
                "the fused linear relaxed arg-max backward runs once per forward: its saved "
                "gradients were handed to autograd by the first backward. Recompute the loss, "
                "or use backend='reference' to backpropagate through the same graph twice."
            )
        ctx.gradient_handed_out = True
        grads = ctx.saved_tensors
        # loss.backward() on CPU: the saved gradients are already the answer
        # (reading a CPU scalar is no device sync). Otherwise scale in place.
        skip = (
            grad_loss.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and bool(grad_loss == 1)
        )
        if not skip:
            for grad in grads:
                grad.mul_(grad_loss.to(grad.dtype))
    grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needs))
    if not ctx.has_bias:
        grad_bias = None
    return (grad_hidden, grad_weight, grad_bias) + nones


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _needs_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _fused(
    hidden,
    weight,
    bias,
    target,
    tau,
    score,
    ignore_index,
    argmax_weight,
    nll_weight,
    reduction,
    need_nll,
    backend,
    chunk_rows,
):
    """Flatten hidden to rows and call the custom op; returns its outputs."""
    features = hidden.shape[-1]
    return torch.ops.ddvae_fast.linear_relaxed_argmax(
        hidden.reshape(-1, features),
        weight,
        bias,
        target.reshape(-1),
        tau,
        score == "prob",
        ignore_index,
        argmax_weight,
        nll_weight,
        reduction,
        _needs_grad(hidden),
        _needs_grad(weight),
        _needs_grad(bias),
        need_nll,
        backend,
        chunk_rows,
    )


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def linear_relaxed_argmax_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    tau,
    *,
    bias: Tensor | None = None,
    score: str = "logit",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> Tensor:
    """``relaxed_argmax_loss(hidden @ weight.T + bias, target, tau, ...)`` without the logits.

    Args:
        hidden: (..., H) float features (the decoder's last hidden state).
        weight: (V, H) output projection, as ``nn.Linear(H, V).weight`` stores it.
        target: (...) int64 token ids in [0, V), or ``ignore_index``.
        tau, score, ignore_index, reduction: as in :func:`ddvae_fast.relaxed_argmax_loss`.
        bias: optional (V,) output bias.
        backend: 'auto' (triton for CUDA, cpp for CPU), 'reference' (materializes
            the logits: the oracle), 'cpp' or 'triton'.
        chunk_rows: rows per chunk of the fused backends; None chooses it from
            a budget of ``CHUNK_BYTES`` for one chunk's logits and gradient.
            Ignored by 'reference'.

    The fused backends compute the gradients during the forward pass (for
    'mean' and 'sum'), so a second backward through the same graph raises;
    see the module docstring.
    """
    tau, ignore_index, backend = _check_common(
        hidden, weight, bias, target, tau, score, ignore_index, backend
    )
    check_choice(reduction, "reduction", REDUCTIONS)
    chunk_rows = _check_chunk_rows(chunk_rows)
    if backend == "reference":
        logits = F.linear(hidden, weight, bias)
        return relaxed_argmax_loss(
            logits,
            target,
            tau,
            score=score,
            ignore_index=ignore_index,
            reduction=reduction,
            backend="reference",
        )
    loss = _fused(
        hidden,
        weight,
        bias,
        target,
        tau,
        score,
        ignore_index,
        1.0,
        0.0,
        reduction,
        False,
        backend,
        chunk_rows,
    )[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def linear_decoder_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    tau,
    *,
    bias: Tensor | None = None,
    argmax_weight: float = 1.0,
    nll_weight: float = 0.0,
    score: str = "logit",
    ignore_index: int = -100,
    batch_first: bool = True,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> DecoderLoss:
    """``decoder_loss(hidden @ weight.T + bias, target, tau, ...)`` without the logits.

    Args:
        hidden: (B, L, H) decoder features, or (L, B, H) with ``batch_first=False``
            (read in place: time-major input is not transposed or copied).
        weight: (V, H); bias: optional (V,).
        target: (B, L) int64, or (L, B) with ``batch_first=False``.
        The rest as in :func:`ddvae_fast.decoder_loss` and
        :func:`linear_relaxed_argmax_loss`.

    Returns a :class:`ddvae_fast.DecoderLoss`; sequence accuracy groups the
    positions of each sequence along the length dimension of either layout.
    """
    batch_first = check_bool(batch_first, "batch_first")
    argmax_weight = check_finite_real(argmax_weight, "argmax_weight")
    nll_weight = check_finite_real(nll_weight, "nll_weight")
    tau, ignore_index, backend = _check_common(
        hidden, weight, bias, target, tau, score, ignore_index, backend
    )
    chunk_rows = _check_chunk_rows(chunk_rows)
    if hidden.dim() != 3:
        layout = "(B, L, H)" if batch_first else "(L, B, H)"
        raise ValueError(
            f"linear_decoder_loss expects {layout} hidden (batch_first={batch_first}), got "
            f"shape {tuple(hidden.shape)}"
        )
    if backend == "reference":
        logits = F.linear(hidden, weight, bias)
        if not batch_first:
            logits, target = logits.transpose(0, 1), target.transpose(0, 1)
        return decoder_loss(
            logits,
            target,
            tau,
            argmax_weight=argmax_weight,
            nll_weight=nll_weight,
            score=score,
            ignore_index=ignore_index,
            backend="reference",
        )
    loss, argmax_rows, nll_rows, correct_rows, count, *_ = _fused(
        hidden,
        weight,
        bias,
        target,
        tau,
        score,
        ignore_index,
        argmax_weight,
        nll_weight,
        "mean",
        True,
        backend,
        chunk_rows,
    )
    return _statistics(
        loss, argmax_rows, nll_rows, correct_rows, count, target.shape, 1 if batch_first else 0
    )


def _statistics(loss, argmax_rows, nll_rows, correct_rows, count, shape, length_dim):
    """DecoderLoss from the op's rows, with decoder_loss's accuracies."""
    denom = count.clamp(min=1)
    token_accuracy, sequence_accuracy = decoder_accuracies(
        correct_rows.reshape(shape), count, length_dim, argmax_rows.dtype
    )
    return DecoderLoss(
        loss,
        (argmax_rows.sum() / denom).detach(),
        (nll_rows.sum() / denom).detach(),
        token_accuracy,
        sequence_accuracy,
    )
