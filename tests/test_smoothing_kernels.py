"""The standard kernels of smoothing_kernels.py against independent computations.

Densities are compared with the formulas of the paper's Table 1 (column q, with
mu = 0, sigma = 1) written out again here in NumPy; every derived constant (mass,
K(0), variance, entropy, CDF) is checked by scipy quadrature of the density, and
the closed forms against the numbers in shared/paper/NOTES.md. All float64.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import xlogy

from ddvae_fast.distributions.smoothing import KERNELS, PROPOSALS, SMOOTHING_KERNELS, get_kernel

# Table 1 of the paper, density column at mu = 0, sigma = 1 (zero outside [-1, 1]).
TABLE1_DENSITY = {
    "uniform": lambda x: 0.5 * np.ones_like(x),
    "triangular": lambda x: 1 - np.abs(x),
    "epanechnikov": lambda x: 0.75 * (1 - x**2),
    "quartic": lambda x: 15 / 16 * (1 - x**2) ** 2,
    "triweight": lambda x: 35 / 32 * (1 - x**2) ** 3,
    "tricube": lambda x: 70 / 81 * (1 - np.abs(x) ** 3) ** 3,
    "cosine": lambda x: math.pi / 4 * np.cos(math.pi * x / 2),
    "gaussian": lambda x: np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi),
}

# shared/paper/NOTES.md: Var(K)/2 and -H(K) (quadrature-checked to 1e-6 there),
# and the acceptance rate 1/(2 K(0)).
NOTES_HALF_VARIANCE = {
    "uniform": 1 / 6,
    "triangular": 1 / 12,
    "epanechnikov": 1 / 10,
    "quartic": 1 / 14,
    "triweight": 1 / 18,
    "tricube": 35 / 486,
    "cosine": 1 / 2 - 4 / math.pi**2,
}
NOTES_NEG_ENTROPY = {
    "uniform": -math.log(2),
    "triangular": -1 / 2,
    "epanechnikov": -5 / 3 + math.log(3),
    "quartic": -47 / 15 + math.log(15),
    "triweight": -319 / 70 + math.log(70),
    "tricube": math.pi * math.sqrt(3) / 2 - 1111 / 140 + math.log(70 * math.sqrt(3)),
    "cosine": -1 + math.log(math.pi / 2),
}
NOTES_ACCEPTANCE = {
    "uniform": 1.0,
    "triangular": 0.5,
    "epanechnikov": 2 / 3,
    "quartic": 8 / 15,
    "triweight": 16 / 35,
    "tricube": 81 / 140,
    "cosine": 2 / math.pi,
}

# quad on these smooth pieces reaches ~1e-15 absolute; 1e-12 leaves room for the
# rounding of the closed forms. The entropy integrand has log-type endpoint
# behaviour, hence its looser 1e-10.
QUAD_TOL = 1e-12
ENTROPY_TOL = 1e-10


def pdf64(name):
    """The library's pdf as a float -> float function (float64)."""
    kernel = get_kernel(name)
    return lambda x: float(kernel.pdf(torch.tensor(x, dtype=torch.float64)))


def integrate_kernel(name, f):
    """int f(x) dx over the kernel's support, split at 0 (kink of |x| kernels)."""
    if SMOOTHING_KERNELS[name].bounded:
        pieces = [(-1.0, 0.0), (0.0, 1.0)]
    else:
        pieces = [(-np.inf, 0.0), (0.0, np.inf)]
    total = 0.0
    for a, b in pieces:
        value, _ = integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)
        total += value
    return total


def test_registry_lists_the_eight_proposals():
    assert PROPOSALS == (
        "uniform",
        "triangular",
        "epanechnikov",
        "quartic",
        "triweight",
        "tricube",
        "cosine",
        "gaussian",
    )
    assert PROPOSALS[:-1] == KERNELS
    assert all(SMOOTHING_KERNELS[n].bounded for n in KERNELS)
    assert not SMOOTHING_KERNELS["gaussian"].bounded


