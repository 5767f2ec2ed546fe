"""Closed-form KL divergences of the proposals against quadrature of int q log(q / p).

The defining integral is evaluated with scipy.integrate.quad over the proposal's
support, split at mu (the kink of the triangular and tricube kernels), in float64,
for Hypothesis-drawn proposal and prior parameters. The kernel densities used
here are checked against the paper's formulas in test_smoothing_kernels.py.
Quadrature warnings are errors, so quad must reach its requested accuracy.
"""

import math
import warnings

import pytest
import torch
import torch.distributions as D
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import integrate

from ddvae_fast import kl_divergence, proposal
from ddvae_fast.distributions.smoothing import KERNELS, PROPOSALS, get_kernel

pytestmark = pytest.mark.filterwarnings("error::scipy.integrate.IntegrationWarning")

# quad reaches ~1e-13 relative on these pieces; 1e-8 is the required accuracy of
# the closed forms and leaves margin for the cancellation in small KL values.
# The absolute 1e-12 only matters where the KL is ~0 (Gaussian vs equal Gaussian).
RTOL, ATOL = 1e-8, 1e-12
LOG_2PI = math.log(2 * math.pi)
F64 = torch.float64

mus = st.floats(-5, 5)
sigmas = st.floats(1e-3, 5)
prior_locs = st.floats(-3, 3)
prior_scales = st.floats(0.1, 10)


def log_q_fn(name, mu, sigma):
    """log of the proposal density q(z) = K((z - mu) / sigma) / sigma, float64."""
    kernel = get_kernel(name)

    def log_q(z):
        k = float(kernel.pdf(torch.tensor((z - mu) / sigma, dtype=F64)))
        return math.log(k) - math.log(sigma) if k > 0 else -math.inf

    return log_q


def quad_kl(name, mu, sigma, log_p):
    """int q(z) (log q(z) - log p(z)) dz by adaptive quadrature.

    Integrated in x = (z - mu) / sigma (dz = sigma dx), so that quad's nodes resolve
    narrow supports as well as wide ones, split at x = 0 (the kink of |x| kernels).
    """
    kernel = get_kernel(name)
    log_sigma = math.log(sigma)

    def integrand(x):  # q(z) dz = K(x) dx, log q(z) = log K(x) - log sigma
        k = float(kernel.pdf(torch.tensor(x, dtype=F64)))
        return 0.0 if k == 0 else k * (math.log(k) - log_sigma - log_p(mu + sigma * x))

    half = 1.0 if get_kernel(name).bounded else 40.0  # Gaussian mass beyond 40 sd: 0
    return sum(
        integrate.quad(integrand, a, b, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        for a, b in ((-half, 0.0), (0.0, half))
    )


def normal_log_pdf(m, s):
    return lambda z: -0.5 * ((z - m) / s) ** 2 - math.log(s) - 0.5 * LOG_2PI


def t64(x):
    return torch.tensor(x, dtype=F64)


def nested_support(a, width, f_low, f_high):
    """A proposal (mu, sigma) whose support [mu - sigma, mu + sigma] is inside [a, a + width]."""
    low = a + f_low * width
    high = low + f_high * (a + width - low)
    mu, sigma = (low + high) / 2, (high - low) / 2
    b = a + width
    assume(sigma > 1e-6 * width and a <= mu - sigma and mu + sigma <= b)
    return mu, sigma, b


# ---------------------------------------------------------------------------------------
# Normal prior
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=20, deadline=None)
@given(mu=mus, sigma=sigmas, m=prior_locs, s=prior_scales)
def test_registered_kl_to_general_normal_matches_quadrature(name, mu, sigma, m, s):
    expected = quad_kl(name, mu, sigma, normal_log_pdf(m, s))
    got = float(D.kl_divergence(proposal(name, t64(mu), t64(sigma)), D.Normal(t64(m), t64(s))))
    assert got == pytest.approx(expected, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=15, deadline=None)
@given(mu=mus, sigma=sigmas)
def test_kl_divergence_to_standard_normal_matches_quadrature(name, mu, sigma):
    expected = quad_kl(name, mu, sigma, normal_log_pdf(0.0, 1.0))
    got = float(kl_divergence(name, t64(mu), t64(sigma), prior="gaussian"))
    assert got == pytest.approx(expected, rel=RTOL, abs=ATOL)


