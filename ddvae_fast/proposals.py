"""Bounded-support proposal distributions, their KL divergences, the uniform-prior transform.

Section 2.1 of the paper. A proposal with location mu and bandwidth sigma has density
q(z) = K((z - mu) / sigma) / sigma (Eq. 7) for a standard kernel K on [-1, 1]
(``smoothing_kernels.py``), so its support is [mu - sigma, mu + sigma]. With
H(K) the kernel's entropy and Var(K) its variance, the KL divergences to a normal
and to a uniform prior have closed forms (Tables 1-2, rederived; see
shared/paper/NOTES.md for why the paper's constants are not copied):

    KL(q || N(m, s)) = ((mu - m)^2 + sigma^2 Var(K)) / (2 s^2) + log s + log(2 pi)/2
                       - H(K) - log sigma
    KL(q || U[a, b]) = log(b - a) - H(K) - log sigma   if [mu - sigma, mu + sigma] lies in [a, b]
                       +inf                             otherwise

Everything here is plain PyTorch (the reference implementation): the proposals are
``torch.distributions.Distribution`` subclasses whose KL to ``Normal`` and
``Uniform`` is registered with ``torch.distributions.kl.register_kl``;
``kl_divergence`` is the elementwise closed form the training loss calls;
``uniform_prior_transform`` is Eq. 9-10, computed so that it neither saturates
nor overflows; ``rejection_candidates`` / ``sample_standard_kernel`` are the
paper's rejection sampler, also used by the RejectionSampler reference backend.
"""
from __future__ import annotations

import math
from numbers import Number

import torch
from torch.distributions import Distribution, Normal, Uniform, constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

from .smoothing_kernels import KERNELS, PROPOSALS, SMOOTHING_KERNELS, SmoothingKernel, get_kernel

__all__ = [
    "KernelProposal",
    "UniformProposal",
    "TriangularProposal",
    "EpanechnikovProposal",
    "QuarticProposal",
    "TriweightProposal",
    "TricubeProposal",
    "CosineProposal",
    "GaussianProposal",
    "PROPOSAL_CLASSES",
    "PRIORS",
    "proposal",
    "kl_divergence",
    "uniform_prior_transform",
    "rejection_candidates",
    "sample_standard_kernel",
]

PRIORS: tuple[str, ...] = ("gaussian", "uniform")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


# ----------------------------------------------------------------------------------------
# Sampling from the standard kernel
# ----------------------------------------------------------------------------------------
def _bounded_kernel(name: str) -> SmoothingKernel:
    kernel = get_kernel(name)
    if not kernel.bounded:
        raise ValueError(
            f"rejection sampling needs a bounded kernel, one of {KERNELS}; got {name!r}"
        )
    return kernel


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Candidates are drawn in float64 for float64 output and in float32 otherwise.

    float16/bfloat16 are too coarse to evaluate the acceptance test; the accepted
    values are cast afterwards, which keeps them inside [-1, 1] (|u| <= 1 rounds to
    |u| <= 1).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    1 / (2 K(0)). Returns the accepted u, in candidate order, as a 1-D tensor.
    The boolean selection synchronises with the host (its length is data-dependent).
    """
    kernel = _bounded_kernel(name)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int):
        raise TypeError(f"n_candidates must be an int, got {type(n_candidates).__name__}")
    if n_candidates < 0:
        raise ValueError(f"n_candidates must be >= 0, got {n_candidates}")
    work = _draw_dtype(dtype)
    u = torch.rand(n_candidates, generator=generator, device=device, dtype=work) * 2 - 1
    v = torch.rand(n_candidates, generator=generator, device=device, dtype=work)
    accepted = u[kernel.pdf(u) > kernel.k0 * v]
    return accepted.to(dtype)


def _shape_tuple(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = torch.Size(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    return tuple(shape)


def sample_standard_kernel(
    name: str,
    shape,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draws of shape ``shape`` from the standard kernel ``name`` (support [-1, 1]).

    Bounded kernels: repeated rounds of ``rejection_candidates`` until enough draws
    are accepted (each round asks for 2 K(0) times the missing count, the paper's
    N * 2K(0), plus a few standard deviations of slack so that one round usually
    suffices); surplus draws are discarded. 'gaussian': ``torch.randn``.
    """
    kernel = get_kernel(name)
    shape = _shape_tuple(shape)
    work = _draw_dtype(dtype)
    if not kernel.bounded:
        return torch.randn(shape, generator=generator, device=device, dtype=work).to(dtype)
    needed = math.prod(shape)
    draws: list[torch.Tensor] = []
    have = 0
    while have < needed:
        missing = needed - have
        n_candidates = math.ceil((missing + 3 * math.sqrt(missing) + 4) * 2 * kernel.k0)
        accepted = rejection_candidates(
            name, n_candidates, generator=generator, device=device, dtype=dtype
        )
        draws.append(accepted)
        have += accepted.numel()
    if not draws:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.cat(draws)[:needed].reshape(shape)


