"""The 'cpp' sampler backend: the Philox stream of csrc/sampler.cpp on CPU tensors."""

from __future__ import annotations

import torch

from ..backends import cpp_module
from .philox import PhiloxSource

__all__ = ["CppSource"]


class CppSource(PhiloxSource):
    def per_block(self) -> int:
        return cpp_module("sampler").draws_per_block(self.mode, self.proposal)

    def _launch(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        # The accepted count comes back from C++ directly: no device to sync with.
        return cpp_module("sampler").refill(
            self.mode, self.proposal, self.seed, self.block_offset, n_blocks,
            out.data_ptr(), need, buffer.data_ptr(), buffer.numel(), torch.get_num_threads(),
        )  # fmt: skip
