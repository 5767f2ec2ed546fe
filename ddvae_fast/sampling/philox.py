"""The Philox draw stream shared by the 'cpp' and 'triton' sampler backends.

docs/sampler_stream_contract.md defines it: Philox4x32-10 keyed by the seed,
counted by a 64-bit block offset; a refill consumes whole blocks and advances
the offset, so the RNG state is (seed, block_offset). Both backends draw
bit-identical values for the same seed and calls.

Per-rank streams: the 2^64 block counter of a seed is cut into ``RANK_LIMIT``
ranges of ``BLOCKS_PER_RANK`` blocks, and rank r draws only from range r,
[r 2^48, (r + 1) 2^48). For a fixed key Philox is a bijection of the counter,
so the streams of two ranks of one seed are disjoint segments of one stream:
they cannot overlap. Rank 0 starts at block 0, i.e. it is the stream every
sampler drew before ranks existed. A rank that used up its 2^48 blocks
(2^49 rejection candidates) raises instead of running into the next rank's.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCKS_PER_RANK", "RANK_LIMIT", "PhiloxSource"]

RANK_BITS = 16
RANK_LIMIT = 1 << RANK_BITS  # ranks 0 .. 65535
BLOCKS_PER_RANK = 1 << (64 - RANK_BITS)


class PhiloxSource:
    """Draw source at (seed, block offset); a backend supplies ``per_block`` and ``_launch``."""

    def __init__(
        self, proposal: str, mode: str, device: torch.device, seed: int, dtype=None, *, rank=0
    ):
        # dtype is ignored: this stream always draws float32. rank is checked by
        # RejectionSampler (0 <= rank < RANK_LIMIT).
        self.proposal, self.mode, self.device, self.seed = proposal, mode, device, seed
        self.rank = rank
        self.block_offset = rank * BLOCKS_PER_RANK
        self.work_dtype = torch.float32  # draws are on a 2^-23 grid, exact in any wider dtype
        self.unit = self.per_block()

    def per_block(self) -> int:
        raise NotImplementedError

    def _launch(self, n_blocks: int, out, need, buffer, affine=None, offset=0) -> int:
        raise NotImplementedError

    def _range(self) -> tuple[int, int]:
        """The blocks [first, end) this rank may draw."""
        return self.rank * BLOCKS_PER_RANK, (self.rank + 1) * BLOCKS_PER_RANK

    def used_up(self) -> OverflowError:
        return OverflowError(
            f"rank {self.rank} has used up its 2^{64 - RANK_BITS} Philox blocks of this seed"
        )

    def check_blocks(self, n_blocks: int) -> None:
        """OverflowError if n_blocks more blocks would run past this rank's range."""
        if self.block_offset + n_blocks > self._range()[1]:
            raise self.used_up()

    def refill(self, n_units: int, out, need: int, buffer, affine=None, offset: int = 0) -> int:
        """Draw ``n_units`` candidates (a multiple of ``unit``); the first ``need`` kept go
        to ``out[offset:]``, the rest to ``buffer``. Returns how many were kept.

        ``affine`` (sources with ``affine_dtypes``): (mu, sigma, z), 1-D and
        contiguous; the first ``need`` kept draws eps also give z = mu + sigma eps
        at elements [offset, offset + need), and ``out`` may then be None (eps not
        kept). ``offset`` saves the caller slicing four tensors per refill."""
        n_blocks = n_units // self.unit
        self.check_blocks(n_blocks)
        kept = self._launch(n_blocks, out, need, buffer, affine, offset)
        self.block_offset += n_blocks
        return kept

    def state(self) -> dict:
        return {"seed": self.seed, "block_offset": self.block_offset}

    def load_state(self, state: dict) -> None:
        """Checks the block offset against this rank's range, then applies (seed, offset)."""
        first, end = self._range()
        offset = state["block_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or not first <= offset <= end:
            raise ValueError(
                f"state['block_offset'] must be an int in [{first}, {end}] (the blocks of rank "
                f"{self.rank}), got {offset!r}"
            )
        self.seed = int(state["seed"])
        self.block_offset = offset