# ----------------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------------
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
        eps = sample_standard_kernel(
            self.kernel.name, shape, generator=generator,
            device=self.loc.device, dtype=self.loc.dtype,
        )
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
        eps = sample_standard_kernel(
            "gaussian", shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype
        )
        return self.loc + self.scale * eps

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None):
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)


PROPOSAL_CLASSES: dict[str, type[Distribution]] = {
    cls.kernel.name: cls
    for cls in (
        UniformProposal, TriangularProposal, EpanechnikovProposal, QuarticProposal,
        TriweightProposal, TricubeProposal, CosineProposal, GaussianProposal,
    )
}
assert tuple(PROPOSAL_CLASSES) == PROPOSALS


def proposal(name: str, loc, scale, *, validate_args: bool | None = None) -> Distribution:
    """The proposal distribution ``name`` (one of ``PROPOSALS``) with location and scale."""
    get_kernel(name)  # TypeError / ValueError for a bad name
    return PROPOSAL_CLASSES[name](loc, scale, validate_args=validate_args)


# ----------------------------------------------------------------------------------------
# KL divergences (one closed form each, shared by register_kl and kl_divergence)
# ----------------------------------------------------------------------------------------
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
    kernel = cls.kernel

    @register_kl(cls, Normal)
    def _kl_kernel_normal(p, q):
        return _kl_to_normal(kernel, p.loc, p.scale, q.loc, q.scale)

    @register_kl(cls, Uniform)
    def _kl_kernel_uniform(p, q):
        return _kl_to_uniform(
            kernel, p.loc, p.scale, q.low, q.high, torch.log(q.high - q.low)
        )


# Registered per concrete class so dispatch never has to arbitrate between bases.
# GaussianProposal uses torch's (Normal, Normal) and (Normal, Uniform) registrations.
for _cls in PROPOSAL_CLASSES.values():
    if issubclass(_cls, KernelProposal):
        _register(_cls)
del _cls


