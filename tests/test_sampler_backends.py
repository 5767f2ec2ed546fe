"""RejectionSampler's 'triton' backend against 'cpp' and the reference, and across backends.

Without a GPU the Triton kernels run on CPU tensors under TRITON_INTERPRET=1
(set below before torch or triton is imported); interpreted sizes stay at a few
thousand draws. 'triton' and 'cpp' implement one stream definition (see
csrc/sampler.cpp), so beyond the statistical tests their draws must agree bit for
bit: every float operation of the accept test, the transforms and Box-Muller is
exact or correctly rounded in the same order in both, and the Triton kernels
are launched without FMA contraction.

KS threshold p > 1e-3 with fixed seeds (deterministic; see tests/test_sampler.py
for the power argument, here at n = 3000 the critical D is ~0.036).
"""

import os

# Interpret the Triton kernels on CPU tensors, unless asked (DDVAE_TRITON_COMPILED=1,
# on a GPU machine) to run them compiled on CUDA tensors.
if os.environ.get("DDVAE_TRITON_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import KS_P, check_distribution
from scipy import stats

from ddvae_fast.distributions.smoothing import KERNELS, PROPOSALS, SMOOTHING_KERNELS
from ddvae_fast.sampling.sampler import TRANSFORM_KERNELS, RejectionSampler

N = 3000  # interpreted Triton: a few thousand draws per test

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def sampler(name, backend="triton", **kw):
    return RejectionSampler(
        name, backend=backend, device=DEVICE if backend != "cpp" else "cpu", **kw
    )


@pytest.mark.parametrize("name", PROPOSALS)
def test_triton_rejection_distribution(name):
    s = sampler(name, seed=2024)
    x = torch.cat(
        [s.sample(N // 3), s.sample((N // 3 // 10, 10)).reshape(-1), s.sample(N - 2 * (N // 3))]
    )
    assert x.device.type == DEVICE and x.dtype == torch.float32
    check_distribution(name, x)


@pytest.mark.parametrize("name", TRANSFORM_KERNELS)
def test_triton_transform_distribution(name):
    s = sampler(name, seed=99, method="transform")
    check_distribution(name, s.sample(N))
    assert s.candidates_drawn == N + s.buffered and s.buffered < 4


@pytest.mark.parametrize(
    "method,name",
    [("rejection", n) for n in PROPOSALS] + [("transform", n) for n in TRANSFORM_KERNELS],
)
def test_triton_equals_cpp_bit_for_bit(method, name):
    # Uneven call sizes: the buffers, refill sizes and stream positions must agree too.
    t = sampler(name, seed=2**40 + 7, method=method)
    c = sampler(name, backend="cpp", seed=2**40 + 7, method=method)
    for size in (1, 1500, 37, 700):
        a, b = t.sample(size).cpu(), c.sample(size)
        assert torch.equal(a, b), (method, name, size)
    assert t.candidates_drawn == c.candidates_drawn and t.buffered == c.buffered


def test_triton_counter_crosses_the_32_bit_boundary():
    # Start just below block 2^32 so the counter's high word changes inside a program.
    t, c = sampler("quartic", seed=3), sampler("quartic", backend="cpp", seed=3)
    for s in (t, c):
        state = s.state_dict()
        state["block_offset"] = 2**32 - 300
        s.load_state_dict(state)
    assert torch.equal(t.sample(2000).cpu(), c.sample(2000))


@pytest.mark.parametrize("name", PROPOSALS)
def test_backends_agree_in_distribution(name):
    # Two-sample KS between independent streams of every pair of backends.
    x = {
        b: sampler(name, backend=b, seed=500 + i).sample(N).cpu().numpy()
        for i, b in enumerate(("reference", "cpp", "triton"))
    }
    assert stats.ks_2samp(x["triton"], x["reference"]).pvalue > KS_P
    assert stats.ks_2samp(x["triton"], x["cpp"]).pvalue > KS_P
    assert stats.ks_2samp(x["cpp"], x["reference"]).pvalue > KS_P


@pytest.mark.parametrize("name", PROPOSALS)
def test_triton_reproducible_by_seed(name):
    a, b, c = sampler(name, seed=42), sampler(name, seed=42), sampler(name, seed=43)
    for size in (5, 400):
        x, y, z = a.sample(size), b.sample(size), c.sample(size)
        assert torch.equal(x, y)
    assert not torch.equal(x, z)


@pytest.mark.parametrize(
    "name,method", [(n, "rejection") for n in PROPOSALS] + [("cosine", "transform")]
)
def test_triton_state_dict_resumes(name, method):
    straight, interrupted = (
        sampler(name, seed=31, method=method),
        sampler(name, seed=31, method=method),
    )
    for s in (straight, interrupted):
        s.sample(300)
    state = interrupted.state_dict()
    expected = [straight.sample(k) for k in (5, 900)]
    resumed = sampler(name, seed=1, method=method)
    resumed.load_state_dict(state)
    for k, e in zip((5, 900), expected):
        assert torch.equal(resumed.sample(k), e)


@pytest.mark.parametrize("name", KERNELS)
def test_triton_buffer_accounting(name):
    s = sampler(name, seed=3)
    calls, size = 200, 37
    for _ in range(calls):
        s.sample(size)
    n, k0 = calls * size, SMOOTHING_KERNELS[name].k0
    assert abs(s.candidates_drawn - n * 2 * k0) < 0.05 * n * 2 * k0
    a = 1 / (2 * k0)
    assert (
        abs(n + s.buffered - s.candidates_drawn * a)
        <= 5 * math.sqrt(s.candidates_drawn * a * (1 - a)) + 1
    )


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(0, 800), min_size=1, max_size=4), name=st.sampled_from(PROPOSALS))
def test_triton_draws_do_not_depend_on_how_they_are_requested(sizes, name):
    pieces = sampler(name, seed=5)
    joined = torch.cat([pieces.sample(k) for k in sizes])
    whole = sampler(name, seed=5).sample(sum(sizes))
    assert torch.equal(joined, whole)


@pytest.mark.parametrize("name", ["triweight", "gaussian"])
def test_triton_rsample_gradients_and_bounds(name):
    gen = torch.Generator().manual_seed(0)
    mu = (torch.randn(50, 1, generator=gen) * 1e4).to(DEVICE).requires_grad_()
    sigma = (torch.rand(1, 8, generator=gen) * 1e-3 + 1e-6).to(DEVICE).requires_grad_()
    z = sampler(name, seed=8).rsample(mu, sigma)
    eps = sampler(name, seed=8).sample((50, 8))
    weight = torch.randn(50, 8, generator=gen).to(DEVICE)
    (z * weight).sum().backward()
    torch.testing.assert_close(mu.grad, weight.sum(1, keepdim=True))
    torch.testing.assert_close(sigma.grad, (weight * eps).sum(0, keepdim=True))
    if SMOOTHING_KERNELS[name].bounded:
        assert torch.all(z >= mu - sigma) and torch.all(z <= mu + sigma)


def test_triton_errors():
    with pytest.raises(ValueError, match="no closed-form"):
        sampler("tricube", seed=1, method="transform")
    s = sampler("uniform", seed=1)
    with pytest.raises(ValueError, match="device"):
        s.rsample(torch.zeros(2, device="meta"), torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="sigma"):
        s.rsample(torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("rank", [1, 2**16 - 1])
def test_triton_rank_streams_equal_cpp_bit_for_bit(rank):
    # Per-rank streams are Philox block ranges chosen in Python (sampling/philox.py):
    # both backends draw the same rank r stream, and it differs from rank 0's.
    t = sampler("quartic", seed=21, rank=rank)
    c = sampler("quartic", backend="cpp", seed=21, rank=rank)
    for size in (5, 600):
        assert torch.equal(t.sample(size).cpu(), c.sample(size))
    assert t.state_dict()["block_offset"] == c.state_dict()["block_offset"] >= rank * 2**48
    assert not torch.equal(sampler("quartic", seed=21).sample(600).cpu(), c.sample(600))
