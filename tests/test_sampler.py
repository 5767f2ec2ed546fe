"""RejectionSampler, backends 'reference' and 'cpp', against independent computations.

- The Philox4x32-10 stream of csrc/sampler.cpp against the Random123 known-answer
  vectors and against a NumPy re-implementation of the whole stream definition
  (uniforms, the accept test written with the float64 pdf and K(0) of
  smoothing_kernels.py, the transforms and Box-Muller written with NumPy's
  float64 functions).
- Distributions: Kolmogorov-Smirnov against the kernel CDF of
  smoothing_kernels.py, mean 0 and Var(K) within 5 standard errors (the
  4th moment for the variance's standard error comes from quadrature).
- Buffer: no accepted draw is lost, candidates_drawn stays near n * 2K(0),
  draws do not depend on how they are requested, state_dict resumes exactly.
- rsample: autograd against finite differences (gradcheck, float64) and against
  eps itself, bounds after rounding, and every documented error.

The cpp backend is used explicitly everywhere: if the compiled module is
missing these tests fail, they do not skip.

KS threshold: p > 1e-3. Seeds are fixed, so each test is deterministic; under
a correct sampler a given seed fails with probability 1e-3, and at n = 20000
the test still rejects any CDF error above ~0.014 (the critical D), far below
the distance between any two of the kernels (>= 0.03).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes
from oracles import KS_P, check_distribution, fma_oracle, pdf64
from scipy import stats

import ddvae_fast as ddf
from ddvae_fast import _sampler as cpp  # fails collection, not skips, if the build is missing
from ddvae_fast.distributions.smoothing import KERNELS, PROPOSALS, SMOOTHING_KERNELS
from ddvae_fast.sampling.sampler import TRANSFORM_KERNELS, RejectionSampler

BACKENDS = ("reference", "cpp")
N_KS = 20_000


# ------------------------------------------------------------------ independent stream
MASK32 = np.uint64(0xFFFFFFFF)


def philox_numpy(blocks: np.ndarray, seed: int) -> np.ndarray:
    """Philox4x32-10 of counters (block_lo, block_hi, 0, 0), key = seed; (n, 4) uint32."""
    blocks = blocks.astype(np.uint64)
    c0, c1 = blocks & MASK32, blocks >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def sym64(w):
    return (2.0 * (w.astype(np.int64) >> 9) + 1 - 2**23) * 2.0**-23


def unit64(w):
    return (w.astype(np.int64) >> 8) * 2.0**-24


def expected_rejection_stream(name, seed, first_block, n_blocks):
    """Accepted u of the candidates in blocks [first_block, first_block + n_blocks), float64."""
    w = philox_numpy(np.arange(first_block, first_block + n_blocks, dtype=np.uint64), seed)
    u = sym64(w[:, [0, 2]].reshape(-1))  # candidate 2j: words (0, 1); 2j + 1: words (2, 3)
    v = unit64(w[:, [1, 3]].reshape(-1))
    keep = pdf64(name, u) > SMOOTHING_KERNELS[name].k0 * v
    return u[keep]


def expected_transform_stream(name, seed, n_blocks):
    w = philox_numpy(np.arange(n_blocks, dtype=np.uint64), seed)
    if name == "gaussian":
        u1 = ((w[:, [0, 2]].astype(np.int64) >> 8) + 1) * 2.0**-24
        theta = 2 * np.pi * unit64(w[:, [1, 3]])
        r = np.sqrt(-2 * np.log(u1))
        return np.stack(
            [
                r[:, 0] * np.cos(theta[:, 0]),
                r[:, 0] * np.sin(theta[:, 0]),
                r[:, 1] * np.cos(theta[:, 1]),
                r[:, 1] * np.sin(theta[:, 1]),
            ],
            axis=1,
        ).reshape(-1)
    x = sym64(w)
    if name == "uniform":
        return x.reshape(-1)
    if name == "triangular":
        return ((x[:, [0, 2]] + x[:, [1, 3]]) / 2).reshape(-1)
    if name == "epanechnikov":
        a = np.abs(x)
        return np.where((a[:, 2] >= a[:, 1]) & (a[:, 2] >= a[:, 0]), x[:, 1], x[:, 2])
    if name == "cosine":
        return (2 / np.pi * np.arcsin(x)).reshape(-1)
    raise AssertionError(name)


# Random123 kat_vectors for philox4x32_10: (counter, key) -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert cpp.philox4x32_10(*counter, *key) == expected


def test_numpy_philox_matches_the_cpp_one():
    seed = 0x1234_5678_9ABC_DEF0
    blocks = np.array([0, 1, 2**32 - 1, 2**32, 2**40 + 3], dtype=np.uint64)
    got = [
        cpp.philox4x32_10(int(b) & 0xFFFFFFFF, int(b) >> 32, 0, 0, seed & 0xFFFFFFFF, seed >> 32)
        for b in blocks
    ]
    assert np.array_equal(philox_numpy(blocks, seed), np.array(got, dtype=np.uint32))


def raw_refill(
    method, name, seed, first_block, n_blocks, need, simd="auto", threads=2, park_all=False
):
    per = cpp.draws_per_block(method, name)
    out = torch.full((need,), float("nan"))
    buf = torch.full((max(n_blocks * per - need, 1),), float("nan"))
    kept = cpp.refill(
        method,
        name,
        seed,
        first_block,
        n_blocks,
        out.data_ptr(),
        need,
        buf.data_ptr(),
        buf.numel(),
        threads,
        simd,
        park_all,
    )
    return torch.cat([out[: min(kept, need)], buf[: max(kept - need, 0)]])


@pytest.mark.parametrize("name", KERNELS)
def test_cpp_rejection_stream_matches_numpy_definition(name):
    # Blocks straddle 2^32 so the counter's high word and the SIMD carry are exercised;
    # 3001 blocks are not a multiple of the 16-lane or the tile width.
    seed, first, n_blocks = 987654321987, 2**32 - 1500, 3001
    expected = expected_rejection_stream(name, seed, first, n_blocks)
    for simd in cpp.supported_isas():
        got = raw_refill(
            "rejection", name, seed, first, n_blocks, need=len(expected) // 2, simd=simd
        )
        assert got.dtype == torch.float32
        # u is exact in float32; the float32 accept test could only disagree with
        # the float64 one within ~1e-7 of the boundary (not hit with this seed).
        assert np.array_equal(got.double().numpy(), expected), (name, simd)


@pytest.mark.parametrize("name", TRANSFORM_KERNELS + ("gaussian",))
def test_cpp_transform_stream_matches_numpy_definition(name):
    method = "gaussian" if name == "gaussian" else "transform"
    per = cpp.draws_per_block(method, name)
    n_blocks = 1037
    got = raw_refill(method, name, 42, 0, n_blocks, need=per * n_blocks).double().numpy()
    expected = expected_transform_stream(name, 42, n_blocks)
    # float32 polynomials (asin, log, sin/cos) vs NumPy float64: a few float32 ulp
    # of the result; Box-Muller radii reach ~5.6, hence the 4e-6 there.
    atol = 4e-6 if name == "gaussian" else 3e-7
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_draws_per_block_agrees_between_cpp_and_triton():
    from ddvae_fast.kernels.rejection_sampler import draws_per_block as _draws_per_block

    for name in KERNELS:
        assert cpp.draws_per_block("rejection", name) == _draws_per_block("rejection", name)
    for name in TRANSFORM_KERNELS:
        assert cpp.draws_per_block("transform", name) == _draws_per_block("transform", name)
    assert cpp.draws_per_block("gaussian", "gaussian") == _draws_per_block("gaussian", "gaussian")


@pytest.mark.parametrize("name", KERNELS)
def test_cpp_accept_shape_is_pdf_over_k0(name):
    # g(u) = K(u)/K(0) in float32; compared with the float64 pdf: a few float32 ulp.
    u = torch.linspace(-1, 1, 20001, dtype=torch.float32)[1:-1].contiguous()
    g = torch.empty_like(u)
    cpp.shape_values(name, u.data_ptr(), g.data_ptr(), u.numel())
    expected = SMOOTHING_KERNELS[name].pdf(u.double()) / SMOOTHING_KERNELS[name].k0
    torch.testing.assert_close(g.double(), expected, rtol=0, atol=5e-7)


@pytest.mark.parametrize(
    "method,name",
    [("rejection", n) for n in KERNELS]
    + [("transform", n) for n in TRANSFORM_KERNELS]
    + [("gaussian", "gaussian")],
)
def test_cpp_simd_and_scalar_paths_are_bit_identical(method, name):
    if "avx512" not in cpp.supported_isas():
        pytest.skip("no AVX-512 on this CPU: only the scalar path exists")
    a = raw_refill(method, name, 77, 2**32 - 2000, 4099, need=1000, simd="sse2")
    b = raw_refill(method, name, 77, 2**32 - 2000, 4099, need=1000, simd="avx512")
    assert torch.equal(a, b)


@pytest.mark.parametrize("out_offset", [0, 1])
def test_cpp_large_draws_stream_the_same_values(out_offset):
    # Outputs of 8 MiB or more are written with non-temporal stores (csrc/sampler.cpp,
    # kStreamBytes), from the first 64-byte aligned element on: the values must be
    # the scalar path's (plain stores), wherever the output starts.
    if "avx512" not in cpp.supported_isas():
        pytest.skip("no AVX-512 on this CPU: only the scalar path exists")
    need, n_blocks = 2**21 + 3, 2**21 + 5000  # 8 MiB of float32 draws; uniform keeps all
    outs = {}
    for isa in ("avx512", "sse2"):
        out = torch.full((need + out_offset,), float("nan"))
        buf = torch.full((2 * n_blocks - need,), float("nan"))
        kept = cpp.refill(
            "rejection", "uniform", 3, 0, n_blocks, out[out_offset:].data_ptr(), need,
            buf.data_ptr(), buf.numel(), 2, isa,
        )  # fmt: skip
        assert kept == 2 * n_blocks
        outs[isa] = (out[out_offset:], buf)
    assert torch.equal(outs["avx512"][0], outs["sse2"][0])
    assert torch.equal(outs["avx512"][1], outs["sse2"][1])


@pytest.mark.parametrize("threads,park_all", [(2, False), (5, False), (1, True), (3, True)])
def test_cpp_draws_do_not_depend_on_threads_or_placement_path(threads, park_all):
    # 300k blocks = 74 tiles: several threads really run (the serial cutoff is 64k
    # blocks per thread); park_all sends every tile through the parking path.
    n_blocks, need = 300_001, 400_000
    expected = raw_refill("rejection", "tricube", 5, 7, n_blocks, need=need, threads=1)
    got = raw_refill(
        "rejection", "tricube", 5, 7, n_blocks, need=need, threads=threads, park_all=park_all
    )
    assert torch.equal(got, expected)
    assert np.array_equal(
        expected.double().numpy(), expected_rejection_stream("tricube", 5, 7, n_blocks)
    )


def test_cpp_repeated_and_concurrent_refills_are_identical():
    # Races in the tile scheduling would show as differences between runs: repeat a
    # multi-threaded refill, and run refills from two Python threads at once (the
    # module releases the GIL; each thread runs its own OpenMP team).
    import threading

    expected = raw_refill("rejection", "cosine", 9, 0, 200_000, need=250_000, threads=1)
    for _ in range(20):
        assert torch.equal(
            raw_refill("rejection", "cosine", 9, 0, 200_000, need=250_000, threads=4), expected
        )
    results = [None] * 4

    def run(i):
        results[i] = raw_refill(
            "rejection", "cosine", 9, 0, 200_000, need=250_000, threads=3, park_all=i % 2 == 1
        )

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for r in results:
        assert torch.equal(r, expected)


def test_cpp_math_helpers_are_accurate():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 0.999 + 2.0**-24
    y, y2 = torch.empty_like(x), torch.empty_like(x)
    cpp.math_values("log", x.data_ptr(), y.data_ptr(), y2.data_ptr(), x.numel())
    ref = np.log(x.double().numpy())
    # Cephes logf: within 2 float32 ulp of the true value (relative 2.4e-7).
    assert np.all(
        np.abs(y.double().numpy() - ref) <= 2.4e-7 * np.maximum(np.abs(ref), 1e-30) + 1e-12
    )
    t = torch.arange(0, 2**24, 97, dtype=torch.float32) * 2.0**-24
    y, y2 = torch.empty_like(t), torch.empty_like(t)
    cpp.math_values("sincos_two_pi", t.data_ptr(), y.data_ptr(), y2.data_ptr(), t.numel())
    ang = 2 * np.pi * t.double().numpy()
    assert np.abs(y.double().numpy() - np.sin(ang)).max() < 2e-7  # ~2 ulp at magnitude 1
    assert np.abs(y2.double().numpy() - np.cos(ang)).max() < 2e-7


# ------------------------------------------------------------------ distributions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PROPOSALS)
def test_rejection_distribution(name, backend):
    sampler = RejectionSampler(name, seed=2024, backend=backend)
    x = torch.cat(
        [
            sampler.sample((N_KS // 4,)),
            sampler.sample((50, N_KS // 200)).reshape(-1),
            sampler.sample(N_KS // 2),
        ]
    )
    assert x.dtype == torch.float32
    check_distribution(name, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRANSFORM_KERNELS)
def test_transform_distribution(name, backend):
    sampler = RejectionSampler(name, seed=99, backend=backend, method="transform")
    x = sampler.sample(N_KS)
    check_distribution(name, x)
    # No rejection: every draw is kept; at most a Philox block's leftovers stay buffered.
    assert sampler.candidates_drawn == N_KS + sampler.buffered and sampler.buffered < 4


@pytest.mark.parametrize("name", PROPOSALS)
def test_reference_and_cpp_agree_in_distribution(name):
    a = RejectionSampler(name, seed=11, backend="reference").sample(N_KS).numpy()
    b = RejectionSampler(name, seed=12, backend="cpp").sample(N_KS).numpy()
    assert stats.ks_2samp(a, b).pvalue > KS_P


def test_cpp_draws_lie_strictly_inside_and_symmetric_grid():
    x = RejectionSampler("triangular", seed=1, backend="cpp").sample(100_000)
    assert x.abs().max() < 1
    k = (x.double() * 2**23 + 2**23 - 1) / 2  # the grid index (2k + 1 - 2^23) 2^-23
    assert torch.equal(k, k.round())


# ------------------------------------------------------------------ buffer and state
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", KERNELS)
def test_buffer_accounting_over_many_small_calls(name, backend):
    sampler = RejectionSampler(name, seed=3, backend=backend)
    calls, size = 200, 37
    for _ in range(calls):
        assert sampler.sample(size).shape == (size,)
    n = calls * size
    k0 = SMOOTHING_KERNELS[name].k0
    # The paper's N * 2K(0), within 5%: refills only ever overshoot by one small refill.
    assert abs(sampler.candidates_drawn - n * 2 * k0) < 0.05 * n * 2 * k0
    # Nothing accepted is thrown away: served + buffered ~ Binomial(candidates, 1/(2 K0)).
    a = 1 / (2 * k0)
    kept = n + sampler.buffered
    assert (
        abs(kept - sampler.candidates_drawn * a)
        <= 5 * math.sqrt(sampler.candidates_drawn * a * (1 - a)) + 1
    )


@pytest.mark.parametrize("name", KERNELS)
def test_cpp_keeps_every_accepted_candidate(name):
    sampler = RejectionSampler(name, seed=8, backend="cpp")
    served = sum(sampler.sample(s).numel() for s in (1, 37, 500, 3, 4096, 0, 77))
    # Exactly the accepted candidates of the blocks consumed were served or buffered.
    kept = len(expected_rejection_stream(name, 8, 0, sampler.candidates_drawn // 2))
    assert served + sampler.buffered == kept


def test_uniform_rejection_accepts_everything():
    sampler = RejectionSampler("uniform", seed=1, backend="cpp")
    for size in (37, 1000, 5):
        sampler.sample(size)
    assert sampler.candidates_drawn == 1042 + sampler.buffered


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffer_serves_small_calls_without_refill(backend):
    sampler = RejectionSampler("quartic", seed=4, backend=backend)
    sampler.sample(10)
    drawn, buffered = sampler.candidates_drawn, sampler.buffered
    assert buffered > 0
    sampler.sample(min(buffered, 5))
    assert sampler.candidates_drawn == drawn
    assert sampler.buffered == buffered - min(buffered, 5)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    name=st.sampled_from(PROPOSALS),
    method=st.sampled_from(("rejection", "transform")),
)
def test_cpp_draws_do_not_depend_on_how_they_are_requested(sizes, name, method):
    if method == "transform" and name not in TRANSFORM_KERNELS + ("gaussian",):
        method = "rejection"
    pieces = RejectionSampler(name, seed=5, backend="cpp", method=method)
    joined = torch.cat([pieces.sample(s) for s in sizes])
    whole = RejectionSampler(name, seed=5, backend="cpp", method=method).sample(sum(sizes))
    assert torch.equal(joined, whole)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PROPOSALS)
def test_same_seed_same_draws_other_seed_other_draws(name, backend):
    a = RejectionSampler(name, seed=123, backend=backend)
    b = RejectionSampler(name, seed=123, backend=backend)
    c = RejectionSampler(name, seed=124, backend=backend)
    for size in (100, 1, 2000):
        x, y, z = a.sample(size), b.sample(size), c.sample(size)
        assert torch.equal(x, y)
    assert not torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,method",
    [(n, "rejection") for n in PROPOSALS] + [(n, "transform") for n in TRANSFORM_KERNELS],
)
def test_state_dict_resumes_the_uninterrupted_stream(name, method, backend):
    straight = RejectionSampler(name, seed=31, backend=backend, method=method)
    interrupted = RejectionSampler(name, seed=31, backend=backend, method=method)
    for size in (300, 7):
        straight.sample(size)
        interrupted.sample(size)
    state = interrupted.state_dict()
    expected = [straight.sample(s) for s in (5, 1000, 3)]
    resumed = RejectionSampler(
        name, seed=999, backend=backend, method=method
    )  # seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.seed == 31
    assert resumed.buffered == interrupted.buffered
    assert resumed.candidates_drawn == interrupted.candidates_drawn
    got = [resumed.sample(s) for s in (5, 1000, 3)]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert resumed.candidates_drawn == straight.candidates_drawn
    # The state is a snapshot: drawing afterwards did not change it.
    again = RejectionSampler(name, seed=0, backend=backend, method=method)
    again.load_state_dict(state)
    assert torch.equal(again.sample(5), expected[0])


def test_load_state_dict_rejects_a_foreign_state():
    state = RejectionSampler("quartic", seed=1, backend="cpp").state_dict()
    with pytest.raises(ValueError, match="proposal"):
        RejectionSampler("triweight", seed=1, backend="cpp").load_state_dict(state)
    with pytest.raises(ValueError, match="backend"):
        RejectionSampler("quartic", seed=1, backend="reference").load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        RejectionSampler("quartic", seed=1, backend="cpp").load_state_dict({"proposal": "quartic"})
    with pytest.raises(TypeError):
        RejectionSampler("quartic", seed=1, backend="cpp").load_state_dict([1, 2])
    for key, bad in (("block_offset", -1), ("seed", 2**64), ("candidates_drawn", 1.5)):
        with pytest.raises(ValueError, match=key):
            RejectionSampler("quartic", seed=1, backend="cpp").load_state_dict({**state, key: bad})
    with pytest.raises(ValueError, match="buffer"):
        RejectionSampler("quartic", seed=1, backend="cpp").load_state_dict(
            {**state, "buffer": torch.zeros(3).double()}
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,bad",
    [
        ("quartic", 1.5),
        ("quartic", -1.0000001),
        ("quartic", float("nan")),
        ("quartic", float("inf")),
        ("gaussian", float("nan")),
        ("gaussian", float("-inf")),
    ],
)
def test_load_state_dict_refuses_a_corrupt_buffer(backend, name, bad):
    # A buffer value the kernel cannot produce would be served as a draw: refused,
    # and the sampler is left exactly as it was.
    source = RejectionSampler(name, seed=1, backend=backend)
    source.sample(10)
    state = source.state_dict()
    assert state["buffer"].numel() > 3
    state["buffer"][2] = bad
    target = RejectionSampler(name, seed=7, backend=backend)
    with pytest.raises(ValueError, match="corrupt"):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["seed"] == 7 and after["candidates_drawn"] == 0 and after["buffer"].numel() == 0
    expected = RejectionSampler(name, seed=7, backend=backend).sample(20)
    assert torch.equal(target.sample(20), expected)
    # Values at the support's ends are possible draws ('reference' can give u = -1).
    if SMOOTHING_KERNELS[name].bounded:
        state["buffer"][2] = -1.0
        target.load_state_dict(state)
        assert target.sample(3)[2] == -1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "key,bad,exc,match",
    [
        ("version", 2, ValueError, "version"),
        ("version", torch.tensor([1, 1]), ValueError, "version"),
        ("proposal", ["quartic"], ValueError, "proposal"),
        ("method", "transform", ValueError, "method"),
        ("backend", "numpy", ValueError, "backend"),
        ("rank", 1, ValueError, "rank"),
        ("rank", True, ValueError, "rank"),
        ("seed", -1, ValueError, "seed"),
        ("seed", 2**64, ValueError, "seed"),
        ("seed", 3.0, ValueError, "seed"),
        ("candidates_drawn", -5, ValueError, "candidates_drawn"),
        ("candidates_drawn", True, ValueError, "candidates_drawn"),
        ("buffer", [0.5], ValueError, "buffer"),
        ("buffer", torch.zeros(2, 2), ValueError, "buffer"),
        ("buffer", torch.zeros(2, dtype=torch.float16), ValueError, "buffer"),
    ],
)
def test_load_state_dict_refuses_bad_values(backend, key, bad, exc, match):
    sampler = RejectionSampler("quartic", seed=1, backend=backend)
    sampler.sample(10)
    state = sampler.state_dict()
    expected = [sampler.sample(5) for _ in range(2)]
    target = RejectionSampler("quartic", seed=1, backend=backend)
    target.load_state_dict(state)
    with pytest.raises(exc, match=match):
        target.load_state_dict({**state, key: bad})
    # Nothing was applied: the stream continues from the good state.
    for e in expected:
        assert torch.equal(target.sample(5), e)


@pytest.mark.parametrize(
    "backend,key,bad,match",
    [
        ("cpp", "block_offset", -1, "block_offset"),
        ("cpp", "block_offset", 2**48 + 1, "block_offset"),  # beyond rank 0's blocks
        ("cpp", "block_offset", 2.0, "block_offset"),
        ("reference", "generator_state", torch.zeros(7, dtype=torch.uint8), "generator_state"),
        ("reference", "generator_state", "state", "generator_state"),
    ],
)
def test_load_state_dict_refuses_a_bad_rng_state(backend, key, bad, match):
    sampler = RejectionSampler("quartic", seed=1, backend=backend)
    state = sampler.state_dict()
    expected = RejectionSampler("quartic", seed=1, backend=backend).sample(100)
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict({**state, key: bad})
    assert torch.equal(sampler.sample(100), expected)
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != key})


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(17)
    a = RejectionSampler("cosine", backend="cpp")
    torch.manual_seed(17)
    b = RejectionSampler("cosine", backend="cpp")
    c = RejectionSampler("cosine", backend="cpp")
    assert a.seed == b.seed != c.seed
    assert torch.equal(a.sample(100), b.sample(100))


def test_large_seed_uses_both_key_words():
    a = RejectionSampler("triweight", seed=2**64 - 1, backend="cpp").sample(1000)
    b = RejectionSampler("triweight", seed=2**32 - 1, backend="cpp").sample(1000)
    assert not torch.equal(a, b)
    assert np.array_equal(
        a.double().numpy(), expected_rejection_stream("triweight", 2**64 - 1, 0, 2000)[:1000]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(backend, dtype):
    x = RejectionSampler("epanechnikov", seed=1, backend=backend, dtype=dtype).sample((40, 50))
    assert x.dtype == dtype and x.shape == (40, 50)
    assert x.abs().max() <= 1
    if dtype == torch.float64:
        check_distribution("epanechnikov", x)


@pytest.mark.parametrize("shape", [(), 0, (0, 5), (3, 0, 2), [2, 3], torch.Size([4, 1, 2])])
def test_shapes(shape):
    x = RejectionSampler("tricube", seed=1, backend="cpp").sample(shape)
    expected = (shape,) if isinstance(shape, int) else tuple(shape)
    assert tuple(x.shape) == expected


# ------------------------------------------------------------------ rsample
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(
    shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4),
    name=st.sampled_from(PROPOSALS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_rsample_values_and_gradients(backend, shapes, name, dtype):
    mu_shape, sigma_shape = shapes.input_shapes
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(mu_shape, generator=gen, dtype=dtype, requires_grad=True)
    sigma = (torch.rand(sigma_shape, generator=gen, dtype=dtype) + 0.1).requires_grad_()
    z = RejectionSampler(name, seed=6, backend=backend, dtype=dtype).rsample(mu, sigma)
    eps = RejectionSampler(name, seed=6, backend=backend, dtype=dtype).sample(shapes.result_shape)
    assert z.shape == shapes.result_shape and z.dtype == dtype
    # z against float64 mu + sigma eps: one rounding (addcmul may fuse) of terms of
    # magnitude |mu| + |sigma eps|, so within one ulp of that.
    exact = mu.detach().double() + sigma.detach().double() * eps.double()
    ulp = torch.finfo(dtype).eps * (
        mu.detach().double().abs() + (sigma.detach().double() * eps.double()).abs()
    )
    assert torch.all((z.detach().double() - exact).abs() <= ulp)
    weight = torch.randn(z.shape, generator=gen, dtype=dtype)
    (z * weight).sum().backward()

    # Independent reduction: sum the leading axes, then the axes where the input had size 1.
    def reduce_to(t, shape):
        lead = t.dim() - len(shape)
        t = t.sum(dim=tuple(range(lead))) if lead else t
        dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
        return t.sum(dim=dims, keepdim=True) if dims else t

    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu.grad, reduce_to(weight, mu_shape), **tol)
    torch.testing.assert_close(sigma.grad, reduce_to(weight * eps, sigma_shape), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["tricube", "gaussian"])
def test_rsample_gradcheck(backend, name):
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(m, s):  # a fresh sampler per call: eps is the same for every evaluation
        return RejectionSampler(name, seed=10, backend=backend, dtype=torch.float64).rsample(m, s)

    assert torch.autograd.gradcheck(fn, (mu, sigma))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rsample_stays_in_support_after_rounding(backend, dtype):
    # |mu| up to ~1e7 with sigma down to 1e-8: mu +- sigma often rounds to mu itself.
    gen = torch.Generator().manual_seed(1)
    scale = 10.0 ** torch.randint(0, 7, (4000,), generator=gen)
    mu = (torch.randn(4000, generator=gen, dtype=torch.float64) * scale).to(dtype)
    sigma = (10.0 ** -torch.randint(0, 9, (4000,), generator=gen).double()).to(dtype)
    if dtype == torch.float16:  # keep mu and sigma inside float16's finite, nonzero range
        mu, sigma = mu.clamp(-6e4, 6e4), sigma.clamp(min=6e-8)
    z = RejectionSampler("uniform", seed=2, backend=backend, dtype=dtype).rsample(mu, sigma)
    assert torch.all(z >= mu - sigma) and torch.all(z <= mu + sigma)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsample_non_contiguous_inputs(backend):
    base = torch.randn(6, 5, dtype=torch.float64)
    mu = base.t().requires_grad_()  # (5, 6), non-contiguous
    sigma = (torch.rand(6, 10, dtype=torch.float64)[:, ::2].t() + 0.2).requires_grad_()  # strided
    z = RejectionSampler("quartic", seed=4, backend=backend, dtype=torch.float64).rsample(mu, sigma)
    eps = RejectionSampler("quartic", seed=4, backend=backend, dtype=torch.float64).sample((5, 6))
    torch.testing.assert_close(z, mu + sigma * eps, rtol=1e-15, atol=1e-15)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(5, 6, dtype=torch.float64))
    torch.testing.assert_close(sigma.grad, eps)


def test_rsample_saves_only_eps():
    mu = torch.zeros(5, requires_grad=True)
    sigma = torch.ones(5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = RejectionSampler("cosine", seed=2, backend="cpp").rsample(mu, sigma)
    assert len(saved) == 1 and torch.equal(saved[0], z.detach())  # eps = z here (mu 0, sigma 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rsample_follows_the_dtype_of_mu_and_sigma(backend):
    # Draws are made in the stream's work dtype and cast: for every dtype z is
    # mu + sigma * eps with the same eps (float32 grid values are exact in float64,
    # and rounded once to half precision).
    eps = RejectionSampler("quartic", seed=3, backend=backend).sample(50)
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.float32):
        mu = torch.linspace(-2, 2, 50, dtype=dtype)
        sigma = torch.full((50,), 0.5, dtype=dtype)
        z = RejectionSampler("quartic", seed=3, backend=backend).rsample(mu, sigma)
        assert z.dtype == dtype
        assert torch.equal(z, torch.addcmul(mu, sigma, eps.to(dtype)))


def test_rsample_forward_mode_and_double_backward():
    # Plain autograd underneath: forward-mode AD and double backward work, and agree
    # with the closed forms dz = dmu + dsigma * eps, d2z/dsigma2 = 0.
    mu = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.rand(4, 3, dtype=torch.float64) + 0.5
    eps = RejectionSampler("tricube", seed=1, backend="cpp", dtype=torch.float64).sample((4, 3))

    def fn(m, s):
        return RejectionSampler("tricube", seed=1, backend="cpp", dtype=torch.float64).rsample(m, s)

    dmu, dsigma = torch.randn_like(mu), torch.randn_like(sigma)
    _, tangent = torch.func.jvp(fn, (mu, sigma), (dmu, dsigma))
    torch.testing.assert_close(tangent, dmu + dsigma * eps, rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradgradcheck(fn, (mu.requires_grad_(), sigma.requires_grad_()))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_rsample_rejects_nonpositive_or_nonfinite_sigma(bad):
    sampler = RejectionSampler("triweight", seed=1, backend="cpp")
    sigma = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match="sigma"):
        sampler.rsample(torch.zeros(2), sigma)
    assert sampler.candidates_drawn == 0  # refused before any draw


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
            st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 5e-324, float("nan"), -float("nan")]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_sigma_check_on_bits_equals_the_float_definition(dtype, values):
    from ddvae_fast.sampling.sampler import _positive_finite

    x = torch.tensor(values, dtype=torch.float64).to(dtype)  # rounding may make 0 or inf
    if any(math.isnan(v) and math.copysign(1.0, v) < 0 for v in values):
        x = torch.where(torch.tensor(values).isnan(), -torch.tensor(float("nan")), x).to(dtype)
    assert _positive_finite(x) == bool(((x > 0) & (x < math.inf)).all())


def test_rsample_input_errors():
    s = RejectionSampler("triweight", seed=1, backend="cpp")
    with pytest.raises(ValueError, match="broadcast"):
        s.rsample(torch.zeros(3), torch.ones(4))
    with pytest.raises(TypeError, match="dtype"):
        s.rsample(torch.zeros(3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="mu must be a real floating"):
        s.rsample(torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="sigma must be a real floating"):
        s.rsample(torch.zeros(3), torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="device"):
        s.rsample(torch.zeros(3, device="meta"), torch.ones(3))
    with pytest.raises(ValueError, match="device meta"):
        s.rsample(torch.zeros(3, device="meta"), torch.ones(3, device="meta"))
    assert s.device == torch.device("cpu") and s.backend == "cpp"  # a refused move changes nothing
    with pytest.raises(TypeError, match="Tensor"):
        s.rsample(0.0, torch.ones(3))
    assert s.candidates_drawn == 0


# ------------------------------------------------------- fused rsample (cpp backend)
# For float32 and float64 mu the cpp backend writes z = mu + sigma * eps where the
# draws are made (csrc/sampler.cpp, Affine), rounded once, and checks sigma in the
# same pass; outputs of 8 MiB or more are written with non-temporal stores.
def _rounding_sensitive_inputs(n, dtype, seed):
    """mu up to 1e6 in magnitude with sigma down to 1e-6: z's rounding matters."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-2, 7, (n,), generator=gen).double()
    mu = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    sigma = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 6)
    return mu.to(dtype), sigma.to(dtype)


