"""The Philox draw stream shared by the 'cpp' and 'triton' sampler backends.

docs/sampler_stream_contract.md defines it: Philox4x32-10 keyed by the seed,
counted by a 64-bit block offset; a refill consumes whole blocks and advances
the offset, so the RNG state is (seed, block_offset). Both backends draw
bit-identical values for the same seed and calls.
"""

from __future__ import annotations

import torch

__all__ = ["PhiloxSource"]

_COUNTER_LIMIT = 1 << 64


class PhiloxSource:
    """Draw source at (seed, block offset); a backend supplies ``per_block`` and ``_launch``."""

    def __init__(self, proposal: str, mode: str, device: torch.device, seed: int, dtype=None):
        # dtype is ignored: this stream always draws float32.
        self.proposal, self.mode, self.device, self.seed = proposal, mode, device, seed
        self.block_offset = 0
        self.work_dtype = torch.float32  # draws are on a 2^-23 grid, exact in any wider dtype
        self.unit = self.per_block()

    def per_block(self) -> int:
        raise NotImplementedError

    def _launch(self, n_blocks: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        raise NotImplementedError

    def refill(self, n_units: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        """Draw ``n_units`` candidates (a multiple of ``unit``); the first ``need`` kept go
        to ``out``, the rest to ``buffer``. Returns how many were kept."""
        n_blocks = n_units // self.unit
        if self.block_offset + n_blocks >= _COUNTER_LIMIT:
            raise OverflowError("the Philox block counter of this seed is exhausted (2^64 blocks)")
        kept = self._launch(n_blocks, out, need, buffer)
        self.block_offset += n_blocks
        return kept

    def state(self) -> dict:
        return {"seed": self.seed, "block_offset": self.block_offset}

    def load_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.block_offset = int(state["block_offset"])