# ---------------------------------------------------------------------------------------
# Uniform prior
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=20, deadline=None)
@given(
    a=st.floats(-5, 5),
    width=st.floats(1e-2, 10),
    f_low=st.floats(0, 0.99),
    f_high=st.floats(1e-3, 1),
)
def test_registered_kl_to_general_uniform_matches_quadrature(name, a, width, f_low, f_high):
    mu, sigma, b = nested_support(a, width, f_low, f_high)
    log_width = math.log(b - a)
    expected = quad_kl(name, mu, sigma, lambda z: -log_width)
    got = float(D.kl_divergence(proposal(name, t64(mu), t64(sigma)), D.Uniform(t64(a), t64(b))))
    assert got == pytest.approx(expected, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=15, deadline=None)
@given(f_low=st.floats(0, 0.99), f_high=st.floats(1e-3, 1))
def test_kl_divergence_to_standard_uniform_matches_quadrature(name, f_low, f_high):
    mu, sigma, _ = nested_support(-1.0, 2.0, f_low, f_high)
    expected = quad_kl(name, mu, sigma, lambda z: -math.log(2.0))
    got = float(kl_divergence(name, t64(mu), t64(sigma), prior="uniform"))
    assert got == pytest.approx(expected, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=15, deadline=None)
@given(
    a=st.floats(-5, 5),
    width=st.floats(1e-2, 10),
    centre=st.floats(-1, 2),
    overhang=st.floats(1e-3, 3),
    right=st.booleans(),
)
def test_kl_is_inf_when_supports_do_not_nest(name, a, width, centre, overhang, right):
    b = a + width
    # Support sticking out of [a, b] by `overhang` on one side.
    if right:
        high = b + overhang
        low = min(high - 1e-3, a + centre * width)
        edge_lo, edge_hi = b, high
    else:
        low = a - overhang
        high = max(low + 1e-3, a + centre * width)
        edge_lo, edge_hi = low, a
    mu, sigma = (low + high) / 2, (high - low) / 2
    log_q = log_q_fn(name, mu, sigma)
    outside = integrate.quad(
        lambda z: math.exp(log_q(z)) if log_q(z) > -math.inf else 0.0,
        max(edge_lo, mu - sigma),
        min(edge_hi, mu + sigma),
    )[0]
    assert outside > 0  # q puts mass where p = 0: the defining integral is +inf
    q = proposal(name, t64(mu), t64(sigma))
    assert float(D.kl_divergence(q, D.Uniform(t64(a), t64(b)))) == math.inf
    if a == -1.0 and b == 1.0:
        assert float(kl_divergence(name, t64(mu), t64(sigma), prior="uniform")) == math.inf


def test_kl_divergence_uniform_prior_inf_only_outside():
    mu = t64([0.0, 0.5, 0.9, -0.9, 0.0, 1.5])
    sigma = t64([1.0, 0.5, 0.2, 0.1, 1.0 + 1e-12, 0.1])
    for name in KERNELS:
        kl = kl_divergence(name, mu, sigma, prior="uniform")
        assert torch.isfinite(kl[[0, 1, 3]]).all(), name  # touching the boundary is nested
        assert torch.isinf(kl[[2, 4, 5]]).all() and (kl[[2, 4, 5]] > 0).all(), name


def test_gaussian_proposal_against_uniform_prior_is_inf():
    mu, sigma = t64([0.0, 0.3]), t64([1e-3, 0.5])
    assert torch.isinf(kl_divergence("gaussian", mu, sigma, prior="uniform")).all()
    q = proposal("gaussian", mu, sigma)
    assert torch.isinf(D.kl_divergence(q, D.Uniform(t64(-5.0), t64(5.0)))).all()


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=30, deadline=None)
@given(
    mu=st.lists(st.floats(-50, 50), min_size=1, max_size=8),
    log_sigma=st.lists(st.floats(-12, 4), min_size=1, max_size=8),
    m=prior_locs,
    s=prior_scales,
)
def test_kl_is_nonnegative(name, mu, log_sigma, m, s):
    n = min(len(mu), len(log_sigma))
    mu, sigma = t64(mu[:n]), t64(log_sigma[:n]).exp()
    kl = D.kl_divergence(proposal(name, mu, sigma), D.Normal(t64(m), t64(s)))
    # Gaussian vs an equal Gaussian is 0 up to rounding of O(1) terms.
    assert (kl >= -1e-13).all()
    kl_u = kl_divergence(name, mu.clamp(-0.5, 0.5), sigma.clamp(max=0.5), prior="uniform")
    assert (kl_u >= 0).all()


