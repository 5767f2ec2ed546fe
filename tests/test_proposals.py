"""Proposal distributions, the rejection sampler and the uniform-prior transform.

Densities, CDFs and entropies are checked against the kernel formulas and by
quadrature (float64); samplers by the Kolmogorov-Smirnov test and by moments;
uniform_prior_transform against the tanh formula of Eq. 9-10 (float64, where
tanh does not saturate) and against a 200-digit mpmath evaluation of that same
formula everywhere else.
"""

import math

import mpmath
import pytest
import torch
import torch.distributions as D
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from ddvae_fast import kl_divergence, proposal, uniform_prior_transform
from ddvae_fast.distributions.proposals import (
    PROPOSAL_CLASSES,
    GaussianProposal,
    KernelProposal,
)
from ddvae_fast.distributions.smoothing import KERNELS, PROPOSALS, get_kernel
from ddvae_fast.sampling.reference import rejection_candidates
from ddvae_fast.sampling.sampler import sample_standard_kernel

pytestmark = pytest.mark.filterwarnings("error::scipy.integrate.IntegrationWarning")

F64 = torch.float64
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
locs = st.floats(-5, 5)
scales = st.floats(1e-2, 10)


def t64(x):
    return torch.tensor(x, dtype=F64)


def quad_over_support(name, loc, scale, f):
    """int f(z) dz over the proposal's support, integrated in x = (z - loc) / scale."""
    half = 1.0 if get_kernel(name).bounded else 40.0
    return sum(
        integrate.quad(
            lambda x: scale * f(loc + scale * x), a, b, epsabs=1e-14, epsrel=1e-13, limit=200
        )[0]
        for a, b in ((-half, 0.0), (0.0, half))
    )


# ---------------------------------------------------------------------------------------
# Construction and the Distribution interface
# ---------------------------------------------------------------------------------------
def test_one_class_per_proposal():
    assert tuple(PROPOSAL_CLASSES) == PROPOSALS
    for name, cls in PROPOSAL_CLASSES.items():
        q = proposal(name, 0.0, 1.0)
        assert type(q) is cls and q.kernel is get_kernel(name) and q.has_rsample
        assert issubclass(cls, KernelProposal) == (name in KERNELS)
        assert q.arg_constraints["scale"] is D.constraints.positive
    assert issubclass(GaussianProposal, D.Normal)
    assert proposal("cosine", 0.0, 1.0).batch_shape == torch.Size()
    with pytest.raises(TypeError, match="abstract"):
        KernelProposal(0.0, 1.0)


@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=20, deadline=None)
@given(loc=locs, scale=scales, x=st.lists(st.floats(-1.5, 1.5), min_size=1, max_size=10))
def test_log_prob_and_cdf_are_the_scaled_kernel(name, loc, scale, x):
    kernel = get_kernel(name)
    q = proposal(name, t64(loc), t64(scale), validate_args=False)
    xs = t64(x)
    z = loc + scale * xs
    u = (z - loc) / scale
    expected = torch.log(kernel.pdf(u) / scale)
    torch.testing.assert_close(q.log_prob(z), expected, rtol=1e-13, atol=1e-13)
    # The Gaussian proposal is torch's Normal, which standardises in its own order.
    torch.testing.assert_close(q.cdf(z), kernel.cdf(u), rtol=1e-15, atol=1e-16)
    if kernel.bounded:  # -inf outside the support, not an error, when unvalidated
        assert torch.all(q.log_prob(z)[u.abs() > 1] == -math.inf)


@pytest.mark.parametrize("name", PROPOSALS)
@settings(max_examples=8, deadline=None)
@given(loc=locs, scale=scales, x=st.floats(-1, 1))
def test_density_integrates_to_cdf_and_entropy(name, loc, scale, x):
    q = proposal(name, t64(loc), t64(scale))
    lp = lambda z: float(q.log_prob(t64(z)))  # noqa: E731
    density = lambda z: math.exp(lp(z))  # noqa: E731
    # quad's relative accuracy on these smooth pieces is ~1e-13; 1e-10 leaves margin.
    assert quad_over_support(name, loc, scale, density) == pytest.approx(1.0, abs=1e-10)
    entropy = quad_over_support(name, loc, scale, lambda z: -density(z) * lp(z))
    assert float(q.entropy()) == pytest.approx(entropy, rel=1e-10, abs=1e-10)
    if q.kernel.bounded:
        # CDF at loc + scale * x against the integrated density.
        cdf_q = integrate.quad(
            lambda v: scale * density(loc + scale * v),
            -1.0,
            x,
            points=[0.0] if x > 0 else None,
            epsabs=1e-14,
        )[0]
        assert float(q.cdf(t64(loc + scale * x))) == pytest.approx(cdf_q, abs=1e-10)


