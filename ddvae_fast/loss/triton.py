"""The 'triton' relaxed arg-max backend: host wrapper of kernels/relaxed_argmax.py.

``forward`` implements docs/loss_backend_contract.md on CUDA tensors (and CPU
tensors under TRITON_INTERPRET=1). Its preconditions are checked once, by the
custom op in ``loss/api.py``; this wrapper checks only the launch limits of the
kernels, picks the specialization (``launch_config``) and launches. No host
synchronisation.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ddvae_fast.kernels.relaxed_argmax import (
    MAX_BLOCK_V,
    MIN_BLOCK_V,
    relaxed_argmax_logit_kernel,
    relaxed_argmax_prob_kernel,
)

from ..backends import triton_interpreted
from .reference import log_odds

__all__ = ["MAX_BLOCK_V", "forward", "launch_config"]


def _block_v(vocab: int, max_block_v: int) -> int:
    return min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), max_block_v)


def _num_warps(block_v: int) -> int:
    # 16 row elements per thread from 512 columns up; one warp below that.
    return min(16, max(1, block_v // 512))


def launch_config(
    vocab: int,
    prob_mode: bool,
    need_grad: bool,
    need_nll: bool,
    nll_weight: float,
    max_block_v: int = MAX_BLOCK_V,
):
    """(kernel, constexpr specialization) that ``forward`` launches for these arguments.

    The single source of the specializations: ``forward`` launches exactly
    this, and the ahead-of-time compile test enumerates it.
    """
    block_v = _block_v(vocab, max_block_v)
    constexprs = dict(
        BLOCK_V=block_v, ONE_BLOCK=vocab <= block_v, NEED_GRAD=need_grad, NEED_NLL=need_nll
    )
    if prob_mode:
        kernel = relaxed_argmax_prob_kernel
    else:
        kernel = relaxed_argmax_logit_kernel
        nll_grad = need_grad and nll_weight != 0.0
        constexprs.update(NLL_GRAD=nll_grad, COMPUTE_LSE=need_nll or nll_grad)
    return kernel, constexprs, _num_warps(block_v)


def _check_launch(logits, max_block_v: int) -> None:
    n_rows, vocab = logits.shape
    if n_rows >= 2**31:
        raise ValueError(f"N = {n_rows} rows exceed the launch grid limit 2^31 - 1")
    if vocab >= 2**31:
        raise ValueError(f"V = {vocab} does not fit the kernel's int32 column index")
    if logits.device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "the triton backend runs CPU tensors only under TRITON_INTERPRET=1 "
            "(set before triton is imported); use a CUDA tensor or the 'cpp' backend"
        )
    if (
        isinstance(max_block_v, bool)
        or not isinstance(max_block_v, int)
        or max_block_v < MIN_BLOCK_V
        or max_block_v & (max_block_v - 1)
    ):
        raise ValueError(f"max_block_v must be a power of two >= {MIN_BLOCK_V}, got {max_block_v}")


def forward(
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
    *,
    max_block_v: int = MAX_BLOCK_V,
):
    """Fused relaxed arg-max forward (and gradient) on the triton backend.

    Returns (argmax_rows, nll_rows, correct_rows, grad) as in
    docs/loss_backend_contract.md: rows float32 (N,), correct_rows bool (N,),
    grad a new contiguous (N, V) tensor in the logits dtype (or shape (0,) when
    need_grad is False). max_block_v (a power of two >= 16) caps the row chunk
    and the fused single-read threshold; tests lower it to exercise the
    chunked loops on small rows.
    """
    _check_launch(logits, max_block_v)
    n_rows, vocab = logits.shape
    device = logits.device
    argmax_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    nll_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    correct_rows = torch.empty(n_rows, dtype=torch.bool, device=device)
    grad_shape = (n_rows, vocab) if need_grad else (0,)
    grad = torch.empty(grad_shape, dtype=logits.dtype, device=device)
    if n_rows == 0:
        nll_rows.zero_()
        return argmax_rows, nll_rows, correct_rows, grad

    kernel, constexprs, num_warps = launch_config(
        vocab, prob_mode, need_grad, need_nll, nll_weight, max_block_v
    )
    # Triton launches on the current CUDA device; make it the tensors' device.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        kernel[(n_rows,)](
            logits, target, grad_scale, argmax_rows, nll_rows, correct_rows, grad,
            V=vocab, stride_row=logits.stride(0), ignore_index=ignore_index,
            inv_tau=1.0 / tau, log_odds=log_odds(tau),
            argmax_weight=argmax_weight, nll_weight=nll_weight,
            num_warps=num_warps, **constexprs,
        )  # fmt: skip
    return argmax_rows, nll_rows, correct_rows, grad
