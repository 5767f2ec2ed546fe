"""Bounded-support proposal distributions (Section 2.1, Eq. 7) as ``torch.distributions``.

A proposal with location mu and bandwidth sigma has density
q(z) = K((z - mu) / sigma) / sigma for a standard smoothing kernel K on
[-1, 1] (``smoothing.py``), so its support is [mu - sigma, mu + sigma]. One
class per kernel, each with the same members in the same order; their KL
divergences are registered by type pair in ``kl.py``.
"""

from __future__ import annotations

import math
from numbers import Number

import torch
from torch.distributions import Distribution, Normal, constraints
from torch.distributions.utils import broadcast_all

from .smoothing import PROPOSALS, SMOOTHING_KERNELS, SmoothingKernel, get_kernel

__all__ = [
    "PRIORS",
    "PROPOSAL_CLASSES",
    "CosineProposal",
    "EpanechnikovProposal",
    "GaussianProposal",
    "KernelProposal",
    "QuarticProposal",
    "TriangularProposal",
    "TricubeProposal",
    "TriweightProposal",
    "UniformProposal",
    "proposal",
]

# The priors the closed-form KL (kl.py) and the models support.
PRIORS: tuple[str, ...] = ("gaussian", "uniform")


def _standard_draws(name, shape, generator, device, dtype) -> torch.Tensor:
    # Imported here: the sampling package itself imports smoothing.py from this package.
    from ..sampling.sampler import sample_standard_kernel

    return sample_standard_kernel(name, shape, generator=generator, device=device, dtype=dtype)


class KernelProposal(Distribution):
    """q(z) = K((z - loc) / scale) / scale for a bounded standard kernel K (Eq. 7).

    Subclasses set the class attribute ``kernel``. Reparameterised sampling draws
    eps from K by rejection sampling and returns loc + scale * eps, so
    d z / d loc = 1 and d z / d scale = eps.

    Args:
        loc (float or Tensor): centre mu of the support.
        scale (float or Tensor): half-width sigma > 0 of the support.
    """

    kernel: SmoothingKernel  # set by each subclass
    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(self, loc, scale, validate_args: bool | None = None) -> None:
        if not getattr(type(self), "kernel", None):
            raise TypeError("KernelProposal is abstract; use proposal(name, loc, scale)")
        self.loc, self.scale = broadcast_all(loc, scale)
        if isinstance(loc, Number) and isinstance(scale, Number):
            batch_shape = torch.Size()
        else:
            batch_shape = self.loc.size()
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(KernelProposal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.loc - self.scale, self.loc + self.scale)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2) * self.kernel.variance

    @property
    def stddev(self) -> torch.Tensor:
        return self.scale * math.sqrt(self.kernel.variance)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        shape = self._extended_shape(sample_shape)
        eps = _standard_draws(self.kernel.name, shape, generator, self.loc.device, self.loc.dtype)
        return self.loc + self.scale * eps

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        # K is 0 outside [-1, 1], so log K = -inf there (and at the endpoints for every
        # kernel but the uniform one).
        return torch.log(self.kernel.pdf((value - self.loc) / self.scale)) - torch.log(self.scale)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self.kernel.cdf((value - self.loc) / self.scale)

    def entropy(self):
        return self.kernel.entropy + torch.log(self.scale)


class UniformProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["uniform"]


class TriangularProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["triangular"]


class EpanechnikovProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["epanechnikov"]


class QuarticProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["quartic"]


class TriweightProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["triweight"]


class TricubeProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["tricube"]


class CosineProposal(KernelProposal):
    kernel = SMOOTHING_KERNELS["cosine"]


class GaussianProposal(Normal):
    """The usual Gaussian proposal N(loc, scale^2), sampled like the kernel proposals.

    A ``Normal`` subclass, so torch's own KL registrations for ``Normal`` apply
    (to ``Normal``: closed form; to ``Uniform``: +inf, the supports never nest).
    """

    kernel = SMOOTHING_KERNELS["gaussian"]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussianProposal, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        shape = self._extended_shape(sample_shape)
        eps = _standard_draws("gaussian", shape, generator, self.loc.device, self.loc.dtype)
        return self.loc + self.scale * eps

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


PROPOSAL_CLASSES: dict[str, type[Distribution]] = {
    cls.kernel.name: cls
    for cls in (
        UniformProposal,
        TriangularProposal,
        EpanechnikovProposal,
        QuarticProposal,
        TriweightProposal,
        TricubeProposal,
        CosineProposal,
        GaussianProposal,
    )
}
assert tuple(PROPOSAL_CLASSES) == PROPOSALS


def proposal(name: str, loc, scale, *, validate_args: bool | None = None) -> Distribution:
    """The proposal distribution ``name`` (one of ``PROPOSALS``) with location and scale."""
    get_kernel(name)  # TypeError / ValueError for a bad name
    return PROPOSAL_CLASSES[name](loc, scale, validate_args=validate_args)