@pytest.mark.parametrize("name", PROPOSALS)
def test_mean_variance_match_sample_moments(name):
    n = 100_000
    gen = torch.Generator().manual_seed(11)
    loc, scale = t64([0.5, -2.0]), t64([0.2, 3.0])
    q = proposal(name, loc, scale)
    z = q.sample((n,), generator=gen)
    kv = get_kernel(name).variance
    torch.testing.assert_close(q.mean, loc, rtol=0, atol=0)
    torch.testing.assert_close(q.variance, scale**2 * kv, rtol=1e-15, atol=0)
    torch.testing.assert_close(q.stddev, scale * math.sqrt(kv), rtol=1e-15, atol=0)
    # 5 standard errors. For |eps| <= 1, E[eps^4] <= E[eps^2], so the variance's
    # standard error is at most scale^2 sqrt(Var(K) / n); Gaussian: E[eps^4] = 3.
    se_mean = scale * math.sqrt(kv / n)
    fourth = 3.0 if name == "gaussian" else kv
    se_var = scale**2 * math.sqrt(fourth / n)
    assert torch.all((z.mean(0) - loc).abs() < 5 * se_mean)
    assert torch.all((z.var(0) - q.variance).abs() < 5 * se_var)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROPOSALS)
def test_rsample_passes_ks_test(name):
    gen = torch.Generator().manual_seed(2024)
    q = proposal(name, t64(0.7), t64(2.5))
    z = q.rsample((20_000,), generator=gen).numpy()
    cdf = lambda v: q.cdf(torch.from_numpy(v)).numpy()  # noqa: E731
    # Fixed seed, so the outcome is deterministic; p > 1e-3 is a 0.1%-level test.
    assert stats.kstest(z, cdf).pvalue > 1e-3


def test_ks_test_has_power_against_a_neighbouring_kernel():
    gen = torch.Generator().manual_seed(2024)
    eps = sample_standard_kernel("triangular", 20_000, generator=gen, dtype=F64).numpy()
    wrong = get_kernel("epanechnikov")
    assert stats.kstest(eps, lambda v: wrong.cdf(torch.from_numpy(v)).numpy()).pvalue < 1e-6


