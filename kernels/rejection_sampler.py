"""Triton kernels of the RejectionSampler stream (DD-VAE, Section 2.1).

Host code: ddvae_fast/sampling/triton.py.

The random stream is the one csrc/sampler.cpp defines (see its header):
Philox4x32-10 (``tl.randint4x``: key = the 64-bit seed, counter = (block_lo,
block_hi, 0, 0)) gives words w0..w3 per block; rejection candidate i uses
block i >> 1 and words (w0, w1) or (w2, w3) by parity, u = sym(first),
v = unit(second), and keeps u iff g(u) > v, g = K/K(0), evaluated with the same
float operations in the same order as the C++ code. Kernels are launched with
``enable_fp_fusion=False`` so that a GPU does not contract those into FMAs:
with exact uniforms, correctly rounded fp32 mul/add and no fusion, this backend
and 'cpp' keep the same candidates (checked bit-for-bit under the interpreter).

Rejection refill (two passes, because a program cannot know how many draws the
programs before it kept without waiting for them):
  1. ``rejection_count_kernel``: each program generates its BLOCK Philox
     blocks (2 BLOCK candidates), runs the accept test and stores its count.
  2. ``torch.cumsum`` of the counts gives every program its output offset.
  3. ``rejection_write_kernel``: each program regenerates the same counters
     (Philox is cheap next to memory traffic), ranks its accepted candidates
     with ``tl.cumsum`` and writes them at offset + rank: stream positions
     below ``need`` go to ``out``, the rest to the sampler's buffer.
Order is the candidate order, fixed by the scan; no atomics are involved. The
host reads the total once per refill (``RejectionSampler`` does the .item()).

Transforms and Box-Muller keep every draw, so one kernel writes them at their
fixed stream positions and the host needs no count at all.

All offsets are int64; every load/store is masked; BLOCK is a constexpr power
of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 512  # Philox blocks per program: 1024 rejection candidates


def _taylor_coefficients() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """sin(pi/2 x) = sum s_k x^(2k+1), cos(pi/2 x) = sum c_k x^(2k), k = 0..6.

    The same double recurrences as make_taylor() in csrc/sampler.cpp, so the
    float32-rounded constants agree.
    """
    h = 1.5707963267948966
    st, ct, s, c = h, 1.0, [], []
    for k in range(7):
        s.append(st)
        c.append(ct)
        st = st * (-(h * h)) / float((2 * k + 2) * (2 * k + 3))
        ct = ct * (-(h * h)) / float((2 * k + 1) * (2 * k + 2))
    return tuple(s), tuple(c)


_SIN, _COS = _taylor_coefficients()
_S0, _S1, _S2, _S3, _S4, _S5, _S6 = (tl.constexpr(x) for x in _SIN)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (tl.constexpr(x) for x in _COS)


@triton.jit
def _sym(w):
    # (2 (w >> 9) + 1 - 2^23) * 2^-23: odd-symmetric grid in (-1, 1), exact in fp32
    t = ((w >> 9) << 1).to(tl.int32, bitcast=True) + (1 - 8388608)
    return t.to(tl.float32) * 1.1920928955078125e-07


@triton.jit
def _unit(w):
    return (w >> 8).to(tl.int32, bitcast=True).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _shape(u, KERNEL: tl.constexpr):
    """g(u) = K(u) / K(0), the same operation sequence as shape_g in csrc/sampler.cpp."""
    if KERNEL == "uniform":
        g = tl.full(u.shape, 1.0, tl.float32)
    elif KERNEL == "triangular":
        g = 1.0 - tl.abs(u)
    elif KERNEL == "epanechnikov":
        g = 1.0 - u * u
    elif KERNEL == "quartic":
        s = 1.0 - u * u
        g = s * s
    elif KERNEL == "triweight":
        s = 1.0 - u * u
        g = (s * s) * s
    elif KERNEL == "tricube":
        a = tl.abs(u)
        t = 1.0 - (a * a) * a
        g = (t * t) * t
    else:
        tl.static_assert(KERNEL == "cosine", "unknown kernel")
        # cos(pi u / 2) = sin(pi/2 (1 - |u|)); 1 - |u| is exact on the grid
        y = 1.0 - tl.abs(u)
        y2 = y * y
        p = tl.full(u.shape, _S6, tl.float32)
        p = p * y2 + _S5
        p = p * y2 + _S4
        p = p * y2 + _S3
        p = p * y2 + _S2
        p = p * y2 + _S1
        p = p * y2 + _S0
        g = y * p
    return g


@triton.jit
def _rejection_candidates(
    seed, block_offset, n_blocks, pid, KERNEL: tl.constexpr, BLOCK: tl.constexpr
):
    """The 2 BLOCK candidates of program ``pid`` in candidate order, and which are kept."""
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, block_offset + local)
    u = tl.interleave(_sym(w0), _sym(w2))
    v = tl.interleave(_unit(w1), _unit(w3))
    cand = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK).to(tl.int64)
    keep = (_shape(u, KERNEL) > v) & (cand < n_blocks.to(tl.int64) * 2)
    return u, keep


# The scalar arguments carry fixed types: Triton would otherwise type an int
# argument by its value (i32 below 2^31, i64, u64 from 2^63), so seeds and
# counter offsets of different sizes would compile different variants, and
# its value specializations (== 1, divisible by 16) would add more.
@triton.jit(do_not_specialize=["seed", "block_offset", "n_blocks"])
def rejection_count_kernel(
    counts_ptr,
    seed: tl.uint64,
    block_offset: tl.uint64,
    n_blocks: tl.int64,
    KERNEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _, keep = _rejection_candidates(seed, block_offset, n_blocks, pid, KERNEL, BLOCK)
    tl.store(counts_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["seed", "block_offset", "n_blocks", "need"])
def rejection_write_kernel(
    out_ptr,
    buffer_ptr,
    ends_ptr,
    seed: tl.uint64,
    block_offset: tl.uint64,
    n_blocks: tl.int64,
    need: tl.int64,
    KERNEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    u, keep = _rejection_candidates(seed, block_offset, n_blocks, pid, KERNEL, BLOCK)
    keep_i = keep.to(tl.int32)
    rank = tl.cumsum(keep_i, axis=0) - keep_i  # exclusive rank inside the program
    start = tl.load(ends_ptr + pid) - tl.sum(keep_i, axis=0).to(tl.int64)
    pos = start + rank.to(tl.int64)
    tl.store(out_ptr + pos, u, mask=keep & (pos < need))
    tl.store(buffer_ptr + (pos - need), u, mask=keep & (pos >= need))


@triton.jit
def _interleave4(a0, a1, a2, a3):
    """Flat [4 N] with a0[j], a1[j], a2[j], a3[j] at 4j .. 4j + 3."""
    x = tl.join(tl.join(a0, a2), tl.join(a1, a3))
    return tl.reshape(x, [4 * a0.shape[0]])


@triton.jit
def _asin_over_half_pi(x):
    """(2/pi) asin(x) on (-1, 1): the Cephes asinf polynomial, as in csrc/sampler.cpp."""
    a = tl.abs(x)
    big = a > 0.5
    z = tl.where(big, 0.5 * (1.0 - a), a * a)
    s = tl.where(big, tl.sqrt_rn(z), a)
    p = tl.full(x.shape, 4.2163199048e-2, tl.float32)
    p = p * z + 2.4181311049e-2
    p = p * z + 4.5470025998e-2
    p = p * z + 7.4953002686e-2
    p = p * z + 1.6666752422e-1
    p = (p * z) * s + s
    r = tl.where(big, 1.0 - 1.2732395447351628 * p, 0.6366197723675814 * p)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _log_positive(x):
    """log(x) for normal x > 0: the branch-free Cephes logf of csrc/sampler.cpp."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23  # x = m 2^e, m in [sqrt(1/2), sqrt(2)); arithmetic shift
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    f = m - 1.0
    ef = e.to(tl.float32)
    z = f * f
    y = tl.full(x.shape, 7.0376836292e-2, tl.float32)
    y = y * f + -1.1514610310e-1
    y = y * f + 1.1676998740e-1
    y = y * f + -1.2420140846e-1
    y = y * f + 1.4249322787e-1
    y = y * f + -1.6668057665e-1
    y = y * f + 2.0000714765e-1
    y = y * f + -2.4999993993e-1
    y = y * f + 3.3333331174e-1
    y = (y * f) * z
    y = y + -2.12194440e-4 * ef
    y = y + -0.5 * z
    r = f + y
    return r + 0.693359375 * ef


