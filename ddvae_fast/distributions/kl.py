"""KL divergences of the proposals to the priors, in closed form (Tables 1-2, rederived).

With H(K) the kernel's entropy and Var(K) its variance:

    KL(q || N(m, s)) = ((mu - m)^2 + sigma^2 Var(K)) / (2 s^2) + log s + log(2 pi)/2
                       - H(K) - log sigma
    KL(q || U[a, b]) = log(b - a) - H(K) - log sigma   if [mu - sigma, mu + sigma] lies in [a, b]
                       +inf                             otherwise

Registered with ``torch.distributions.kl.register_kl`` per (proposal class,
prior class) pair as ``_kl_<proposal>_<prior>``; ``kl_divergence`` is the
elementwise form the training loss calls. ``GaussianProposal`` is a
``Normal`` and uses torch's own registrations.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal, Uniform
from torch.distributions.kl import register_kl

from .._checks import check_loc_scale
from .proposals import PRIORS, PROPOSAL_CLASSES, KernelProposal
from .smoothing import SmoothingKernel, get_kernel

__all__ = ["kl_divergence"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


def _log(x):
    return torch.log(x) if isinstance(x, torch.Tensor) else math.log(x)


def _kl_to_normal(kernel: SmoothingKernel, mu, sigma, prior_loc, prior_scale):
    """KL(K-proposal(mu, sigma) || N(prior_loc, prior_scale^2)), elementwise."""
    return (
        ((mu - prior_loc) ** 2 + sigma**2 * kernel.variance) / (2 * prior_scale**2)
        + _log(prior_scale)
        + (_HALF_LOG_2PI - kernel.entropy)
        - torch.log(sigma)
    )


def _kl_to_uniform(kernel: SmoothingKernel, mu, sigma, low, high, log_width):
    """KL(K-proposal(mu, sigma) || U[low, high]): finite only where the supports nest."""
    # The KL does not depend on mu where it is finite; the zero term keeps mu in the
    # graph (autograd.grad w.r.t. mu gives zeros, not an error) and the result at the
    # broadcast shape of mu and sigma.
    finite = log_width - kernel.entropy - torch.log(sigma) + 0 * mu
    if kernel.bounded:
        nested = (mu - sigma >= low) & (mu + sigma <= high)
    else:
        nested = torch.zeros_like(finite, dtype=torch.bool)
    # torch.where (not indexing) keeps the graph: zero gradient where KL is +inf.
    return torch.where(nested, finite, torch.full_like(finite, math.inf))


def _register(cls: type[KernelProposal]) -> None:
    """Register KL(cls || Normal) and KL(cls || Uniform) as _kl_<kernel>_normal / _uniform."""
    kernel = cls.kernel

    def kl_to_normal(p, q):
        return _kl_to_normal(kernel, p.loc, p.scale, q.loc, q.scale)

    def kl_to_uniform(p, q):
        return _kl_to_uniform(kernel, p.loc, p.scale, q.low, q.high, torch.log(q.high - q.low))

    for function, prior_cls in ((kl_to_normal, Normal), (kl_to_uniform, Uniform)):
        function.__name__ = function.__qualname__ = (
            f"_kl_{kernel.name}_{prior_cls.__name__.lower()}"
        )
        globals()[function.__name__] = register_kl(cls, prior_cls)(function)


# One registration per concrete (proposal, prior) pair, so dispatch never has to
# arbitrate between base classes.
for _cls in PROPOSAL_CLASSES.values():
    if issubclass(_cls, KernelProposal):
        _register(_cls)
del _cls


def kl_divergence(
    proposal: str,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    prior: str = "gaussian",
    *,
    validate_args: bool = True,
) -> torch.Tensor:
    """Elementwise KL(q(z | mu, sigma) || p(z)) for the proposal ``proposal``.

    ``prior='gaussian'`` is N(0, 1), ``prior='uniform'`` is U[-1, 1]. The result has
    the broadcast shape of ``mu`` and ``sigma`` and is not summed (sum over the
    latent dimensions for Eq. 8); it is differentiable in both. Where a proposal's
    support [mu - sigma, mu + sigma] is not inside [-1, 1] the KL to the uniform
    prior is +inf (with zero gradient), as it is everywhere for the Gaussian
    proposal; ``uniform_prior_transform`` produces parameters for which it is finite.

    Raises ValueError for an unknown proposal or prior, TypeError for non-tensor or
    non-floating inputs or mismatched dtypes, ValueError for mismatched devices or
    shapes that do not broadcast, and ValueError where sigma <= 0 or sigma or mu
    is not finite. That last check reads one boolean back to the host (a device sync);
    ``validate_args=False`` skips it.
    """
    kernel = get_kernel(proposal)
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")
    check_loc_scale(mu, sigma, "kl_divergence")
    if validate_args and not bool(
        ((sigma > 0).all() & mu.isfinite().all() & sigma.isfinite().all()).item()
    ):
        raise ValueError("kl_divergence: mu and sigma must be finite and sigma > 0")
    if prior == "gaussian":
        return _kl_to_normal(kernel, mu, sigma, 0.0, 1.0)
    return _kl_to_uniform(kernel, mu, sigma, -1.0, 1.0, _LOG_2)
