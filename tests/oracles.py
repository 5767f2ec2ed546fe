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