@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=25, deadline=None)
@given(x=st.lists(st.floats(-3, 3), min_size=1, max_size=20))
def test_pdf_matches_table1_density(name, x):
    x = np.asarray(x, dtype=np.float64)
    expected = TABLE1_DENSITY[name](x)
    if SMOOTHING_KERNELS[name].bounded:
        expected = np.where(np.abs(x) <= 1, expected, 0.0)
    got = get_kernel(name).pdf(torch.from_numpy(x)).numpy()
    # Same polynomial evaluated in a different order: a few ulps of a value <= 1.1.
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-15)
    assert np.all(got >= 0)
    np.testing.assert_array_equal(got, get_kernel(name).pdf(torch.from_numpy(-x)).numpy())


@pytest.mark.parametrize("name", PROPOSALS)
def test_pdf_integrates_to_one(name):
    assert integrate_kernel(name, pdf64(name)) == pytest.approx(1.0, abs=QUAD_TOL)


@pytest.mark.parametrize("name", PROPOSALS)
def test_k0_is_the_peak_density(name):
    kernel = get_kernel(name)
    assert kernel.k0 == pytest.approx(pdf64(name)(0.0), rel=1e-15)
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    assert float(kernel.pdf(grid).max()) <= kernel.k0 * (1 + 1e-15)


@pytest.mark.parametrize("name", PROPOSALS)
def test_variance_by_quadrature(name):
    pdf = pdf64(name)
    mean = integrate_kernel(name, lambda x: x * pdf(x))
    second = integrate_kernel(name, lambda x: x * x * pdf(x))
    assert mean == pytest.approx(0.0, abs=QUAD_TOL)
    assert SMOOTHING_KERNELS[name].variance == pytest.approx(second, rel=QUAD_TOL)


@pytest.mark.parametrize("name", PROPOSALS)
def test_entropy_by_quadrature(name):
    pdf = pdf64(name)
    entropy = integrate_kernel(name, lambda x: -xlogy(pdf(x), pdf(x)))
    assert SMOOTHING_KERNELS[name].entropy == pytest.approx(entropy, rel=ENTROPY_TOL)


@pytest.mark.parametrize("name", KERNELS)
def test_closed_forms_match_notes(name):
    kernel = SMOOTHING_KERNELS[name]
    assert kernel.variance / 2 == pytest.approx(NOTES_HALF_VARIANCE[name], rel=1e-15)
    assert -kernel.entropy == pytest.approx(NOTES_NEG_ENTROPY[name], rel=1e-14)


@pytest.mark.parametrize("name", KERNELS)
def test_acceptance_rate_matches_notes(name):
    kernel = SMOOTHING_KERNELS[name]
    assert kernel.acceptance_rate == pytest.approx(NOTES_ACCEPTANCE[name], rel=1e-15)
    assert kernel.acceptance_rate == pytest.approx(1 / (2 * pdf64(name)(0.0)), rel=1e-15)


def test_gaussian_closed_forms():
    kernel = SMOOTHING_KERNELS["gaussian"]
    assert kernel.variance == 1.0
    assert kernel.entropy == pytest.approx(0.5 * math.log(2 * math.pi * math.e), rel=1e-15)
    assert kernel.acceptance_rate == 1.0  # no rejection: sampled with randn


@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=15, deadline=None)
@given(x=st.floats(-1.5, 1.5))
def test_cdf_is_the_integrated_pdf(name, x):
    kernel = get_kernel(name)
    pdf = pdf64(name)
    lower = -1.0 if kernel.bounded else -np.inf
    if x <= lower:
        expected = 0.0
    else:
        upper = min(x, 1.0) if kernel.bounded else x
        pieces = [(lower, min(upper, 0.0))] + ([(0.0, upper)] if upper > 0 else [])
        expected = sum(
            integrate.quad(pdf, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)[0] for a, b in pieces
        )
    got = float(kernel.cdf(torch.tensor(x, dtype=torch.float64)))
    assert got == pytest.approx(expected, abs=QUAD_TOL)


@pytest.mark.parametrize("name", KERNELS)
def test_cdf_endpoints_and_monotone(name):
    kernel = get_kernel(name)
    x = torch.linspace(-2, 2, 4001, dtype=torch.float64)
    c = kernel.cdf(x)
    assert torch.all(c[x <= -1] == 0) and torch.all(c[x >= 1] == 1)
    assert torch.all(torch.diff(c) >= 0)
    assert float(kernel.cdf(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(
        0.5, abs=1e-16
    )
