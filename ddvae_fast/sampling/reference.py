"""The 'reference' sampler backend: plain PyTorch draws from a ``torch.Generator``.

The oracle the Philox backends are tested against (in distribution, not bit
for bit: the streams differ). RNG state = the generator's state.

The generator is a CPU one wherever the draws live, and draws are copied to the
sampler's device: the stream does not depend on the device, so moving a
sampler (``RejectionSampler.to``) carries it over exactly, and a state saved on
one device resumes on another.

Per-rank streams: rank r of seed s seeds its generator with ``stream_seed(s, r)``.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_int
from ..distributions.smoothing import bounded_kernel

__all__ = ["ReferenceSource", "rejection_candidates", "stream_seed", "transform_draws"]


def rejection_candidates(
    name: str,
    n_candidates: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One round of the paper's rejection sampler for the standard kernel ``name``.

    Draws ``n_candidates`` pairs u ~ U[-1, 1], v ~ U[0, 1] (u first, then v, from
    ``generator`` or torch's global RNG) and keeps u where K(u) > K(0) * v, i.e.
    candidates from the envelope K(0) * U[-1, 1]; the expected acceptance rate is
    1 / (2 K(0)). Returns the accepted u, in candidate order, as a 1-D tensor of
    ``dtype`` (float32 or float64). The boolean selection synchronises with the
    host (its length is data-dependent).
    """
    kernel = bounded_kernel(name)
    n_candidates = check_int(n_candidates, "n_candidates")
    if n_candidates < 0:
        raise ValueError(f"n_candidates must be >= 0, got {n_candidates}")
    u = torch.rand(n_candidates, generator=generator, device=device, dtype=dtype) * 2 - 1
    v = torch.rand(n_candidates, generator=generator, device=device, dtype=dtype)
    return u[kernel.pdf(u) > kernel.k0 * v]


def transform_draws(proposal: str, n: int, generator, device, dtype) -> torch.Tensor:
    """Exact inverse-transform (or order-statistic) samplers, plain PyTorch."""

    def rand(*size):
        return torch.rand(*size, generator=generator, device=device, dtype=dtype)

    if proposal == "uniform":
        return 2 * rand(n) - 1
    if proposal == "triangular":  # sum of two U[0, 1], shifted
        u = rand(2, n)
        return u[0] + u[1] - 1
    if proposal == "epanechnikov":  # Devroye's median-of-three: x2 if |x3| is the largest
        x = 2 * rand(3, n) - 1
        a = x.abs()
        third_largest = (a[2] >= a[1]) & (a[2] >= a[0])
        return torch.where(third_largest, x[1], x[2])
    if proposal == "cosine":  # inverse CDF of (1 + sin(pi x / 2)) / 2
        return (2 / math.pi) * torch.asin(2 * rand(n) - 1)
    raise ValueError(f"kernel {proposal!r} has no closed-form transform sampler")


_MASK32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit words with _fmix32(0) = 0."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def stream_seed(seed: int, rank: int) -> int:
    """The generator seed of rank ``rank`` of ``seed``: seed XOR (f(f(r)) << 32 | f(r)),
    f = ``_fmix32``.

    f is a bijection with f(0) = 0, so rank 0 keeps the seed (streams drawn before
    ranks existed are unchanged), and for one seed distinct ranks get distinct seeds
    in the low 32 bits, which are all that torch's CPU generator (mt19937) uses,
    as well as in all 64. The mixing keeps nearby (seed, rank) pairs apart:
    (s, 1) is not (s + 1, 0). Distinct mt19937 seeds give streams that are not
    provably disjoint, but an overlap within 2^64 draws has probability ~2^-19800
    (period 2^19937 - 1).
    """
    low = _fmix32(rank & _MASK32)
    return seed ^ ((_fmix32(low) << 32) | low)


_OWN_GENERATOR = object()


class ReferenceSource:
    """Draw source of backend 'reference'.

    By default it owns a CPU generator seeded with ``stream_seed(seed, rank)``.
    ``sample_standard_kernel`` passes ``generator`` instead: that generator is
    used as it is, on its own device, and None means torch's global RNG of
    ``device``.
    """

    unit = 1

    def __init__(self, proposal, mode, device, seed, dtype, *, rank=0, generator=_OWN_GENERATOR):
        self.proposal, self.mode, self.device = proposal, mode, device
        self.work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if generator is _OWN_GENERATOR:
            generator = torch.Generator()
            generator.manual_seed(stream_seed(seed, rank))
        elif rank:
            raise ValueError("rank applies to the sampler's own generator, not a caller's one")
        self.generator = generator
        self._draw_device = device if generator is None else generator.device

    def _draw(self, n_units: int) -> torch.Tensor:
        args = (self.generator, self._draw_device, self.work_dtype)
        if self.mode == "rejection":
            return rejection_candidates(
                self.proposal, n_units, generator=args[0], device=args[1], dtype=args[2]
            )
        if self.mode == "gaussian":
            return torch.randn(n_units, generator=args[0], device=args[1], dtype=args[2])
        return transform_draws(self.proposal, n_units, *args)

    def refill(self, n_units: int, out: torch.Tensor, need: int, buffer: torch.Tensor) -> int:
        draws = self._draw(n_units)
        kept = draws.numel()
        served = min(kept, need)
        out[:served].copy_(draws[:served])
        if kept > need:
            buffer[: kept - need].copy_(draws[need:])
        return kept

    def state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        """Checks the generator state on a scratch generator, then applies it."""
        value = state["generator_state"]
        try:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"a {type(value).__name__}")
            torch.Generator(device=self.generator.device).set_state(value)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"state['generator_state'] is not a state of a {self.generator.device.type} "
                f"torch.Generator: {exc}"
            ) from None
        self.generator.set_state(value)
