"""The 'triton' sampler backend: host code of kernels/rejection_sampler.py.

The buffer's bookkeeping (head, count), the Philox block offset and the
candidates count live on the device, in ``counters`` (kernels/rejection_sampler.py
says how a call uses them): a call launches ``device_plan_kernel``, for
rejection a ``torch.cumsum`` of the per-tile counts, and ``device_write_kernel``,
and never reads anything back. The host sizes the grid and the buffer from
upper bounds it keeps itself (``RejectionSampler._fill_on_device``).
"""

from __future__ import annotations

import torch
import triton

from ddvae_fast.kernels.rejection_sampler import (
    BLOCK,
    device_plan_kernel,
    device_write_kernel,
    draws_per_block,
)

from .philox import BLOCKS_PER_RANK, PhiloxSource

__all__ = ["COPY", "LAUNCH_OPTIONS", "TritonSource", "launch_config", "specializations"]

# No FMA contraction, so draws match 'cpp' bit for bit (kernels/rejection_sampler.py).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)
COPY = 1024  # buffered draws copied per program iteration
# Under the interpreter every program runs in turn in Python, each at a high
# fixed cost: one program loops over every tile (tests/test_sampler_backends.py
# runs several to check how they share the tiles).
_INTERPRETED_PROGRAMS = 1
_PROGRAMS_PER_SM = 4


def launch_config(mode: str, proposal: str):
    """[(kernel, constexprs)] that a call launches for (mode, proposal).

    The single source of the specializations: ``TritonSource`` launches
    exactly these, and the ahead-of-time compile test (tests/test_aot_compile.py)
    enumerates them through ``specializations``. The refill policy's constants
    come from RejectionSampler (ddvae_fast/sampling/sampler.py), so the device
    sizes refills as the host does.
    """
    from . import sampler as policy  # sampler.py imports the backends through the registry

    constexprs = dict(
        MODE=mode,
        KERNEL=proposal,
        UNIT=draws_per_block(mode, proposal),
        BLOCK=BLOCK,
        COPY=COPY,
        SLACK_SIGMAS=policy._SLACK_SIGMAS,
        MIN_REFILL=policy._MIN_REFILL,
        MAX_REFILL_FLOOR=policy._MAX_REFILL_FLOOR,
        REFILL_FRACTION=policy._REFILL_FRACTION,
    )
    return [
        (device_plan_kernel, constexprs),
        (device_write_kernel, dict(constexprs, BLOCKS_PER_RANK=BLOCKS_PER_RANK)),
    ]


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
    """Draw source of backend 'triton', with its bookkeeping on the device.

    ``device_bookkeeping``: RejectionSampler keeps the buffer head and count,
    the block offset and the candidates count in a device tensor and calls
    ``fill`` instead of ``refill``; ``block_offset`` here is current only after
    the sampler has read the counters back (``RejectionSampler._sync_counters``).
    """

    device_bookkeeping = True
    affine_dtypes = (torch.float32,)  # rsample's fused draw (z = fma(sigma, eps, mu) in float32)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The call's workspace: the plan, and per refill tile the kept count and its
        # running sum (grown on demand; transforms pass them unused). One signature
        # per kernel for every mode, as tests/test_aot_compile.py compiles it.
        self._plan = torch.zeros(8, dtype=torch.int64, device=self.device)
        self._counts = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._ends = torch.zeros(1, dtype=torch.int64, device=self.device)

    def per_block(self) -> int:
        return draws_per_block(self.mode, self.proposal)

    def _launch(self, n_blocks, out, need, buffer, affine=None, offset=0) -> int:
        raise RuntimeError("the triton source fills on the device (fill), never by refill")

    def _programs(self, work_items: int) -> int:
        if self.device.type != "cuda":  # the interpreter (TRITON_INTERPRET=1)
            return max(1, min(work_items, _INTERPRETED_PROGRAMS))
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return max(1, min(work_items, _PROGRAMS_PER_SM * sms))

    def fill(self, counters, buffer, n, units_cap, acceptance, out=None, affine=None):
        """The next n draws, served from ``buffer`` then refilled, with no host read.

        ``counters`` (int64 [head, count, block offset, candidates, error]) and
        ``buffer`` are the sampler's; ``units_cap`` bounds the refill size (and
        the buffer holds at least that many draws). ``out`` gets eps (may be None
        with ``affine``); ``affine`` = (mu, sigma, z), float32, contiguous, for
        z = fma(sigma, eps, mu).
        """
        tiles = triton.cdiv(units_cap // self.unit, BLOCK)
        if self.mode == "rejection" and self._counts.numel() < tiles:
            self._counts = torch.empty(tiles, dtype=torch.int32, device=self.device)
            self._ends = torch.empty(tiles, dtype=torch.int64, device=self.device)
        # Unused pointer arguments get a real tensor of the right dtype (never accessed).
        mu, sigma, z = affine if affine is not None else (buffer, buffer, buffer)
        args = (
            out if out is not None else buffer, z, mu, sigma, buffer,
            n, self.seed, self._range()[0], int(out is not None), int(affine is not None),
            acceptance, 1.0 - acceptance, units_cap,
        )  # fmt: skip
        (plan_kernel, constexprs), (write_kernel, write_constexprs) = launch_config(
            self.mode, self.proposal
        )
        grid = (self._programs(max(tiles, triton.cdiv(n, COPY))),)
        plan_kernel[grid](counters, self._plan, self._counts, *args, **LAUNCH_OPTIONS, **constexprs)
        if self.mode == "rejection":
            torch.cumsum(self._counts[:tiles], 0, out=self._ends[:tiles])
        write_kernel[(self._programs(tiles),)](
            counters, self._plan, self._ends, *args, **LAUNCH_OPTIONS, **write_constexprs
        )
