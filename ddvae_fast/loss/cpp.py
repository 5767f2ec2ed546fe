"""The 'cpp' relaxed arg-max backend: host wrapper of csrc/relaxed_argmax.cpp.

``forward`` implements docs/loss_backend_contract.md on CPU tensors. Its
preconditions are checked once, by the custom op in ``loss/api.py``; this
wrapper allocates the outputs with torch and hands raw pointers, sizes and the
row stride to the compiled kernel, which releases the GIL and runs over rows
with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._memory import empty_cpu
from ..backends import cpp_module

__all__ = ["forward", "supported_isas"]

# The dtype codes of csrc/relaxed_argmax.cpp (enum Dtype).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def supported_isas() -> tuple[str, ...]:
    """Instruction sets the compiled kernel can run on this CPU, best first."""
    return tuple(cpp_module("relaxed_argmax").supported_isas())


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
    *,
    isa: str = "auto",
):
    """Fused relaxed arg-max forward (+ gradient) on CPU; see docs/loss_backend_contract.md.

    Returns (argmax_rows, nll_rows, correct_rows, grad): rows in float32
    (float64 for float64 logits; float32 for bfloat16 and float16 logits, as
    the triton backend), correct_rows bool, grad a new contiguous (N, V)
    tensor in the logits dtype, or shape (0,) if need_grad is False.
    bfloat16 and float16 logits are read as they are (no upcast copy).
    ``isa`` ('auto', 'avx512', 'avx2', 'sse2') selects the compiled instruction
    set; tests use it to cover every copy of the kernel.
    """
    module = cpp_module("relaxed_argmax")
    logits = logits.resolve_neg()  # a lazy negation view (rare) is materialised; else a no-op
    num_rows, num_classes = logits.shape
    dtype = logits.dtype
    rows_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    argmax_rows = torch.empty(num_rows, dtype=rows_dtype)
    nll_rows = torch.empty(num_rows, dtype=rows_dtype)
    correct_rows = torch.empty(num_rows, dtype=torch.bool)
    # Written once per call and then owned by autograd: huge pages when large (_memory.py).
    grad = empty_cpu((num_rows, num_classes) if need_grad else (0,), dtype)
    # The kernel writes every element of every output (no zero-fill needed).
    module.forward(
        logits.data_ptr(),
        target.data_ptr(),
        grad_scale.data_ptr(),
        argmax_rows.data_ptr(),
        nll_rows.data_ptr(),
        correct_rows.data_ptr(),
        grad.data_ptr() if need_grad else 0,
        num_rows,
        num_classes,
        logits.stride(0),
        _DTYPE_CODES[dtype],
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        need_grad,
        need_nll,
        torch.get_num_threads(),
        isa,
    )
    return argmax_rows, nll_rows, correct_rows, grad
