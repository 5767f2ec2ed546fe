"""The uniform-prior transform (Eq. 9-10): encoder outputs to a support inside [-1, 1]."""

from __future__ import annotations

import torch

from .._checks import check_loc_scale

__all__ = ["uniform_prior_transform"]


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
    shape = check_loc_scale(mu, sigma, "uniform_prior_transform")
    if validate_args and not bool(((sigma > 0).all() & ~mu.isnan().any()).item()):
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
