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
from ddvae_fast.sampling import triton as triton_source
from ddvae_fast.sampling.philox import BLOCKS_PER_RANK
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
    calls, size = 100, 74
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


# ----------------------------------------------- bookkeeping on the device, no host read
class _RecordedLaunch:
    """Stands in for a Triton kernel: records the launch, runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.launches.append((self.name, grid, {t.device.type for t in tensors}))

        return launch


@pytest.mark.parametrize("name,method", [("tricube", "rejection"), ("cosine", "transform")])
def test_triton_calls_read_nothing_back(monkeypatch, name, method):
    # The sampler's device state is moved to the meta device, where a tensor has
    # no values: any host read of it (.item(), int(), bool(), .tolist(), a copy
    # to the CPU) raises. The kernels are replaced by recorders. Calls served
    # from the buffer, calls that refill and calls that grow the buffer must
    # then still run, launching the kernels and nothing that reads back.
    s = sampler(name, seed=3, method=method)
    s.sample(100)  # real draws first: counters, buffer and workspace in use
    launches = []
    for kernel in ("device_plan_kernel", "device_write_kernel"):
        monkeypatch.setattr(triton_source, kernel, _RecordedLaunch(kernel, launches))
    meta = torch.device("meta")
    source = s._source
    s.device = source.device = meta
    for owner, attr in [(s, "_counters"), (s, "_buffer"), (source, "_plan")]:
        setattr(owner, attr, getattr(owner, attr).to(meta))
    source._counts, source._ends = source._counts.to(meta), source._ends.to(meta)
    sizes = (5, 3, 50_000, 37, 1)  # 50_000: beyond the buffer, and it grows it
    for n in sizes:
        out = s.sample(n)
        assert out.device == meta and out.shape == (n,)
    assert [name for name, _, _ in launches] == [
        "device_plan_kernel",
        "device_write_kernel",
    ] * len(sizes)
    assert all(devices == {"meta"} for _, _, devices in launches)
    # The detector works: reading the bookkeeping is a host read, and it fails here.
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = s.buffered


def test_triton_programs_share_the_tiles_as_one_program_does(monkeypatch):
    # On a GPU a grid of a few programs per SM loops over the tiles and the chunks
    # of buffered draws; the interpreter runs one program unless asked for more.
    # Three programs, and copies of 16 draws per chunk, must give the same stream.
    monkeypatch.setattr(triton_source, "_INTERPRETED_PROGRAMS", 3)
    monkeypatch.setattr(triton_source, "COPY", 16)
    for method, name in (("rejection", "cosine"), ("transform", "triangular")):
        t = sampler(name, seed=6, method=method)
        c = sampler(name, backend="cpp", seed=6, method=method)
        for size in (5, 2500, 100, 1):  # 2500 draws: several 1024-candidate tiles
            assert torch.equal(t.sample(size).cpu(), c.sample(size)), (name, size)
        assert t.candidates_drawn == c.candidates_drawn and t.buffered == c.buffered


def test_triton_short_refills_on_the_device_keep_the_stream(monkeypatch):
    # A refill short of its draws is followed by more refills inside
    # device_write_kernel (program 0). Capping every refill at 64 candidates makes
    # each call take many of them; the draws must still be the cpp stream's.
    t, c = sampler("triweight", seed=12), sampler("triweight", backend="cpp", seed=12)
    monkeypatch.setattr(t, "_refill_units", lambda need, candidates=None: 64)
    for size in (300, 3, 250):
        assert torch.equal(t.sample(size).cpu(), c.sample(size))
    # Every refill drew 64 candidates, so 553 draws took at least 9 of them.
    assert t.candidates_drawn % 64 == 0 and t.candidates_drawn >= 64 * 9
    assert t.state_dict()["block_offset"] == t.candidates_drawn // 2


def test_triton_rank_end_raises_before_drawing_as_cpp_does():
    # Near the end of a rank's blocks a call reads the counters and checks the
    # refill exactly (RejectionSampler._fill_on_device): like cpp's host loop it
    # refuses before any work, the buffered draws included.
    t, c = sampler("quartic", seed=5, rank=1), sampler("quartic", backend="cpp", seed=5, rank=1)
    for s in (t, c):
        state = s.state_dict()
        state["block_offset"] = 2 * BLOCKS_PER_RANK - 300  # 300 blocks left in rank 1
        s.load_state_dict(state)
    assert torch.equal(t.sample(100).cpu(), c.sample(100))
    for s in (t, c):
        before = s.state_dict()
        with pytest.raises(OverflowError, match="used up"):
            s.sample(2000)
        after = s.state_dict()
        assert torch.equal(after.pop("buffer"), before.pop("buffer")) and after == before
    assert t.state_dict()["block_offset"] == c.state_dict()["block_offset"]


def test_triton_a_short_refill_past_the_rank_end_raises(monkeypatch):
    # The main refill fits, the short refills after it do not: the device raises its
    # error flag instead of drawing another rank's blocks, and the call's read-back
    # turns it into the OverflowError of the host loop.
    t = sampler("triweight", seed=5, rank=2)
    state = t.state_dict()
    state["block_offset"] = 3 * BLOCKS_PER_RANK - 200  # 200 blocks = 400 candidates left
    t.load_state_dict(state)
    monkeypatch.setattr(t, "_refill_units", lambda need, candidates=None: 256)
    with pytest.raises(OverflowError, match="used up"):
        t.sample(1000)  # ~0.46 kept per candidate: 400 candidates cannot give 1000 draws
    assert t.state_dict()["block_offset"] <= 3 * BLOCKS_PER_RANK


@pytest.mark.parametrize("grad", [True, False])
def test_triton_rsample_equals_cpp_bit_for_bit(grad):
    # Both fuse z = fma(sigma, eps, mu) into the draw (one rounding, float32).
    gen = torch.Generator().manual_seed(4)
    mu = torch.randn(2500, generator=gen) * 1e3
    sigma = torch.rand(2500, generator=gen) * 1e-2 + 1e-5
    t, c = sampler("tricube", seed=14), sampler("tricube", backend="cpp", seed=14)
    for s in (t, c):
        s.sample(9)  # the call is served from the buffer first, then refilled
    zs = []
    for s, device in ((t, DEVICE), (c, "cpu")):
        m, g = mu.to(device).requires_grad_(grad), sigma.to(device).requires_grad_(grad)
        z = s.rsample(m, g)
        if grad:
            assert type(z.grad_fn).__name__ == "_ReparametrizeBackward"
            z.backward(torch.ones_like(z))
            zs.append((z.detach().cpu(), g.grad.cpu()))
        else:
            zs.append((z.cpu(), None))
    assert torch.equal(zs[0][0], zs[1][0])
    if grad:
        assert torch.equal(zs[0][1], zs[1][1])
    assert t.candidates_drawn == c.candidates_drawn and t.buffered == c.buffered