def _checked_positions(n, seed):
    """Both ends (the aligned head and the masked tail of a vector loop) and a sample."""
    gen = torch.Generator().manual_seed(seed)
    ends = torch.cat([torch.arange(min(n, 80)), torch.arange(max(n - 80, 0), n)])
    return torch.cat([ends, torch.randint(0, n, (1200,), generator=gen)]).unique()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [37, 5000, 2**20 + 5])  # 2^20 + 5: non-temporal stores (8 MiB)
@pytest.mark.parametrize("grad", [True, False])
def test_fused_rsample_is_the_correctly_rounded_fma(dtype, n, grad):
    mu, sigma = _rounding_sensitive_inputs(n, dtype, n)
    mu.requires_grad_(grad)
    sigma.requires_grad_(grad)
    sampler = RejectionSampler("triweight", seed=9, backend="cpp")
    twin = RejectionSampler("triweight", seed=9, backend="cpp")
    sampler.sample(11)  # the buffer then serves the call's first draws, refills the rest
    twin.sample(11)
    z = sampler.rsample(mu, sigma)
    eps = twin.sample(n)
    positions = _checked_positions(n, n)
    assert torch.equal(z.detach()[positions], fma_oracle(sigma, eps, mu, positions))
    assert z.dtype == dtype and z.shape == (n,)
    assert sampler.candidates_drawn == twin.candidates_drawn
    assert sampler.buffered == twin.buffered
    if grad:
        assert type(z.grad_fn).__name__ == "_ReparametrizeBackward"  # the fused path ran
        z.backward(torch.ones_like(z))
        assert torch.equal(sigma.grad, eps.to(dtype))
        assert torch.equal(mu.grad, torch.ones_like(mu))


