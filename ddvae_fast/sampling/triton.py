"""The 'triton' sampler backend: host code of kernels/rejection_sampler.py.

Rejection refill: ``rejection_count_kernel`` counts each program's accepted
candidates, ``torch.cumsum`` turns the counts into output offsets, and
``rejection_write_kernel`` regenerates and writes the accepted draws in
candidate order. The host reads the total once per refill. Transforms and
Box-Muller keep every draw: one kernel, no host read.
"""

from __future__ import annotations

import torch
import triton

from ddvae_fast.kernels.rejection_sampler import (
    BLOCK,
    draws_per_block,
    rejection_count_kernel,
    rejection_write_kernel,
    transform_kernel,
)

from .philox import PhiloxSource

__all__ = ["LAUNCH_OPTIONS", "TritonSource", "launch_config", "specializations"]

# No FMA contraction, so draws match 'cpp' bit for bit (kernels/rejection_sampler.py).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


def launch_config(mode: str, proposal: str):
    """[(kernel, constexprs)] that a refill launches for (mode, proposal).

    The single source of the specializations: ``TritonSource`` launches
    exactly these, and the ahead-of-time compile test (tests/test_aot_compile.py)
    enumerates them through ``specializations``.
    """
    if mode == "rejection":
        constexprs = dict(KERNEL=proposal, BLOCK=BLOCK)
        return [(rejection_count_kernel, constexprs), (rejection_write_kernel, constexprs)]
    per_block = draws_per_block(mode, proposal)
    constexprs = dict(MODE=mode, KERNEL=proposal, PER_BLOCK=per_block, BLOCK=BLOCK)
    return [(transform_kernel, constexprs)]


def specializations():
    """[(mode, proposal, kernel, constexprs)] for every (mode, proposal) a
    RejectionSampler can run: rejection for the seven bounded kernels, the
    closed-form transforms, and Box-Muller for 'gaussian' (ddvae_fast/sampling/sampler.py)."""
    # Imported here: sampler.py imports the backends through the registry.
    from ..distributions.smoothing import KERNELS, PROPOSALS
    from .sampler import TRANSFORM_KERNELS

    pairs = [("rejection", k) for k in KERNELS] + [("transform", k) for k in TRANSFORM_KERNELS]
    pairs += [("gaussian", p) for p in PROPOSALS if p not in KERNELS]
    return [(m, p, kernel, c) for m, p in pairs for kernel, c in launch_config(m, p)]


class TritonSource(PhiloxSource):
    def per_block(self) -> int:
        return draws_per_block(self.mode, self.proposal)

    def launch_rejection(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor):
        """The device work of a rejection refill, without the host read: returns
        ``ends`` (device int64, ends[-1] = draws kept). benchmarks/gpu_check.py
        times this against ``_launch`` to measure what the host read costs."""
        grid = (triton.cdiv(n_blocks, BLOCK),)
        (count_kernel, constexprs), (write_kernel, _) = launch_config(self.mode, self.proposal)
        counts = torch.empty(grid[0], dtype=torch.int32, device=out.device)
        count_kernel[grid](
            counts, self.seed, self.block_offset, n_blocks,
            **LAUNCH_OPTIONS, **constexprs,
        )  # fmt: skip
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        write_kernel[grid](
            out, buffer, ends, self.seed, self.block_offset, n_blocks, need,
            **LAUNCH_OPTIONS, **constexprs,
        )  # fmt: skip
        return ends

    def _launch(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        if n_blocks <= 0:
            return 0
        if self.mode == "rejection":
            ends = self.launch_rejection(n_blocks, out, need, buffer)
            return int(ends[-1])  # the one host read of a rejection refill
        grid = (triton.cdiv(n_blocks, BLOCK),)
        ((kernel, constexprs),) = launch_config(self.mode, self.proposal)
        kernel[grid](
            out, buffer, self.seed, self.block_offset, n_blocks, need,
            **LAUNCH_OPTIONS, **constexprs,
        )  # fmt: skip
        return n_blocks * self.unit