@pytest.mark.parametrize("name", PROPOSALS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_draws_lie_in_the_support(name, dtype):
    gen = torch.Generator().manual_seed(5)
    eps = sample_standard_kernel(name, (50, 40), generator=gen, dtype=dtype)
    assert eps.shape == (50, 40) and eps.dtype == dtype and torch.isfinite(eps).all()
    if get_kernel(name).bounded:
        assert eps.abs().max() <= 1
        loc = torch.tensor([-3.0, 0.0, 40.0], dtype=dtype)
        scale = torch.tensor([1e-3, 1.0, 7.0], dtype=dtype)
        q = proposal(name, loc, scale)
        z = q.rsample((1000,), generator=gen)
        assert q.support.check(z).all()
        assert ((z >= loc - scale) & (z <= loc + scale)).all()


@pytest.mark.parametrize("name", PROPOSALS)
def test_rsample_is_loc_plus_scale_eps_and_differentiable(name):
    loc = t64([0.3, -1.0, 2.0]).requires_grad_()
    scale = t64([0.5, 2.0, 1e-2]).requires_grad_()
    q = proposal(name, loc, scale)
    z = q.rsample((7,), generator=torch.Generator().manual_seed(9))
    eps = sample_standard_kernel(
        name, (7, 3), generator=torch.Generator().manual_seed(9), dtype=F64
    )
    torch.testing.assert_close(z, loc + scale * eps, rtol=0, atol=0)
    g_loc, g_scale = torch.autograd.grad(z.sum(), (loc, scale))
    torch.testing.assert_close(g_loc, torch.full_like(loc, 7.0), rtol=0, atol=0)
    torch.testing.assert_close(g_scale, eps.sum(0), rtol=1e-15, atol=0)  # d z / d scale = eps
    assert not q.sample((2,)).requires_grad


def test_sampling_uses_the_global_rng_without_a_generator():
    torch.manual_seed(123)
    a = proposal("tricube", 0.0, 1.0).rsample((100,))
    torch.manual_seed(123)
    b = sample_standard_kernel("tricube", (100,))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(123)
    g = sample_standard_kernel("gaussian", (100,))
    torch.manual_seed(123)
    torch.testing.assert_close(g, sample_standard_kernel("gaussian", (100,)), rtol=0, atol=0)
    assert not torch.equal(g, sample_standard_kernel("gaussian", (100,)))


@pytest.mark.parametrize("name", KERNELS)
def test_rejection_candidates_follow_the_paper_scheme(name):
    kernel = get_kernel(name)
    n = 200_000
    accepted = rejection_candidates(name, n, generator=torch.Generator().manual_seed(4))
    # Independent replay of the scheme: u ~ U[-1, 1], v ~ U[0, 1], accept K(u) > K(0) v.
    gen = torch.Generator().manual_seed(4)
    u = torch.rand(n, generator=gen) * 2 - 1
    v = torch.rand(n, generator=gen)
    expected = u[kernel.pdf(u) > kernel.k0 * v]
    torch.testing.assert_close(accepted, expected, rtol=0, atol=0)
    rate = kernel.acceptance_rate
    assert abs(accepted.numel() / n - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)
    assert rejection_candidates(name, 0).shape == (0,)


def test_sample_standard_kernel_shapes():
    assert sample_standard_kernel("quartic", ()).shape == ()
    assert sample_standard_kernel("quartic", 0).shape == (0,)
    assert sample_standard_kernel("quartic", (3, 0, 2)).shape == (3, 0, 2)
    assert sample_standard_kernel("quartic", torch.Size([4, 5])).shape == (4, 5)


# ---------------------------------------------------------------------------------------
# expand and validation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROPOSALS)
def test_expand(name):
    q = proposal(name, t64([0.0, 1.0, -2.0]), t64([1.0, 0.5, 2.0]), validate_args=True)
    e = q.expand((4, 3))
    assert type(e) is type(q) and e.batch_shape == (4, 3) and e._validate_args
    torch.testing.assert_close(e.loc, q.loc.expand(4, 3), rtol=0, atol=0)
    torch.testing.assert_close(e.scale, q.scale.expand(4, 3), rtol=0, atol=0)
    value = t64([0.1, 1.2, -2.5]).expand(4, 3)
    torch.testing.assert_close(e.log_prob(value), q.log_prob(value), rtol=0, atol=0)
    torch.testing.assert_close(e.entropy(), q.entropy().expand(4, 3), rtol=0, atol=0)
    assert e.rsample((2,)).shape == (2, 4, 3)
    with pytest.raises(RuntimeError):
        q.expand((2,))


@pytest.mark.parametrize("name", KERNELS)
def test_validate_args(name):
    with pytest.raises(ValueError):
        proposal(name, 0.0, -1.0, validate_args=True)
    with pytest.raises(ValueError):
        proposal(name, 0.0, 0.0, validate_args=True)
    with pytest.raises(ValueError):
        proposal(name, math.nan, 1.0, validate_args=True)
    q = proposal(name, t64(0.0), t64(1.0), validate_args=True)
    with pytest.raises(ValueError):
        q.log_prob(t64(1.5))  # outside the support [-1, 1]
    with pytest.raises(ValueError):
        q.cdf(t64(-1.01))
    assert q.support.check(t64([-1.0, 1.0])).all()  # closed interval
    unchecked = proposal(name, t64(0.0), t64(1.0), validate_args=False)
    assert float(unchecked.log_prob(t64(1.5))) == -math.inf
    assert proposal(name, 0.0, -1.0, validate_args=False).scale == -1.0


# ---------------------------------------------------------------------------------------
# uniform_prior_transform
# ---------------------------------------------------------------------------------------
def tanh_transform(mu, sigma):
    right, left = torch.tanh(mu + sigma), torch.tanh(mu - sigma)
    return (right + left) / 2, (right - left) / 2


@settings(max_examples=200, deadline=None)
@given(mu=st.floats(-5, 5), sigma=st.floats(1e-3, 5))
def test_transform_matches_tanh_formula_in_float64(mu, sigma):
    # |mu| + sigma <= 10: tanh is not saturated in float64 (1 - tanh(10) ~ 4e-9).
    got = uniform_prior_transform(t64(mu), t64(sigma))
    expected = tanh_transform(t64(mu), t64(sigma))
    # The tanh form's difference of two O(1) numbers is exact only to a few ulps
    # of 1, hence the absolute 1e-15; relative 1e-12 for everything else.
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def test_transform_matches_authors_sigmoid_form_with_halved_inputs():
    m = torch.linspace(-6, 6, 97, dtype=F64)[:, None]
    s = torch.logspace(-3, 0.7, 41, dtype=F64)[None, :]
    left, right = torch.sigmoid(m - s), torch.sigmoid(m + s)
    mu_t, sigma_t = uniform_prior_transform(m / 2, s / 2)
    torch.testing.assert_close(mu_t, left + right - 1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sigma_t, right - left, rtol=1e-12, atol=1e-15)


def exact_transform(mu, sigma):
    """Eq. 9-10 in 200-digit arithmetic on the exact values of the float inputs."""
    with mpmath.workdps(200):
        right, left = mpmath.tanh(mpmath.mpf(mu) + sigma), mpmath.tanh(mpmath.mpf(mu) - sigma)
        return (right + left) / 2, (right - left) / 2


EXTREME_MU = [0.0, 1e-30, 1e-7, 0.3, 1.0, 4.0, 9.0, 9.5, 15.0, 20.0, 30.0, 49.0, 50.0]
EXTREME_SIGMA = [1e-6, 3e-6, 1e-4, 0.01, 0.5, 1.0, 4.5, 9.0, 10.0, 20.0, 49.0, 50.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transform_against_high_precision_at_extremes(dtype):
    mu = torch.tensor([s * m for m in EXTREME_MU for s in (1, -1)], dtype=dtype)[:, None]
    sigma = torch.tensor(EXTREME_SIGMA, dtype=dtype)[None, :]
    mu, sigma = torch.broadcast_tensors(mu, sigma)
    mu_t, sigma_t = uniform_prior_transform(mu, sigma)
    finfo = torch.finfo(dtype)
    for i in range(mu.numel()):
        m, s = float(mu.flatten()[i]), float(sigma.flatten()[i])
        em, es = exact_transform(m, s)
        for got, exact in ((float(mu_t.flatten()[i]), em), (float(sigma_t.flatten()[i]), es)):
            # Backward-stable bound: mu' and sigma' scale like exp(-2 |m| - 2 s) in the
            # tails, so their relative condition number is about 1 + 2|m| + 2s; a
            # handful of roundings gives <= 8 ulps times that where the value is a
            # normal number, absolute `tiny` below.
            cond = 1 + 2 * abs(m) + 2 * s
            err = abs(mpmath.mpf(got) - exact)
            assert err <= max(8 * finfo.eps * cond * abs(exact), finfo.tiny), (m, s, got, exact)
    assert (sigma_t >= finfo.tiny).all()  # sigma' > 0 everywhere, floored at tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transformed_support_is_inside_prior_support(dtype):
    mu = torch.linspace(-50, 50, 2001, dtype=dtype)[:, None]
    sigma = torch.logspace(-6, math.log10(50), 301, dtype=dtype)[None, :]
    mu_t, sigma_t = uniform_prior_transform(mu, sigma)
    assert mu_t.shape == sigma_t.shape == (2001, 301)
    # The guarantee holds for the sums as rounded in the working dtype.
    assert (mu_t + sigma_t <= 1).all() and (mu_t - sigma_t >= -1).all()
    assert (sigma_t >= torch.finfo(dtype).tiny).all() and torch.isfinite(mu_t).all()
    # Above the floor, sigma' is not flushed: log sigma' from the exact identity
    # sigma' = sinh(2s) / (cosh(2m) + cosh(2s)), evaluated in float64.
    m64, s64 = mu.double(), sigma.double()
    big = torch.maximum(2 * m64.abs(), 2 * s64)
    log_true = (
        torch.log(-torch.expm1(-4 * s64))
        + 2 * s64
        - big
        - torch.log(
            torch.exp(2 * m64.abs() - big)
            + torch.exp(-2 * m64.abs() - big)
            + torch.exp(2 * s64 - big)
            + torch.exp(-2 * s64 - big)
        )
    )
    representable = log_true > math.log(torch.finfo(dtype).tiny) + 1
    assert (sigma_t[representable] > torch.finfo(dtype).tiny).all()
    assert torch.isfinite(kl_divergence("tricube", mu_t, sigma_t, prior="uniform")).all()


@settings(max_examples=100, deadline=None)
@given(
    mu=st.floats(-50, 50),
    sigma=st.floats(1e-6, 50),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_transform_support_and_gradients_hypothesis(mu, sigma, dtype):
    m = torch.tensor(mu, dtype=dtype, requires_grad=True)
    s = torch.tensor(sigma, dtype=dtype, requires_grad=True)
    mu_t, sigma_t = uniform_prior_transform(m, s)
    assert (mu_t + sigma_t <= 1) and (mu_t - sigma_t >= -1) and (sigma_t >= 0)
    g_m, g_s = torch.autograd.grad(0.7 * mu_t + 1.3 * sigma_t, (m, s))
    assert torch.isfinite(g_m) and torch.isfinite(g_s)


def test_transform_gradcheck_including_mu_zero():
    mu = t64([0.0, -0.0, 0.4, -1.5, 3.0, 6.0]).requires_grad_()
    sigma = t64([0.3, 2.0, 1e-3, 0.8, 4.0, 0.05]).requires_grad_()
    assert torch.autograd.gradcheck(uniform_prior_transform, (mu, sigma))
    # d mu' / d mu at mu = 0 is sech^2(sigma), not the 0 an abs() would give.
    g = torch.autograd.grad(uniform_prior_transform(mu, sigma)[0].sum(), mu)[0]
    assert float(g[0]) == pytest.approx(1 / math.cosh(0.3) ** 2, rel=1e-14)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_transform_infinite_inputs_take_their_limits(dtype):
    mu = torch.tensor([0.3, math.inf, -math.inf, 2.0, -1e30], dtype=dtype)
    sigma = torch.tensor([math.inf, 0.5, 1e-3, 1e30, 0.1], dtype=dtype)
    mu_t, sigma_t = uniform_prior_transform(mu, sigma)
    tiny = torch.finfo(dtype).tiny
    expected_mu = torch.tensor([0.0, 1.0, -1.0, 0.0, -1.0], dtype=dtype)
    expected_sigma = torch.tensor([1.0, tiny, tiny, 1.0, tiny], dtype=dtype)
    torch.testing.assert_close(mu_t, expected_mu, rtol=0, atol=0)
    torch.testing.assert_close(sigma_t, expected_sigma, rtol=0, atol=0)
    assert (mu_t + sigma_t <= 1).all() and (mu_t - sigma_t >= -1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transform_support_in_half_precision(dtype):
    mu = torch.linspace(-50, 50, 1001, dtype=torch.float32)[:, None]
    sigma = torch.logspace(-6, math.log10(50), 101, dtype=torch.float32)[None, :]
    mu_t, sigma_t = uniform_prior_transform(mu.to(dtype), sigma.to(dtype))
    assert mu_t.dtype == sigma_t.dtype == dtype
    assert (mu_t + sigma_t <= 1).all() and (mu_t - sigma_t >= -1).all()
    assert (sigma_t > 0).all() and torch.isfinite(mu_t).all()
    ref_mu, ref_sigma = uniform_prior_transform(mu.to(dtype).double(), sigma.to(dtype).double())
    # A few ulps of the half dtype (eps 2^-10 / 2^-7) times the condition number
    # (<= 1 + 2|mu| + 2 sigma), where the reference is a normal half number.
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    cond = 1 + 2 * mu.abs() + 2 * sigma
    for got, ref in ((mu_t, ref_mu), (sigma_t, ref_sigma)):
        err = (got.double() - ref).abs()
        assert (err <= torch.clamp(8 * eps * cond * ref.abs(), min=tiny)).all()


def test_transform_broadcasts_and_keeps_dtype():
    mu_t, sigma_t = uniform_prior_transform(torch.zeros(4, 1), torch.ones(3))
    assert mu_t.shape == sigma_t.shape == (4, 3) and mu_t.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Error cases
# ---------------------------------------------------------------------------------------
def test_error_cases():
    mu, sigma = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="unknown proposal"):
        kl_divergence("laplace", mu, sigma)
    with pytest.raises(TypeError):
        kl_divergence(3, mu, sigma)
    with pytest.raises(ValueError, match="unknown prior"):
        kl_divergence("tricube", mu, sigma, prior="normal")
    with pytest.raises(ValueError, match="sigma"):
        kl_divergence("tricube", mu, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma"):
        kl_divergence("tricube", mu, torch.tensor([1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        kl_divergence("tricube", mu, torch.tensor([1.0, math.nan, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        kl_divergence("tricube", torch.tensor([0.0, math.nan, 0.0]), sigma)
    with pytest.raises(ValueError, match="finite"):
        kl_divergence("tricube", mu, torch.tensor([1.0, math.inf, 1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kl_divergence("tricube", [0.0, 0.0, 0.0], sigma)
    with pytest.raises(TypeError, match="floating"):
        kl_divergence("tricube", torch.zeros(3, dtype=torch.int64), sigma)
    with pytest.raises(TypeError, match="dtype"):
        kl_divergence("tricube", mu.double(), sigma)
    with pytest.raises(ValueError, match="broadcast"):
        kl_divergence("tricube", torch.zeros(2), sigma)
    # Skipping the (host-syncing) value check is explicit.
    assert kl_divergence("tricube", mu, torch.zeros(3), validate_args=False).isinf().all()

    with pytest.raises(ValueError, match="sigma"):
        uniform_prior_transform(mu, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma"):
        uniform_prior_transform(mu, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        uniform_prior_transform(mu, torch.tensor([1.0, math.nan, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        uniform_prior_transform(torch.tensor([0.0, math.nan, 0.0]), sigma)
    with pytest.raises(TypeError):
        uniform_prior_transform(0.0, sigma)
    with pytest.raises(TypeError):
        uniform_prior_transform(mu, torch.ones(3, dtype=torch.int32))

    with pytest.raises(ValueError, match="unknown proposal"):
        proposal("logistic", 0.0, 1.0)
    with pytest.raises(ValueError, match="bounded"):
        rejection_candidates("gaussian", 10)
    with pytest.raises(ValueError):
        rejection_candidates("cosine", -1)
    with pytest.raises(TypeError):
        rejection_candidates("cosine", 10.0)
    with pytest.raises(TypeError):
        sample_standard_kernel("cosine", 10, dtype=torch.int64)
    with pytest.raises(ValueError):
        sample_standard_kernel("cosine", (2, -1))


# ---------------------------------------------------------------------------------------
# torch.compile and CUDA
# ---------------------------------------------------------------------------------------
def test_transform_and_kl_compile_without_graph_breaks():
    def loss(mu, log_sigma):
        mu_t, sigma_t = uniform_prior_transform(mu, log_sigma.exp(), validate_args=False)
        kl_u = kl_divergence("tricube", mu_t, sigma_t, "uniform", validate_args=False)
        kl_n = kl_divergence("cosine", mu, log_sigma.exp(), "gaussian", validate_args=False)
        return kl_u.sum() + kl_n.sum()

    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 4, generator=gen, requires_grad=True)
    log_sigma = torch.randn(6, 4, generator=gen, requires_grad=True)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got, expected = compiled(mu, log_sigma), loss(mu, log_sigma)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    g_got = torch.autograd.grad(got, (mu, log_sigma))
    g_exp = torch.autograd.grad(expected, (mu, log_sigma))
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", PROPOSALS)
def test_cuda_matches_cpu(name):
    gen = torch.Generator(device="cuda").manual_seed(0)
    eps = sample_standard_kernel(name, (4000,), generator=gen, device="cuda")
    assert eps.device.type == "cuda"
    if get_kernel(name).bounded:
        assert eps.abs().max() <= 1
    mu = torch.linspace(-50, 50, 101, dtype=F64)[:, None]
    sigma = torch.logspace(-6, 1.6, 31, dtype=F64)[None, :]
    cpu = uniform_prior_transform(mu, sigma)
    gpu = uniform_prior_transform(mu.cuda(), sigma.cuda())
    for c, g in zip(cpu, gpu):
        # Different exp/expm1 implementations: a few ulps, amplified by the
        # condition number (<= 1 + 2|mu| + 2 sigma ~ 200) in the tails.
        torch.testing.assert_close(g.cpu(), c, rtol=1e-12, atol=1e-300)
    kl = kl_divergence(name, mu.cuda(), sigma.cuda(), prior="gaussian")
    torch.testing.assert_close(kl.cpu(), kl_divergence(name, mu, sigma), rtol=1e-14, atol=1e-14)