def _raw_affine_refill(isa, dtype, need, eps_offset, park_all=False):
    """One cpp refill writing z (and eps at ``eps_offset`` elements into its tensor)."""
    n_blocks = need * 3 // 2 + 100  # triweight keeps ~46% of 2 candidates per block
    mu, sigma = _rounding_sensitive_inputs(need, dtype, 3)
    z = torch.full((need,), float("nan"), dtype=dtype)
    eps = torch.full((need + eps_offset,), float("nan"))
    buffer = torch.empty(n_blocks * 2)
    kept = cpp.refill(
        "rejection", "triweight", 21, 5, n_blocks, eps[eps_offset:].data_ptr(), need,
        buffer.data_ptr(), buffer.numel(), 2, isa, park_all, mu.data_ptr(), sigma.data_ptr(),
        z.data_ptr(), dtype == torch.float64,
    )  # fmt: skip
    assert kept >= need
    return z, eps[eps_offset:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "need,eps_offset,park_all", [(4099, 0, False), (2**20 + 3, 0, False), (2**20 + 3, 1, True)]
)
def test_fused_rsample_simd_and_scalar_paths_are_bit_identical(dtype, need, eps_offset, park_all):
    # eps_offset 1: eps is not aligned like z, so only z takes non-temporal stores.
    # park_all: every tile reaches the output through the parking path (test hook).
    if "avx512" not in cpp.supported_isas():
        pytest.skip("no AVX-512 on this CPU: only the scalar path exists")
    z_simd, eps_simd = _raw_affine_refill("avx512", dtype, need, eps_offset, park_all)
    z_scalar, eps_scalar = _raw_affine_refill("sse2", dtype, need, eps_offset)
    assert torch.equal(eps_simd, eps_scalar) and torch.equal(z_simd, z_scalar)
    positions = _checked_positions(need, 5)
    mu, sigma = _rounding_sensitive_inputs(need, dtype, 3)
    assert torch.equal(z_simd[positions], fma_oracle(sigma, eps_simd, mu, positions))