@triton.jit
def _sincos_two_pi(t):
    """(sin 2 pi t, cos 2 pi t), t in [0, 1): exact quadrant, Taylor on [-pi/4, pi/4]."""
    q = t * 4.0
    k = (q + 0.5).to(tl.int32)
    f = q - k.to(tl.float32)
    f2 = f * f
    sp = tl.full(t.shape, _S6, tl.float32)
    cp = tl.full(t.shape, _C6, tl.float32)
    sp = sp * f2 + _S5
    cp = cp * f2 + _C5
    sp = sp * f2 + _S4
    cp = cp * f2 + _C4
    sp = sp * f2 + _S3
    cp = cp * f2 + _C3
    sp = sp * f2 + _S2
    cp = cp * f2 + _C2
    sp = sp * f2 + _S1
    cp = cp * f2 + _C1
    sp = sp * f2 + _S0
    cp = cp * f2 + _C0
    sp = f * sp
    quadrant = k & 3
    s = tl.where(quadrant == 1, cp, tl.where(quadrant == 2, -sp, tl.where(quadrant == 3, -cp, sp)))
    c = tl.where(quadrant == 1, -sp, tl.where(quadrant == 2, -cp, tl.where(quadrant == 3, sp, cp)))
    return s, c


@triton.jit
def _box_muller(a, b):
    u1 = ((a >> 8) + 1).to(tl.int32, bitcast=True).to(tl.float32) * 5.9604644775390625e-08
    r = tl.sqrt_rn(-2.0 * _log_positive(u1))
    s, c = _sincos_two_pi(_unit(b))
    return r * c, r * s


