"""Host wrapper of the 'cpp' relaxed arg-max backend (csrc/relaxed_argmax.cpp).

``relaxed_argmax_forward`` implements the backend contract of
docs/loss_backend_contract.md on CPU tensors: it checks the contract's
preconditions (cheap metadata checks only; target values are range-checked by
the public API, and the kernel writes NaN rows for out-of-range targets rather
than reading out of bounds), allocates the outputs with torch and hands raw
pointers, sizes and the row stride to the compiled kernel, which releases the
GIL and runs OpenMP over rows with ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations


import torch
from torch import Tensor

from ._checks import check_bool, check_finite_real
from .backends import cpp_module

__all__ = ["relaxed_argmax_forward", "supported_isas"]

_DTYPES = (torch.float32, torch.float64)


def _module():
    return cpp_module("relaxed_argmax")


def supported_isas() -> tuple[str, ...]:
    """Instruction sets the compiled kernel can run on this CPU, best first."""
    return tuple(_module().supported_isas())


def _check_inputs(logits, target, tau, ignore_index, grad_scale) -> float:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be torch.Tensors")
    if not isinstance(grad_scale, Tensor):
        raise TypeError(f"grad_scale must be a 0-dim float32 tensor, got {type(grad_scale).__name__}")
    for name, t in (("logits", logits), ("target", target), ("grad_scale", grad_scale)):
        if t.device.type != "cpu":
            raise ValueError(f"the 'cpp' backend runs CPU tensors; {name} is on {t.device}")
    if logits.layout != torch.strided:
        raise ValueError(f"logits must be a dense (strided) tensor, got layout {logits.layout}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"the 'cpp' backend takes float32 or float64 logits, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    num_rows, num_classes = logits.shape
    if num_classes < 1:
        raise ValueError(f"logits need V >= 1 classes, got shape {tuple(logits.shape)}")
    if num_classes > 1 and logits.stride(1) != 1:
        raise ValueError(
            f"logits must have stride(1) == 1 (rows may be strided), got strides {logits.stride()}"
        )
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64, got {target.dtype}")
    if target.shape != (num_rows,):
        raise ValueError(f"target must have shape ({num_rows},), got {tuple(target.shape)}")
    if not target.is_contiguous():
        raise ValueError("target must be contiguous")
    if grad_scale.dtype != torch.float32 or grad_scale.dim() != 0:
        raise TypeError(
            f"grad_scale must be a 0-dim float32 tensor, got {grad_scale.dtype} of shape "
            f"{tuple(grad_scale.shape)}"
        )
    tau = check_finite_real(tau, "tau")
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must lie strictly inside (0, 1), got {tau}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return tau


def relaxed_argmax_forward(
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
    *,
    isa: str = "auto",
):
    """Fused relaxed arg-max forward (+ gradient) on CPU; see docs/loss_backend_contract.md.

    Returns (argmax_rows, nll_rows, correct_rows, grad): rows in float32
    (float64 for float64 logits), correct_rows bool, grad a new contiguous
    (N, V) tensor in the logits dtype, or shape (0,) if need_grad is False.
    ``isa`` ('auto', 'avx512', 'avx2', 'sse2') selects the compiled instruction
    set; tests use it to cover every copy of the kernel.
    """
    tau = _check_inputs(logits, target, tau, ignore_index, grad_scale)
    prob_mode = check_bool(prob_mode, "prob_mode")
    need_grad = check_bool(need_grad, "need_grad")
    need_nll = check_bool(need_nll, "need_nll")
    argmax_weight = check_finite_real(argmax_weight, "argmax_weight")
    nll_weight = check_finite_real(nll_weight, "nll_weight")
    module = _module()
    logits = logits.resolve_neg()  # a lazy negation view (rare) is materialised; else a no-op

    num_rows, num_classes = logits.shape
    dtype = logits.dtype
    argmax_rows = torch.empty(num_rows, dtype=dtype)
    nll_rows = torch.empty(num_rows, dtype=dtype)
    correct_rows = torch.empty(num_rows, dtype=torch.bool)
    grad = torch.empty((num_rows, num_classes) if need_grad else (0,), dtype=dtype)
    # The kernel writes every element of every output (no zero-fill needed).
    module.forward(
        logits.data_ptr(), target.data_ptr(), grad_scale.data_ptr(),
        argmax_rows.data_ptr(), nll_rows.data_ptr(), correct_rows.data_ptr(),
        grad.data_ptr() if need_grad else 0,
        num_rows, num_classes, logits.stride(0), dtype == torch.float64,
        tau, prob_mode, ignore_index, argmax_weight, nll_weight, need_grad, need_nll,
        torch.get_num_threads(), isa,
    )
    return argmax_rows, nll_rows, correct_rows, grad
