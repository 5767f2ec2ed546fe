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

__all__ = ["TritonSource", "launch_config"]


def launch_config(mode: str, proposal: str):
    """[(kernel, constexprs)] that a refill launches for (mode, proposal).

    The single source of the specializations: ``TritonSource`` launches
    exactly these, and the ahead-of-time compile test enumerates them.
    """
    if mode == "rejection":
        constexprs = dict(KERNEL=proposal, BLOCK=BLOCK)
        return [(rejection_count_kernel, constexprs), (rejection_write_kernel, constexprs)]
    per_block = draws_per_block(mode, proposal)
    constexprs = dict(MODE=mode, KERNEL=proposal, PER_BLOCK=per_block, BLOCK=BLOCK)
    return [(transform_kernel, constexprs)]


class TritonSource(PhiloxSource):
    def per_block(self) -> int:
        return draws_per_block(self.mode, self.proposal)

    def _launch(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        if n_blocks <= 0:
            return 0
        grid = (triton.cdiv(n_blocks, BLOCK),)
        # enable_fp_fusion=False: no FMA contraction, so draws match 'cpp' bit for bit.
        launches = launch_config(self.mode, self.proposal)
        if self.mode == "rejection":
            (count_kernel, constexprs), (write_kernel, _) = launches
            counts = torch.empty(grid[0], dtype=torch.int32, device=out.device)
            count_kernel[grid](
                counts, self.seed, self.block_offset, n_blocks,
                enable_fp_fusion=False, **constexprs,
            )  # fmt: skip
            ends = torch.cumsum(counts, 0, dtype=torch.int64)
            write_kernel[grid](
                out, buffer, ends, self.seed, self.block_offset, n_blocks, need,
                enable_fp_fusion=False, **constexprs,
            )  # fmt: skip
            return int(ends[-1])  # the one host read of a rejection refill
        ((kernel, constexprs),) = launches
        kernel[grid](
            out, buffer, self.seed, self.block_offset, n_blocks, need,
            enable_fp_fusion=False, **constexprs,
        )  # fmt: skip
        return n_blocks * self.unit