@triton.jit(do_not_specialize=["seed", "block_offset", "n_blocks", "need"])
def transform_kernel(
    out_ptr,
    buffer_ptr,
    seed: tl.uint64,
    block_offset: tl.uint64,
    n_blocks: tl.int64,
    need: tl.int64,
    MODE: tl.constexpr,
    KERNEL: tl.constexpr,
    PER_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Every draw is kept: draw k of block j sits at stream position PER_BLOCK j + k."""
    pid = tl.program_id(0)
    local = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, block_offset + local)
    if MODE == "gaussian":
        z0, z1 = _box_muller(w0, w1)
        z2, z3 = _box_muller(w2, w3)
        draws = _interleave4(z0, z1, z2, z3)
    elif KERNEL == "uniform":
        draws = _interleave4(_sym(w0), _sym(w1), _sym(w2), _sym(w3))
    elif KERNEL == "triangular":
        draws = tl.interleave((_sym(w0) + _sym(w1)) * 0.5, (_sym(w2) + _sym(w3)) * 0.5)
    elif KERNEL == "epanechnikov":
        x1 = _sym(w0)
        x2 = _sym(w1)
        x3 = _sym(w2)
        a3 = tl.abs(x3)
        draws = tl.where((a3 >= tl.abs(x2)) & (a3 >= tl.abs(x1)), x2, x3)
    else:
        tl.static_assert(KERNEL == "cosine", "no closed-form transform for this kernel")
        draws = _interleave4(
            _asin_over_half_pi(_sym(w0)),
            _asin_over_half_pi(_sym(w1)),
            _asin_over_half_pi(_sym(w2)),
            _asin_over_half_pi(_sym(w3)),
        )
    pos = pid.to(tl.int64) * (PER_BLOCK * BLOCK) + tl.arange(0, PER_BLOCK * BLOCK).to(tl.int64)
    valid = pos < n_blocks.to(tl.int64) * PER_BLOCK
    tl.store(out_ptr + pos, draws, mask=valid & (pos < need))
    tl.store(buffer_ptr + (pos - need), draws, mask=valid & (pos >= need))


def draws_per_block(mode: str, kernel: str) -> int:
    """Candidates (rejection) or draws per Philox block in this stream (as csrc/sampler.cpp)."""
    if mode == "rejection":
        return 2
    if mode == "gaussian":
        return 4
    return {"uniform": 4, "triangular": 2, "epanechnikov": 1, "cosine": 4}[kernel]
