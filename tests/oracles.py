"""Independent oracles shared by the test modules (one copy of each).

The sampler's distribution check: a draw must pass a Kolmogorov-Smirnov test
against the smoothing kernel's CDF, have its mean and variance within
``SE_BOUND`` standard errors (the variance's standard error from the exact
fourth moment, by quadrature), and stay inside [-1, 1] for bounded kernels.
"""

import math
from functools import cache

import numpy as np
import torch
from scipy import integrate, stats

from ddvae_fast.distributions.smoothing import SMOOTHING_KERNELS

KS_P = 1e-3
SE_BOUND = 5.0  # moments within 5 standard errors: a 6e-7 two-sided chance per check


def pdf64(name, x):
    return SMOOTHING_KERNELS[name].pdf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def kernel_cdf(name):
    return lambda x: (
        SMOOTHING_KERNELS[name].cdf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
    )


@cache
def fourth_moment(name):
    if name == "gaussian":
        return 3.0
    return integrate.quad(lambda x: x**4 * float(pdf64(name, x)), -1, 1)[0]


def check_distribution(name, x):
    x = x.double().cpu().reshape(-1).numpy()
    n = x.size
    kernel = SMOOTHING_KERNELS[name]
    assert stats.kstest(x, kernel_cdf(name)).pvalue > KS_P
    var = kernel.variance
    assert abs(x.mean()) < SE_BOUND * math.sqrt(var / n)
    se_var = math.sqrt((fourth_moment(name) - var**2) / n)
    assert abs(x.var() - var) < SE_BOUND * se_var
    if kernel.bounded:
        assert x.min() >= -1 and x.max() <= 1


def fma_oracle(sigma, eps, mu, positions):
    """mu + sigma * eps rounded once (to nearest, ties to even) to mu's dtype, float32
    or float64, at the flat ``positions``: exact rational arithmetic, then the nearest
    representable value (for float64 CPython's int / int division is correctly
    rounded; for float32 the nearest of the three float32 values around it). The
    reparametrised draw of RejectionSampler.rsample (fused path) must equal it.
    """
    from fractions import Fraction

    dtype = mu.dtype
    tiny = np.float32 if dtype == torch.float32 else np.float64
    flat = [t.detach().cpu().reshape(-1)[positions].double().tolist() for t in (sigma, eps, mu)]
    out = []
    for s, e, m in zip(*flat):
        exact = Fraction(s) * Fraction(e) + Fraction(m)
        guess = tiny(float(exact))
        if dtype == torch.float64:
            out.append(float(guess))
            continue
        candidates = [guess, np.nextafter(guess, tiny(-np.inf)), np.nextafter(guess, tiny(np.inf))]
        # nearest, and of two equally near the even one
        out.append(
            float(
                min(
                    candidates,
                    key=lambda c, x=exact: (abs(Fraction(float(c)) - x), int(c.view(np.int32)) & 1),
                )
            )
        )
    return torch.tensor(out, dtype=dtype)


# The relaxed arg-max loss (docs/loss_backend_contract.md)
def log_odds(tau):
    """c = log(1/tau - 1), without the cancellation of 1/tau - 1 near tau = 1."""
    return math.log1p(-tau) - math.log(tau)


def loss_oracle(logits, target, tau, prob_mode, ignore_index, aw, nw, scale):
    """The fused loss's outputs in float64, from the formulas with autograd.

    (argmax_rows, nll_rows, correct_rows, grad) for weights aw, nw and gradient
    scale ``scale``: the ground truth of the cpp and triton kernel tests.
    """
    x = logits.detach().to(torch.float64).clone().requires_grad_(True)
    num_rows, num_classes = x.shape
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    c = log_odds(tau)
    scores = torch.softmax(x, dim=1) if prob_mode else x
    z = (scores - scores.gather(1, t)) / tau + c
    softplus = torch.logaddexp(z, torch.zeros_like(z))  # -log sigma_tau(r_t - r_s)
    others = torch.arange(num_classes).unsqueeze(0) != t
    argmax_rows = torch.where(valid, torch.where(others, softplus, 0.0).sum(1), 0.0)
    # shifted by the (detached) row max, so that lse - l_t keeps its relative
    # accuracy when |logits| >> lse - l_t (the gradient is unchanged)
    shifted = x - x.detach().amax(1, keepdim=True) if num_rows else x
    nll_rows = torch.logsumexp(shifted, 1) - shifted.gather(1, t).squeeze(1)
    nll_rows = torch.where(valid, nll_rows, 0.0)
    total = aw * argmax_rows.sum() + nw * nll_rows.sum()
    (grad,) = torch.autograd.grad(total, x)
    xd = x.detach()
    rival = torch.where(others, xd, -math.inf).amax(1) if num_rows else xd.new_empty(0)
    correct = (xd.gather(1, t).squeeze(1) > rival) | ~valid
    return argmax_rows.detach(), nll_rows.detach(), correct, grad * scale