@pytest.mark.parametrize("name", PROPOSALS)
@pytest.mark.parametrize("prior", ["gaussian", "uniform"])
def test_kl_divergence_gradcheck(name, prior):
    gen = torch.Generator().manual_seed(0)
    mu = (torch.rand(2, 3, generator=gen, dtype=F64) - 0.5).requires_grad_()
    sigma = (0.05 + 0.4 * torch.rand(3, generator=gen, dtype=F64)).requires_grad_()
    if prior == "uniform" and name == "gaussian":
        kl = kl_divergence(name, mu, sigma, prior)
        assert torch.isinf(kl).all()
        kl.sum().backward()  # differentiable, zero gradient where KL is +inf
        assert (mu.grad == 0).all() and (sigma.grad == 0).all()
        return
    assert torch.autograd.gradcheck(lambda a, b: kl_divergence(name, a, b, prior), (mu, sigma))


@pytest.mark.parametrize("name", KERNELS)
def test_uniform_kl_gradient_is_zero_where_infinite(name):
    mu = t64([0.0, 0.95]).requires_grad_()
    sigma = t64([0.5, 0.1]).requires_grad_()
    kl = kl_divergence(name, mu, sigma, prior="uniform")
    assert math.isfinite(kl[0].item()) and kl[1].item() == math.inf
    kl.sum().backward()
    assert mu.grad[1] == 0 and sigma.grad[1] == 0
    assert sigma.grad[0].item() == pytest.approx(-1 / 0.5, rel=1e-15)  # d/dsigma of -log sigma


@pytest.mark.parametrize("name", PROPOSALS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_divergence_is_elementwise_and_matches_registered_kl(name, dtype):
    gen = torch.Generator().manual_seed(1)
    mu = torch.rand(4, 1, 3, generator=gen, dtype=dtype) - 0.5
    sigma = 0.05 + 0.4 * torch.rand(5, 1, generator=gen, dtype=dtype)
    q = proposal(name, *torch.broadcast_tensors(mu, sigma))
    zero, one = torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    # float32: closed forms of O(1) terms, a few ulps of float32.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-14)
    kl_n = kl_divergence(name, mu, sigma, prior="gaussian")
    assert kl_n.shape == (4, 5, 3) and kl_n.dtype == dtype
    torch.testing.assert_close(kl_n, D.kl_divergence(q, D.Normal(zero, one)), **tol)
    kl_u = kl_divergence(name, mu, sigma, prior="uniform")
    assert kl_u.shape == (4, 5, 3) and kl_u.dtype == dtype
    torch.testing.assert_close(kl_u, D.kl_divergence(q, D.Uniform(-one, one)), **tol)


def test_torch_registrations_still_work_and_dispatch_is_unambiguous():
    n1, n2 = D.Normal(t64(0.3), t64(0.7)), D.Normal(t64(-1.0), t64(2.0))
    expected = math.log(2.0 / 0.7) + (0.7**2 + 1.3**2) / (2 * 4.0) - 0.5
    assert float(D.kl_divergence(n1, n2)) == pytest.approx(expected, rel=1e-14)
    assert float(D.kl_divergence(n1, D.Uniform(-1.0, 1.0))) == math.inf
    u1, u2 = D.Uniform(t64(0.0), t64(1.0)), D.Uniform(t64(-1.0), t64(3.0))
    assert float(D.kl_divergence(u1, u2)) == pytest.approx(math.log(4.0), rel=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ambiguous dispatch emits a RuntimeWarning
        for name in PROPOSALS:
            q = proposal(name, t64(0.1), t64(0.2))
            assert math.isfinite(float(D.kl_divergence(q, n2)))
            D.kl_divergence(q, u2)
    # The Gaussian proposal goes through torch's own Normal-Normal closed form.
    g = proposal("gaussian", t64(0.3), t64(0.7))
    assert float(D.kl_divergence(g, n2)) == pytest.approx(expected, rel=1e-14)
    assert float(kl_divergence("gaussian", t64(0.3), t64(0.7))) == pytest.approx(
        float(D.kl_divergence(g, D.Normal(t64(0.0), t64(1.0)))), rel=1e-14
    )


@settings(max_examples=20, deadline=None)
@given(mu=st.floats(-3, 3), sigma=st.floats(1e-2, 3))
def test_bounded_kl_to_normal_exceeds_gaussian_by_entropy_gap(mu, sigma):
    # For equal variance the Gaussian has the largest entropy, so any bounded
    # proposal with the same mean and variance has a larger KL to N(0, 1).
    for name in KERNELS:
        var = get_kernel(name).variance
        kl_k = float(kl_divergence(name, t64(mu), t64(sigma)))
        kl_g = float(kl_divergence("gaussian", t64(mu), t64(sigma * math.sqrt(var))))
        assert kl_k > kl_g
