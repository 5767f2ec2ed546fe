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

No host synchronisation: the sampler's bookkeeping lives on the device, in a
``counters`` tensor (int64: buffer head, buffered count, Philox block offset,
candidates drawn, error flag), and a call of n draws is two launches (three
for rejection) that read and update it, whatever the buffer holds:
  1. ``device_plan_kernel``: every program reads the counters and derives the
     call's plan: take = min(count, n) draws from the buffer, need = n - take,
     and the refill size for ``need`` (RejectionSampler's policy, the same
     float64 operations, so the same size as on the host; ``_refill_units``).
     It copies the buffered draws to the output and, for rejection, counts
     the kept candidates of each tile of the refill; program 0 stores the plan.
  2. ``torch.cumsum`` of the counts gives every tile its output offset
     (rejection only; transforms keep every draw at a fixed position).
  3. ``device_write_kernel``: each tile regenerates its candidates (Philox is
     cheap next to memory traffic), ranks the kept ones with ``tl.cumsum`` and
     writes them at offset + rank: stream positions below ``need`` to the
     output, the rest to the buffer. Program 0 then runs the rare short refill
     (kept < need: further refills, sized by the same policy, until ``need``
     is met, in one program) and writes the new counters.
Order is the candidate order, fixed by the scan; no atomics are involved.
Programs loop over tiles (a grid of at most a few programs per SM), and the
loop bounds come from the device, so the grid is sized on the host from upper
bounds only.

``rsample``'s fused draw: with ``affine`` set, the draws bound for the output
also give z = fma(sigma, eps, mu) (float32, one rounding, as csrc/sampler.cpp),
and eps itself is stored only if ``keep_eps``.

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


@triton.jit
def _tile_candidates(seed, first_block, tile, n_blocks, KERNEL: tl.constexpr, BLOCK: tl.constexpr):
    """The 2 BLOCK candidates of refill tile ``tile`` in candidate order, and which are
    kept; the refill is blocks [first_block, first_block + n_blocks)."""
    local = tl.arange(0, BLOCK).to(tl.int64) + tile * BLOCK
    w0, w1, w2, w3 = tl.randint4x(seed, first_block + local.to(tl.uint64))
    u = tl.interleave(_sym(w0), _sym(w2))
    v = tl.interleave(_unit(w1), _unit(w3))
    cand = tl.arange(0, 2 * BLOCK).to(tl.int64) + tile * (2 * BLOCK)
    keep = (_shape(u, KERNEL) > v) & (cand < n_blocks * 2)
    return u, keep


@triton.jit
def _tile_draws(
    seed, first_block, tile, MODE: tl.constexpr, KERNEL: tl.constexpr, BLOCK: tl.constexpr
):
    """The PER_BLOCK * BLOCK draws of transform / Box-Muller tile ``tile``, in stream order."""
    local = tl.arange(0, BLOCK).to(tl.int64) + tile * BLOCK
    w0, w1, w2, w3 = tl.randint4x(seed, first_block + local.to(tl.uint64))
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
    return draws