def _check_loc_scale(mu, sigma, what: str) -> torch.Size:
    for arg, label in ((mu, "mu"), (sigma, "sigma")):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"{what}: {label} must be a torch.Tensor, got {type(arg).__name__}")
        if not arg.is_floating_point():
            raise TypeError(f"{what}: {label} must be a floating-point tensor, got {arg.dtype}")
    if mu.dtype != sigma.dtype:
        raise TypeError(f"{what}: mu and sigma must share a dtype, got {mu.dtype} and {sigma.dtype}")
    if mu.device != sigma.device:
        raise ValueError(f"{what}: mu and sigma are on different devices ({mu.device}, {sigma.device})")
    try:
        return torch.broadcast_shapes(mu.shape, sigma.shape)
    except RuntimeError:
        raise ValueError(
            f"{what}: shapes of mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not broadcast"
        ) from None


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
    is NaN. That last check reads one boolean back to the host (a device sync);
    ``validate_args=False`` skips it.
    """
    kernel = get_kernel(proposal)
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")
    _check_loc_scale(mu, sigma, "kl_divergence")
    if validate_args and not bool(((sigma > 0).all() & ~mu.isnan().any()).item()):
        raise ValueError("kl_divergence: sigma must be > 0 and mu, sigma must not be NaN")
    if prior == "gaussian":
        return _kl_to_normal(kernel, mu, sigma, 0.0, 1.0)
    return _kl_to_uniform(kernel, mu, sigma, -1.0, 1.0, _LOG_2)


# ----------------------------------------------------------------------------------------
# Uniform-prior transform (Eq. 9-10)
# ----------------------------------------------------------------------------------------
def uniform_prior_transform(
    mu: torch.Tensor, sigma: torch.Tensor, *, validate_args: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map encoder outputs (mu, sigma > 0) to (mu', sigma') with support inside [-1, 1].

    Eq. 9-10: mu' = (tanh(mu + sigma) + tanh(mu - sigma)) / 2 and
    sigma' = (tanh(mu + sigma) - tanh(mu - sigma)) / 2, i.e. the support
    [mu - sigma, mu + sigma] pushed through tanh. Written directly, tanh saturates
    (to 1 in float32 for |x| > ~9) and sigma' becomes 0 (infinite KL). Here the
    equivalent forms
        mu'    = sinh(2 mu)    / (cosh(2 mu) + cosh(2 sigma))
        sigma' = sinh(2 sigma) / (cosh(2 mu) + cosh(2 sigma))
    are evaluated with numerator and denominator scaled by 2 exp(-M),
    M = max(2|mu|, 2 sigma), so every exponential is exp(<= 0) (no overflow), the
    denominator lies in [1, 4] (no cancellation) and the numerators use expm1
    (accurate for small arguments); the result is within a few ulps of the exact
    value times its condition number (about 1 + 2|mu| + 2 sigma). Where rounding
    would still put fl(|mu'| + sigma') above 1, sigma' is set to 1 - |mu'| (exact
    there), so fl(mu' - sigma') >= -1 and fl(mu' + sigma') <= 1 always hold, which
    is exactly what ``kl_divergence(..., prior='uniform')`` checks.

    Where the exact sigma' is below the dtype's smallest normal number ``tiny``
    (float32: |mu| beyond roughly 40), sigma' is ``tiny`` rather than 0, so
    the KL stays finite (-log tiny ~ 87 per dimension in float32) instead of
    stopping training; the gradient through those entries is zero.

    The authors' code uses sigmoids: left = sigmoid(m - s), right = sigmoid(m + s),
    mu' = left + right - 1, sigma' = right - left. Since 2 sigmoid(2x) - 1 = tanh(x)
    that is this transform applied to (m / 2, s / 2).

    ``sigma`` must be > 0 (the encoder predicts log sigma; the caller
    exponentiates); neither may be NaN. Infinite inputs take their limits
    (sigma = inf: (0, 1); mu = +-inf: (+-1, tiny)), so an overflowed exp(log sigma)
    does not stop training. Checking the inputs reads one boolean back to the host;
    ``validate_args=False`` skips it.
    """
    shape = _check_loc_scale(mu, sigma, "uniform_prior_transform")
    if validate_args and not bool(
        ((sigma > 0).all() & ~mu.isnan().any()).item()
    ):
        raise ValueError("uniform_prior_transform: sigma must be > 0 and mu, sigma must not be NaN")
    finfo = torch.finfo(mu.dtype)
    # Clamp to max/8 so that 2|mu|, 2 sigma and the sums below stay finite;
    # infinite inputs then take their limits.
    big = finfo.max / 8
    mu = mu.clamp(-big, big).expand(shape)
    sigma = sigma.clamp(max=big).expand(shape)
    # sign with sign(0) = +1, a constant: |2 mu| = 2 mu * s keeps d/dmu exact at mu = 0.
    s = torch.where(mu >= 0, 1.0, -1.0).to(mu.dtype)
    x = 2 * mu * s  # 2 |mu|
    y = 2 * sigma
    # The scale factor exp(-m) cancels between numerator and denominator, so m needs
    # no gradient (detaching also avoids torch.maximum's tie handling).
    m = torch.maximum(x, y).detach()
    ex, ey = torch.exp(x - m), torch.exp(y - m)
    denominator = ex + torch.exp(-x - m) + ey + torch.exp(-y - m)
    mu_t = s * (-torch.expm1(-2 * x)) * ex / denominator
    sigma_t = (-torch.expm1(-2 * y)) * ey / denominator
    # Rounding guard. Where it fires, |mu'| >= 1/2 (so 1 - |mu'| is exact and the sum
    # is exactly 1) or the sum rounds back to <= 1; see tests/test_proposals.py.
    abs_mu_t = mu_t * s
    sigma_t = torch.where(abs_mu_t + sigma_t > 1, 1 - abs_mu_t, sigma_t)
    # Underflow floor. tiny is below half an ulp of every number in [1/2, 1], so
    # fl(|mu'| + tiny) <= 1 still holds.
    return mu_t, sigma_t.clamp(min=finfo.tiny)
