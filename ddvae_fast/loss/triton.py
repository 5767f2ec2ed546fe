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

# Row chunk of the chunked path (V > max_block_v): at 16 warps, 8 values per thread.
CHUNK_BLOCK_V = 4096

__all__ = [
    "MAX_BLOCK_V",
    "forward",
    "launch_arguments",
    "launch_config",
    "launch_options",
    "specializations",
]


def _block_v(vocab: int, max_block_v: int) -> int:
    block_v = min(max(triton.next_power_of_2(vocab), MIN_BLOCK_V), max_block_v)
    if vocab > block_v:  # chunked: 8 values per thread at 16 warps (see _num_warps)
        block_v = min(block_v, CHUNK_BLOCK_V)
    return block_v


def _num_warps(block_v: int) -> int:
    # At most 8 row values per thread up to 4096 columns, 16 at the one-block
    # 8192. tests/test_aot_compile.py found ptxas spills (8-24 B) with 16 per
    # thread on the chunked path at 8192 / 16 warps and on 512 / 1 warp.
    return min(16, max(1, block_v // 256))


def launch_config(
    vocab: int,
    prob_mode: bool,
    need_grad: bool,
    need_nll: bool,
    nll_weight: float,
    max_block_v: int = MAX_BLOCK_V,
):
    """(kernel, constexpr specialization, num_warps) that ``forward`` launches here.

    The single source of the specializations: ``forward`` launches exactly
    this, and the ahead-of-time compile test (tests/test_aot_compile.py)
    enumerates it through ``specializations``.
    """
    block_v = _block_v(vocab, max_block_v)
    constexprs = dict(BLOCK_V=block_v, ONE_BLOCK=vocab <= block_v, NEED_GRAD=need_grad)
    if prob_mode:
        kernel = relaxed_argmax_prob_kernel
    else:
        kernel = relaxed_argmax_logit_kernel
        nll_grad = need_grad and nll_weight != 0.0
        constexprs.update(NLL_GRAD=nll_grad, COMPUTE_LSE=need_nll or nll_grad)
    return kernel, constexprs, _num_warps(block_v)


def launch_options(constexprs: dict, num_warps: int) -> dict:
    """The launch options that go with a specialization.

    The chunked path caps registers at the block's full share (65536 / threads):
    left to itself, ptxas stops at 64 registers per thread at 16 warps and spills
    8-24 bytes in the 16-bit and gradient variants (tests/test_aot_compile.py
    found them; with the cap they compile to at most 99 registers, no spills).
    """
    options = {"num_warps": num_warps}
    if not constexprs["ONE_BLOCK"]:
        options["maxnreg"] = 65536 // (32 * num_warps)
    return options


def specializations(max_block_v: int = MAX_BLOCK_V):
    """Every distinct ``launch_config`` over its whole argument space:
    [(launch_config keyword arguments, kernel, constexprs, num_warps)], each
    with the first (smallest-vocabulary) arguments that select it.

    The vocabularies are the block-size boundaries (1, each power of two up to
    max_block_v, and one past it for the chunked path); the booleans take both
    values and nll_weight zero and non-zero, the only distinction the dispatch
    makes on it.
    """
    vocabs = [1] + [2**k for k in range(1, max_block_v.bit_length())] + [max_block_v + 1]
    seen, out = set(), []
    for vocab in vocabs:
        for prob_mode in (False, True):
            for need_grad in (False, True):
                for need_nll in (False, True):
                    for nll_weight in (0.0, 1.0):
                        args = dict(
                            vocab=vocab, prob_mode=prob_mode, need_grad=need_grad,
                            need_nll=need_nll, nll_weight=nll_weight, max_block_v=max_block_v,
                        )  # fmt: skip
                        kernel, constexprs, num_warps = launch_config(**args)
                        key = (kernel.__name__, tuple(sorted(constexprs.items())), num_warps)
                        if key not in seen:
                            seen.add(key)
                            out.append((args, kernel, constexprs, num_warps))
    return out


def launch_arguments(
    logits, target, grad_scale, outputs, tau, ignore_index, argmax_weight, nll_weight, need_nll
):
    """The runtime arguments of the loss kernels, positional then keyword.

    Shared by ``forward`` and the ahead-of-time compile test, which passes
    stand-in tensors (dtype, shape and alignment are all Triton specializes on).
    """
    argmax_rows, nll_rows, correct_rows, grad = outputs
    args = (logits, target, grad_scale, argmax_rows, nll_rows, correct_rows, grad)
    kwargs = dict(
        V=logits.shape[1], stride_row=logits.stride(0), ignore_index=ignore_index,
        inv_tau=1.0 / tau, log_odds=log_odds(tau),
        argmax_weight=argmax_weight, nll_weight=nll_weight, need_nll=need_nll,
    )  # fmt: skip
    return args, kwargs


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
    args, kwargs = launch_arguments(
        logits, target, grad_scale, (argmax_rows, nll_rows, correct_rows, grad),
        tau, ignore_index, argmax_weight, nll_weight, need_nll,
    )  # fmt: skip
    with on_device:
        kernel[(n_rows,)](*args, **launch_options(constexprs, num_warps), **kwargs, **constexprs)
    return argmax_rows, nll_rows, correct_rows, grad