@pytest.mark.parametrize("where", ["buffered", "refilled", "last"])
@pytest.mark.parametrize("bad", [0.0, -0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype,grad", [(torch.float32, True), (torch.float64, False)])
def test_fused_rsample_refusal_leaves_the_stream_untouched(where, bad, dtype, grad):
    # The fused path checks sigma while it draws: a refused call must rewind the
    # RNG position, the candidates count and the buffer exactly.
    sampler = RejectionSampler("quartic", seed=4, backend="cpp")
    twin = RejectionSampler("quartic", seed=4, backend="cpp")
    sampler.sample(5)
    twin.sample(5)
    before = sampler.state_dict()
    assert before["buffer"].numel() > 3
    n = before["buffer"].numel() + 5000  # served from the buffer first, then a refill
    sigma = torch.ones(n, dtype=dtype)
    sigma[{"buffered": 1, "refilled": n // 2, "last": n - 1}[where]] = bad
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        sampler.rsample(torch.zeros(n, dtype=dtype, requires_grad=grad), sigma.requires_grad_(grad))
    after = sampler.state_dict()
    assert torch.equal(after.pop("buffer"), before.pop("buffer")) and after == before
    assert torch.equal(sampler.sample(n + 100), twin.sample(n + 100))


def test_rsample_runs_the_plain_graph_under_a_forward_mode_tangent():
    # The fused path's autograd Function has no forward-mode formula: with a dual
    # tensor rsample runs the plain graph (eps, then addcmul), tangent dmu + dsigma eps.
    mu, sigma = _rounding_sensitive_inputs(3000, torch.float32, 8)
    eps = RejectionSampler("cosine", seed=2, backend="cpp").sample(3000)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(sigma, torch.full_like(sigma, 2.0))
        z = RejectionSampler("cosine", seed=2, backend="cpp").rsample(mu, dual)
        value, tangent = torch.autograd.forward_ad.unpack_dual(z)
    assert torch.equal(value, torch.addcmul(mu, sigma, eps)) and torch.equal(tangent, 2 * eps)


# ------------------------------------------------------------------ construction errors
def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown proposal"):
        RejectionSampler("laplace")
    with pytest.raises(TypeError):
        RejectionSampler(3)
    with pytest.raises(ValueError, match="unknown backend"):
        RejectionSampler("uniform", backend="cuda_magic")
    with pytest.raises(ValueError, match="unknown method"):
        RejectionSampler("uniform", method="inverse")
    for name in set(KERNELS) - set(TRANSFORM_KERNELS):
        with pytest.raises(ValueError, match="no closed-form"):
            RejectionSampler(name, method="transform")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        RejectionSampler("uniform", backend="cpp", device="meta")
    with pytest.raises(TypeError, match="dtype"):
        RejectionSampler("uniform", dtype=torch.int32)
    with pytest.raises(ValueError, match="seed"):
        RejectionSampler("uniform", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        RejectionSampler("uniform", seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        RejectionSampler("uniform", seed=1.5)
    with pytest.raises(ValueError, match="device"):
        RejectionSampler("uniform", device="nonsense")


@pytest.mark.parametrize(
    "shape,exc",
    [
        ((-1, 3), ValueError),
        (-2, ValueError),
        ((2.5,), TypeError),
        ("12", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_shapes(shape, exc):
    with pytest.raises(exc):
        RejectionSampler("uniform", seed=1, backend="cpp").sample(shape)


def test_auto_backend_on_cpu_is_cpp_and_package_exports_the_class():
    s = ddf.RejectionSampler("quartic", seed=1)
    assert s.backend == "cpp" and isinstance(s, RejectionSampler)
    assert isinstance(repr(s), str)


# ------------------------------------------------------------------ per-rank streams
@pytest.mark.parametrize("name", ["triweight", "uniform"])
def test_cpp_rank_streams_are_disjoint_counter_ranges(name):
    # Rank r of a seed draws Philox blocks [r 2^48, (r + 1) 2^48) of that seed, per the
    # NumPy stream definition: for one key Philox is a bijection of the counter, so
    # the ranks' candidates are disjoint segments of one stream.
    seed = 2**40 + 3
    for rank in (0, 1, 5, 2**16 - 1):
        sampler = RejectionSampler(name, seed=seed, backend="cpp", rank=rank)
        got = sampler.sample(3000)
        state = sampler.state_dict()
        first = rank * 2**48
        assert state["rank"] == rank
        assert first <= state["block_offset"] < first + 2**48
        n_blocks = state["block_offset"] - first
        expected = expected_rejection_stream(name, seed, first, n_blocks)
        assert np.array_equal(got.double().numpy(), expected[:3000])
        assert sampler.buffered == len(expected) - 3000
    assert torch.equal(
        RejectionSampler(name, seed=seed, backend="cpp", rank=0).sample(100),
        RejectionSampler(name, seed=seed, backend="cpp").sample(100),
    )  # rank 0 is the stream of the seed alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["quartic", "gaussian"])
def test_rank_streams_differ_and_reproduce(backend, name):
    draws = {
        rank: RejectionSampler(name, seed=11, backend=backend, rank=rank).sample(4000)
        for rank in (0, 1, 2, 1000)
    }
    for rank, x in draws.items():
        again = RejectionSampler(name, seed=11, backend=backend, rank=rank).sample(4000)
        assert torch.equal(x, again)
    # Independent streams share a value only by chance on the float32 grid: a few
    # hundred of 4000 at most (a birthday count over ~2^24 grid points per unit
    # interval); shifted or repeated streams would share thousands.
    values = {rank: set(x.tolist()) for rank, x in draws.items()}
    for a in draws:
        for b in draws:
            if a < b:
                assert len(values[a] & values[b]) < 200, (a, b)


def test_reference_rank_seeds_are_distinct():
    from ddvae_fast.sampling.reference import stream_seed

    for seed in (0, 1, 2**32 - 1, 2**63 + 12345):
        seeds = [stream_seed(seed, rank) for rank in range(4096)]
        assert seeds[0] == seed
        assert all(0 <= s < 2**64 for s in seeds)
        # torch's CPU generator reads only the low 32 bits: distinct there too.
        assert len({s & 0xFFFFFFFF for s in seeds}) == 4096
    assert stream_seed(5, 1) != stream_seed(6, 0) and stream_seed(5, 1) != 6


def test_rank_is_saved_and_checked_on_load():
    a = RejectionSampler("cosine", seed=3, backend="cpp", rank=2)
    a.sample(10)
    state = a.state_dict()
    with pytest.raises(ValueError, match="rank"):
        RejectionSampler("cosine", seed=3, backend="cpp", rank=1).load_state_dict(state)
    b = RejectionSampler("cosine", seed=3, backend="cpp", rank=2)
    b.load_state_dict(state)
    assert torch.equal(b.sample(500), a.sample(500))
    old = {k: v for k, v in RejectionSampler("cosine", seed=3, backend="cpp").state_dict().items()}
    del old["rank"]  # a state saved before ranks existed is rank 0
    RejectionSampler("cosine", seed=3, backend="cpp").load_state_dict(old)
    with pytest.raises(ValueError, match="rank"):
        RejectionSampler("cosine", seed=3, backend="cpp", rank=1).load_state_dict(old)


def test_a_rank_that_used_up_its_blocks_raises_instead_of_entering_the_next():
    sampler = RejectionSampler("triweight", seed=1, backend="cpp", rank=4)
    state = sampler.state_dict()
    sampler.load_state_dict({**state, "block_offset": 5 * 2**48 - 1000})
    sampler.sample(10)  # a small refill (256 candidates, 128 blocks) still fits
    with pytest.raises(OverflowError, match="rank 4"):
        sampler.sample(10_000)
    last = RejectionSampler("uniform", seed=1, backend="cpp", rank=2**16 - 1)
    last.load_state_dict({**last.state_dict(), "block_offset": 2**64 - 100})
    with pytest.raises(OverflowError):
        last.sample(10_000)


@pytest.mark.parametrize(
    "rank,exc", [(-1, ValueError), (2**16, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_rank(rank, exc):
    with pytest.raises(exc, match="rank"):
        RejectionSampler("cosine", seed=1, backend="cpp", rank=rank)