@triton.jit
def _refill_units(
    need,
    candidates,
    acceptance,
    rejection,
    units_cap,
    UNIT: tl.constexpr,
    SLACK_SIGMAS: tl.constexpr,
    MIN_REFILL: tl.constexpr,
    MAX_REFILL_FLOOR: tl.constexpr,
    REFILL_FRACTION: tl.constexpr,
):
    """RejectionSampler._refill_units(need) (0 for need = 0), capped at units_cap.

    The same float64 operations in the same order as the Python code
    (need / a + SLACK * sqrt(need * (1 - a)) / a, ``rejection`` = 1 - a), each
    correctly rounded (IEEE division and square root, no contraction), so the
    size is the host's to the bit.
    """
    need_f = need.to(tl.float64)
    expected = need_f / acceptance + SLACK_SIGMAS * tl.sqrt(need_f * rejection) / acceptance
    units = tl.math.ceil(expected).to(tl.int64)
    floor = tl.maximum(tl.minimum(candidates // REFILL_FRACTION, MAX_REFILL_FLOOR), MIN_REFILL)
    units = tl.maximum(units, floor)
    units = (units + (UNIT - 1)) // UNIT * UNIT
    return tl.where(need > 0, tl.minimum(units, units_cap), 0)


@triton.jit
def _place(
    values,
    pos,
    keep,
    take,
    need,
    out_ptr,
    z_ptr,
    mu_ptr,
    sigma_ptr,
    buffer_ptr,
    keep_eps,
    affine,
):
    """Draws at stream positions ``pos`` (relative to the refill) where ``keep``:
    below ``need`` to the output (after the ``take`` served from the buffer; as
    eps if keep_eps, as z = fma(sigma, eps, mu) if affine), the rest to the buffer."""
    to_out = keep & (pos < need)
    at = take + pos
    if keep_eps != 0:
        tl.store(out_ptr + at, values, mask=to_out)
    if affine != 0:
        mu = tl.load(mu_ptr + at, mask=to_out, other=0.0)
        sigma = tl.load(sigma_ptr + at, mask=to_out, other=0.0)
        tl.store(z_ptr + at, tl.fma(sigma, values, mu), mask=to_out)
    tl.store(buffer_ptr + (pos - need), values, mask=keep & (pos >= need))


# Scalar arguments carry fixed types: Triton would otherwise type an int
# argument by its value (i32 below 2^31, i64, u64 from 2^63) and specialize on
# values (== 1, divisible by 16), so seeds and sizes would compile variants.
_SCALARS = ["n", "seed", "rank_first", "keep_eps", "affine", "acceptance", "rejection", "units_cap"]


@triton.jit(do_not_specialize=_SCALARS)
def device_plan_kernel(
    counters_ptr,
    plan_ptr,
    counts_ptr,
    out_ptr,
    z_ptr,
    mu_ptr,
    sigma_ptr,
    buffer_ptr,
    n: tl.int64,
    seed: tl.uint64,
    rank_first: tl.uint64,
    keep_eps: tl.int32,
    affine: tl.int32,
    acceptance: tl.float64,
    rejection: tl.float64,
    units_cap: tl.int64,
    MODE: tl.constexpr,
    KERNEL: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    SLACK_SIGMAS: tl.constexpr,
    MIN_REFILL: tl.constexpr,
    MAX_REFILL_FLOOR: tl.constexpr,
    REFILL_FRACTION: tl.constexpr,
):
    """Step 1 of a call (module docstring): the plan, the buffered draws, the counts."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    head = tl.load(counters_ptr)
    count = tl.load(counters_ptr + 1)
    first_block = tl.load(counters_ptr + 2).to(tl.uint64, bitcast=True)
    candidates = tl.load(counters_ptr + 3)
    take = tl.minimum(count, n)
    need = n - take
    units = tl.zeros((), tl.int64)
    if need > 0:  # a branch, not a select: the interpreter then skips the call too
        units = _refill_units(
            need, candidates, acceptance, rejection, units_cap,
            UNIT, SLACK_SIGMAS, MIN_REFILL, MAX_REFILL_FLOOR, REFILL_FRACTION,
        )  # fmt: skip
    n_blocks = units // UNIT
    n_tiles = (n_blocks + (BLOCK - 1)) // BLOCK
    for chunk in range(pid, (take + (COPY - 1)) // COPY, programs):
        at = tl.arange(0, COPY).to(tl.int64) + chunk * COPY
        served = at < take
        values = tl.load(buffer_ptr + head + at, mask=served, other=0.0)
        _place(
            values, at, served, 0, take, out_ptr, z_ptr, mu_ptr, sigma_ptr, buffer_ptr,
            keep_eps, affine,
        )  # fmt: skip
    if MODE == "rejection":
        for tile in range(pid, n_tiles, programs):
            _, keep = _tile_candidates(seed, first_block, tile, n_blocks, KERNEL, BLOCK)
            tl.store(counts_ptr + tile, tl.sum(keep.to(tl.int32), axis=0))
    if pid == 0:
        tl.store(plan_ptr, take)
        tl.store(plan_ptr + 1, need)
        tl.store(plan_ptr + 2, units)
        tl.store(plan_ptr + 3, n_blocks)
        tl.store(plan_ptr + 4, n_tiles)
        tl.store(plan_ptr + 5, first_block.to(tl.int64, bitcast=True))
        tl.store(plan_ptr + 6, candidates)


@triton.jit
def _short_refills(
    kept,
    take,
    need,
    offset,
    candidates,
    out_ptr,
    z_ptr,
    mu_ptr,
    sigma_ptr,
    buffer_ptr,
    seed,
    rank_first,
    keep_eps,
    affine,
    acceptance,
    rejection,
    units_cap,
    KERNEL: tl.constexpr,
    BLOCK: tl.constexpr,
    SLACK_SIGMAS: tl.constexpr,
    MIN_REFILL: tl.constexpr,
    MAX_REFILL_FLOOR: tl.constexpr,
    REFILL_FRACTION: tl.constexpr,
    BLOCKS_PER_RANK: tl.constexpr,
):
    """Further refills, in one program, while kept < need: the host loop of
    RejectionSampler._fill, refill for refill. Each draws the policy's size for
    the draws still missing and places its kept candidates after those already
    kept. Returns (kept, offset, candidates, error); error = 1 if a refill would
    have run past the rank's Philox blocks (it is not drawn)."""
    error = tl.zeros((), tl.int64)
    while (kept < need) & (error == 0):
        units = _refill_units(
            need - kept, candidates, acceptance, rejection, units_cap,
            2, SLACK_SIGMAS, MIN_REFILL, MAX_REFILL_FLOOR, REFILL_FRACTION,
        )  # fmt: skip
        n_blocks = units // 2
        used = (offset - rank_first).to(tl.int64, bitcast=True)
        if used + n_blocks > BLOCKS_PER_RANK:
            error = error + 1
        else:
            for tile in range(0, (n_blocks + (BLOCK - 1)) // BLOCK):
                u, keep = _tile_candidates(seed, offset, tile, n_blocks, KERNEL, BLOCK)
                keep_i = keep.to(tl.int32)
                pos = kept + (tl.cumsum(keep_i, axis=0) - keep_i).to(tl.int64)
                _place(
                    u, pos, keep, take, need, out_ptr, z_ptr, mu_ptr, sigma_ptr, buffer_ptr,
                    keep_eps, affine,
                )  # fmt: skip
                kept = kept + tl.sum(keep_i, axis=0).to(tl.int64)
            offset = offset + n_blocks.to(tl.uint64)
            candidates = candidates + units
    return kept, offset, candidates, error


@triton.jit(do_not_specialize=_SCALARS)
def device_write_kernel(
    counters_ptr,
    plan_ptr,
    ends_ptr,
    out_ptr,
    z_ptr,
    mu_ptr,
    sigma_ptr,
    buffer_ptr,
    n: tl.int64,
    seed: tl.uint64,
    rank_first: tl.uint64,
    keep_eps: tl.int32,
    affine: tl.int32,
    acceptance: tl.float64,
    rejection: tl.float64,
    units_cap: tl.int64,
    MODE: tl.constexpr,
    KERNEL: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK: tl.constexpr,
    COPY: tl.constexpr,
    SLACK_SIGMAS: tl.constexpr,
    MIN_REFILL: tl.constexpr,
    MAX_REFILL_FLOOR: tl.constexpr,
    REFILL_FRACTION: tl.constexpr,
    BLOCKS_PER_RANK: tl.constexpr,
):
    """Step 3 of a call (module docstring): the refill's draws, then (program 0)
    any short refill and the new counters. The other programs read only the
    plan, so program 0 may rewrite the counters while they still work."""
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    take = tl.load(plan_ptr)
    need = tl.load(plan_ptr + 1)
    units = tl.load(plan_ptr + 2)
    n_blocks = tl.load(plan_ptr + 3)
    n_tiles = tl.load(plan_ptr + 4)
    first_block = tl.load(plan_ptr + 5).to(tl.uint64, bitcast=True)
    for tile in range(pid, n_tiles, programs):
        if MODE == "rejection":
            u, keep = _tile_candidates(seed, first_block, tile, n_blocks, KERNEL, BLOCK)
            keep_i = keep.to(tl.int32)
            start = tl.load(ends_ptr + tile) - tl.sum(keep_i, axis=0).to(tl.int64)
            pos = start + (tl.cumsum(keep_i, axis=0) - keep_i).to(tl.int64)
            _place(
                u, pos, keep, take, need, out_ptr, z_ptr, mu_ptr, sigma_ptr, buffer_ptr,
                keep_eps, affine,
            )  # fmt: skip
        else:
            draws = _tile_draws(seed, first_block, tile, MODE, KERNEL, BLOCK)
            pos = tl.arange(0, UNIT * BLOCK).to(tl.int64) + tile * (UNIT * BLOCK)
            _place(
                draws, pos, pos < n_blocks * UNIT, take, need, out_ptr, z_ptr, mu_ptr,
                sigma_ptr, buffer_ptr, keep_eps, affine,
            )  # fmt: skip
    if pid == 0:
        head = tl.load(counters_ptr)
        count = tl.load(counters_ptr + 1)
        candidates = tl.load(plan_ptr + 6) + units
        offset = first_block + n_blocks.to(tl.uint64)
        error = tl.load(counters_ptr + 4)
        if MODE == "rejection":
            last = tl.maximum(n_tiles - 1, 0)
            kept = tl.load(ends_ptr + last, mask=n_tiles > 0, other=0)
            if kept < need:  # rare: the refill's slack was not enough
                kept, offset, candidates, short_error = _short_refills(
                    kept, take, need, offset, candidates, out_ptr, z_ptr, mu_ptr, sigma_ptr,
                    buffer_ptr, seed, rank_first, keep_eps, affine, acceptance, rejection,
                    units_cap, KERNEL, BLOCK, SLACK_SIGMAS, MIN_REFILL, MAX_REFILL_FLOOR,
                    REFILL_FRACTION, BLOCKS_PER_RANK,
                )  # fmt: skip
                error = error + short_error
        else:
            kept = n_blocks * UNIT
        refilled = need > 0
        tl.store(counters_ptr, tl.where(refilled, 0, head + take))
        tl.store(counters_ptr + 1, tl.where(refilled, tl.maximum(kept - need, 0), count - take))
        tl.store(counters_ptr + 2, offset.to(tl.int64, bitcast=True))
        tl.store(counters_ptr + 3, candidates)
        tl.store(counters_ptr + 4, error)


def draws_per_block(mode: str, kernel: str) -> int:
    """Candidates (rejection) or draws per Philox block in this stream (as csrc/sampler.cpp)."""
    if mode == "rejection":
        return 2
    if mode == "gaussian":
        return 4
    return {"uniform": 4, "triangular": 2, "epanechnikov": 1, "cosine": 4}[kernel]
