"""The 'cpp' sampler backend: the Philox stream of csrc/sampler.cpp on CPU tensors."""

from __future__ import annotations

from functools import cache

import torch

from ..backends import cpp_module
from .philox import PhiloxSource

__all__ = ["CppSource"]


@cache
def _module():
    # Looked up once: an import per call costs more than a small refill.
    return cpp_module("sampler")


def _affine_pointers(affine, offset: int) -> dict:
    """refill's and affine's keyword arguments for z = fma(sigma, eps, mu)
    (csrc/sampler.cpp), from element ``offset`` of mu, sigma and z on."""
    mu, sigma, z = affine
    size = z.element_size()
    return dict(
        mu_ptr=mu.data_ptr() + offset * size,
        sigma_ptr=sigma.data_ptr() + offset * size,
        z_ptr=z.data_ptr() + offset * size,
        affine_double=z.dtype == torch.float64,
    )


class CppSource(PhiloxSource):
    # rsample fuses z = mu + sigma * eps into the refill for these dtypes of mu, and
    # the same pass checks sigma (a ValueError after which the sampler rewinds).
    affine_dtypes = (torch.float32, torch.float64)
    checks_sigma = True

    def per_block(self) -> int:
        return _module().draws_per_block(self.mode, self.proposal)

    def _launch(self, n_blocks, out, need, buffer, affine=None, offset=0) -> int:
        # The accepted count comes back from C++ directly: no device to sync with.
        pointers = {} if affine is None else _affine_pointers(affine, offset)
        return _module().refill(
            self.mode, self.proposal, self.seed, self.block_offset, n_blocks,
            0 if out is None else out.data_ptr() + offset * 4, need, buffer.data_ptr(),
            buffer.numel(), torch.get_num_threads(), **pointers,
        )  # fmt: skip

    def affine(self, eps: torch.Tensor, affine, offset: int = 0) -> None:
        """z = fma(sigma, eps, mu) for draws already made (those served from the
        buffer), at elements [offset, offset + eps.numel()) of affine = (mu, sigma, z)."""
        _module().affine(eps.data_ptr(), eps.numel(), **_affine_pointers(affine, offset))
