"""The 'cpp' relaxed arg-max backend (csrc/relaxed_argmax.cpp + ddvae_fast/loss/cpp.py).

Every result is compared with an independent float64 computation written here
in plain PyTorch (direct formulas of docs/loss_backend_contract.md; the gradient by
autograd of the float64 loss), for every instruction-set copy of the kernel
this CPU runs (AVX-512, AVX2, SSE2).

Tolerances come from a first-order rounding-error analysis of the kernel's
arithmetic (``error_bounds``): with u the unit roundoff of the logits dtype
(2^-24 for float32, 2^-53 for float64), z = fl(fl(r_s - r_t) / tau + c) is
off by about u (|z| + |c| + |r_s - r_t|/tau) (+ the error of the softmax in
prob mode, ~u (|l - max| + 12) relative), which softplus and sigmoid pass on
with their derivatives; the polynomials add <= 2.2 ulp; per-lane fp32 partial
sums take <= 8 additions before going to fp64 (<= ~12 u relative on a row sum).
A row loss therefore gets sum_s [sigmoid(z_s) dz_s + 12 u softplus(z_s)], and
similarly for the nll and each gradient entry. Tests allow SAFETY times that
bound (4 for float32, 8 for float64, where the oracle rounds as much as the
kernel; over 150 random cases the largest observed error/bound was 0.86 for
float32 and 1.6 for float64, so the bounds are tight, not vacuous), plus the
underflow floor: the kernel's exp returns 0 below EXP_LO = -87 (fp32) /
-708 (fp64), and subnormals are flushed, an absolute error < exp(EXP_LO) per term.
A fixed rtol would be either vacuous for confident rows (loss ~1e-20) or wrong
for tau = 1e-4 with |logits| = 1e4 (z ~ 1e8).

bfloat16 / float16 logits are tested three ways (cpp and the reference
backend on the same 16-bit logits, both against float64; see
check_half_three_way), and NaN / +-inf / tied rows against the reference's
correct_rows, the definition of a correct row.

The `math` entry point used below is a test hook: the module must be built
with DDVAE_FAST_TEST_HOOKS=1 (./run.sh does), otherwise these tests fail.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import log_odds
from oracles import loss_oracle as oracle

# Import the compiled module directly: if it is missing, collecting this file
# fails (the tests must not skip into passing).
import ddvae_fast._relaxed_argmax as ext
from ddvae_fast.loss.cpp import forward as relaxed_argmax_forward
from ddvae_fast.loss.cpp import supported_isas

ISAS = supported_isas()
DTYPES = (torch.float32, torch.float64)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
EXP_LO = {torch.float32: -87.0, torch.float64: -708.0}
SAFETY = {torch.float32: 4.0, torch.float64: 8.0}


def test_every_isa_copy_is_listed():
    # sse2 is the baseline every x86-64 CPU runs; the list is best-first.
    assert ISAS[-1] == "sse2"
    assert set(ISAS) <= {"avx512", "avx2", "sse2"}


# --------------------------------------------------------------------------
# The independent float64 oracle and the error bounds
# --------------------------------------------------------------------------


def error_bounds(logits, target, tau, prob_mode, ignore_index, aw, nw, scale):
    """First-order bounds on |kernel - exact| for (argmax_rows, nll_rows, grad)."""
    dtype = logits.dtype
    u = UNIT_ROUNDOFF[dtype]
    x = logits.detach().to(torch.float64)
    num_rows, num_classes = x.shape
    valid = (target != ignore_index).unsqueeze(1)
    t = torch.where(valid.squeeze(1), target, torch.zeros_like(target)).unsqueeze(1)
    others = torch.arange(num_classes).unsqueeze(0) != t
    is_t = ~others
    c = log_odds(tau)
    m = x.amax(1, keepdim=True) if num_rows else x.sum(1, keepdim=True)
    p = torch.softmax(x, dim=1)
    lse = torch.logsumexp(x, 1, keepdim=True)
    x_t = x.gather(1, t)
    if prob_mode:
        # p = exp(fl(l - max)) * fl(1/S): the exp argument's rounding, the
        # polynomial, the sum and the reciprocal
        dp = p * u * ((x - m).abs() + 12.0)
        r, dr = p, dp
    else:
        r, dr = x, torch.zeros_like(x)
    r_t, dr_t = r.gather(1, t), dr.gather(1, t)
    z = (r - r_t) / tau + c
    dz = (dr + dr_t) / tau + u * (2.0 * (r - r_t).abs() / tau + 2.0 * abs(c) + z.abs())
    sig = torch.sigmoid(z)
    softplus = torch.logaddexp(z, torch.zeros_like(z))
    floor = math.exp(EXP_LO[dtype]) * num_classes  # flushed underflow, per row

    loss_b = torch.where(others, sig * dz + 12.0 * u * softplus, 0.0).sum(1) + floor
    # nll = M + log(S) - l_t: fp32 exps of (l - M), fp64 sum; M, l_t rounded
    nll_b = u * (
        (p * ((x - m).abs() + 4.0)).sum(1, keepdim=True) + 2.0 * lse.abs() + x_t.abs() + 4.0
    )

    g = torch.where(others, sig / tau, 0.0)
    dg = torch.where(others, (sig * (1.0 - sig) * dz + 4.0 * u * sig) / tau, 0.0)
    g_t = -g.sum(1, keepdim=True)
    dg_t = dg.sum(1, keepdim=True) + 12.0 * u * g_t.abs()
    g = torch.where(is_t, g_t, g)
    dg = torch.where(is_t, dg_t, dg)
    if prob_mode:
        dot = (p * g).sum(1, keepdim=True)
        ddot = (dp * g.abs() + p * dg).sum(1, keepdim=True) + 12.0 * u * (p * g.abs()).sum(
            1, keepdim=True
        )
        # grad_s = scale p_s (aw (g_s - dot) + nw); the target's nw (p_t - 1) term
        # is computed as -(S - u_t)/S in fp64 (error ~ dp_t, in the first term)
        grad_b = dp * (aw * (g - dot) + nw).abs() + p * aw * (dg + ddot)
        grad_b = grad_b + 4.0 * u * (p * aw * (g.abs() + dot.abs()) + p * abs(nw) + is_t * abs(nw))
    else:
        # softmax for the nll term: exp(fl(l - fl(lse)))
        dsoft = p * u * (x.abs() + 2.0 * lse.abs() + 8.0)
        grad_b = aw * dg + abs(nw) * torch.where(is_t, p * nll_b + 4.0 * u, dsoft)
    grad_b = abs(scale) * (grad_b + (abs(aw) / tau + abs(nw)) * floor)
    grad_b = torch.where(valid, grad_b, 0.0)
    loss_b = torch.where(valid.squeeze(1), loss_b, 0.0)
    nll_b = torch.where(valid, nll_b, 0.0).squeeze(1)
    return loss_b, nll_b, grad_b


def check_against_oracle(
    logits, target, tau, prob_mode, ignore_index, aw, nw, scale, need_grad, need_nll, isa
):
    dtype = logits.dtype
    before = logits.clone()
    grad_scale = torch.tensor(scale, dtype=torch.float32)
    argmax_rows, nll_rows, correct, grad = relaxed_argmax_forward(
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        aw,
        nw,
        grad_scale,
        need_grad,
        need_nll,
        isa=isa,
    )
    assert torch.equal(logits, before), "the kernel wrote to the caller's logits"
    num_rows, num_classes = logits.shape
    assert argmax_rows.shape == nll_rows.shape == correct.shape == (num_rows,)
    assert argmax_rows.dtype == nll_rows.dtype == dtype and correct.dtype == torch.bool

    scale32 = float(grad_scale)  # the kernel reads the float32 value
    o_argmax, o_nll, o_correct, o_grad = oracle(
        logits, target, tau, prob_mode, ignore_index, aw, nw, scale32
    )
    b_argmax, b_nll, b_grad = error_bounds(
        logits, target, tau, prob_mode, ignore_index, aw, nw, scale32
    )
    k = SAFETY[dtype]
    assert torch.equal(correct, o_correct)
    err = (argmax_rows.double() - o_argmax).abs()
    assert (err <= k * b_argmax).all(), f"argmax rows: max err/bound {(err / b_argmax).max()}"
    if need_nll:
        err = (nll_rows.double() - o_nll).abs()
        assert (err <= k * b_nll).all(), f"nll rows: max err/bound {(err / b_nll).max()}"
    else:
        assert torch.equal(nll_rows, torch.zeros_like(nll_rows))
    if need_grad:
        assert grad.shape == (num_rows, num_classes) and grad.dtype == dtype
        assert grad.is_contiguous()
        err = (grad.double() - o_grad).abs()
        assert (err <= k * b_grad).all(), f"grad: max err/bound {(err / b_grad).max()}"
    else:
        assert grad.shape == (0,)
    # ignored rows are exact zeros (and correct)
    ignored = target == ignore_index
    assert torch.equal(argmax_rows[ignored], torch.zeros_like(argmax_rows[ignored]))
    assert torch.equal(nll_rows[ignored], torch.zeros_like(nll_rows[ignored]))
    assert correct[ignored].all()
    if need_grad:
        assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    return argmax_rows, nll_rows, correct, grad


# --------------------------------------------------------------------------
# Test data: random, confident, tied, constant and ignored rows
# --------------------------------------------------------------------------


def make_case(num_rows, num_classes, dtype, logit_scale, ignore_index, seed, row_pad=0):
    """(logits, target) with a mix of row kinds; row_pad > 0 gives a row-strided view."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64) * logit_scale
    target = torch.randint(0, num_classes, (num_rows,), generator=gen)
    kind = torch.randint(0, 5, (num_rows,), generator=gen)
    rows = torch.arange(num_rows)
    top = x.amax(1) if num_rows else x.sum(1)
    # 1: confident, the target far above the rest
    conf = kind == 1
    x[rows[conf], target[conf]] = top[conf] + 20.0 * max(logit_scale, 1.0)
    if num_classes > 1:
        # 2: the target ties with another token at the top (not correct)
        tie = kind == 2
        other = (
            target + 1 + torch.randint(0, num_classes - 1, (num_rows,), generator=gen)
        ) % num_classes
        x[rows[tie], target[tie]] = top[tie]
        x[rows[tie], other[tie]] = top[tie]
    # 3: a constant row (every token ties)
    x[kind == 3] = 0.5
    # 4: ignored
    target = torch.where(kind == 4, torch.full_like(target, ignore_index), target)
    x = x.to(dtype)
    if row_pad:
        storage = torch.full((num_rows, num_classes + row_pad), float("nan"), dtype=dtype)
        storage[:, :num_classes] = x
        x = storage[:, :num_classes]  # stride(0) = V + pad; the NaN padding must never be read
    return x, target


@st.composite
def cases(draw):
    return dict(
        dtype=draw(st.sampled_from(DTYPES)),
        num_classes=draw(st.sampled_from([1, 2, 37, 123, 1000, 4099])),
        num_rows=draw(st.sampled_from([0, 1, 507])),
        prob_mode=draw(st.booleans()),
        tau=draw(st.sampled_from([1e-4, 0.1, 0.999])),
        logit_scale=draw(st.sampled_from([1.0, 10.0, 1e4])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        aw=draw(st.sampled_from([1.0, 0.3])),
        nw=draw(st.sampled_from([0.0, 0.8])),
        scale=draw(st.sampled_from([1.0, 0.37, 1.0 / 507])),
        need_grad=draw(st.booleans()),
        need_nll=draw(st.booleans()),
        row_pad=draw(st.sampled_from([0, 0, 5])),
        isa=draw(st.sampled_from(ISAS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_float64_oracle(case):
    logits, target = make_case(
        case["num_rows"],
        case["num_classes"],
        case["dtype"],
        case["logit_scale"],
        case["ignore_index"],
        case["seed"],
        case["row_pad"],
    )
    check_against_oracle(
        logits,
        target,
        case["tau"],
        case["prob_mode"],
        case["ignore_index"],
        case["aw"],
        case["nw"],
        case["scale"],
        case["need_grad"],
        case["need_nll"],
        case["isa"],
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("num_classes", [1, 5, 64, 1000])
def test_every_isa_all_flags(isa, dtype, prob_mode, num_classes):
    # Deterministic coverage of each compiled copy and each template variant
    # (need_grad x need_nll x nll gradient); V = 5 and 1000 have a tail chunk.
    logits, target = make_case(40, num_classes, dtype, 3.0, -100, seed=num_classes)
    for need_grad, need_nll, nw in [
        (True, True, 0.8),
        (True, True, 0.0),
        (True, False, 0.0),
        (True, False, 0.8),
        (False, True, 0.8),
        (False, False, 0.0),
    ]:
        check_against_oracle(
            logits, target, 0.1, prob_mode, -100, 1.0, nw, 0.25, need_grad, need_nll, isa
        )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob_mode", [False, True])
def test_extreme_logits_and_temperature(isa, dtype, prob_mode):
    # tau = 1e-4 with |logits| = 1e4: z ~ 1e8, far outside exp's range
    gen = torch.Generator().manual_seed(7)
    logits = (torch.rand(64, 200, generator=gen, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    logits[:8, 3] = 1e4  # confident rows: target 3 at the top
    target = torch.randint(0, 200, (64,), generator=gen)
    target[:8] = 3
    out = check_against_oracle(
        logits, target, 1e-4, prob_mode, -100, 1.0, 0.5, 1.0, True, True, isa
    )
    for tensor in (out[0], out[1], out[3]):
        assert torch.isfinite(tensor).all()
    if not prob_mode:
        # z ~ -2e8 for every rival of a confident row: the loss underflows to 0
        assert (out[0][:8] == 0).all() and out[2][:8].all()


def test_ties_are_not_correct():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 2.999, 1.0]])
    target = torch.tensor([1, 0, 1])
    for isa in ISAS:
        _, _, correct, _ = relaxed_argmax_forward(
            logits, target, 0.1, False, -100, 1.0, 0.0, torch.tensor(1.0), False, False, isa=isa
        )
        assert correct.tolist() == [False, False, True]


def test_single_class_and_ignored_rows():
    # V == 1: the target is trivially the unique max; ignored rows: zeros, correct
    for isa in ISAS:
        for prob_mode in (False, True):
            logits = torch.tensor([[3.0], [-1.0], [7.0]])
            target = torch.tensor([0, -100, 0])
            rows, nll, correct, grad = relaxed_argmax_forward(
                logits,
                target,
                0.3,
                prob_mode,
                -100,
                1.0,
                1.0,
                torch.tensor(1.0),
                True,
                True,
                isa=isa,
            )
            assert rows.tolist() == [0.0] * 3 and nll.tolist() == [0.0] * 3
            assert correct.all() and torch.equal(grad, torch.zeros(3, 1))
            # an ignore_index inside [0, V): the row is ignored, not scored
            logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
            target = torch.tensor([2, 1])
            rows, nll, correct, grad = relaxed_argmax_forward(
                logits, target, 0.3, prob_mode, 2, 1.0, 1.0, torch.tensor(1.0), True, True, isa=isa
            )
            assert rows[0] == 0 and nll[0] == 0 and correct[0] and (grad[0] == 0).all()
            assert rows[1] > 0 and nll[1] > 0 and correct[1] and (grad[1] != 0).all()


def test_out_of_range_target_gives_nan_rows_without_reading_out_of_bounds():
    # Callers reject these; the kernel's last line of defence is NaN rows.
    logits = torch.randn(4, 6)
    target = torch.tensor([1, 6, -5, 2])
    for isa in ISAS:
        rows, nll, correct, grad = relaxed_argmax_forward(
            logits, target, 0.1, False, -100, 1.0, 1.0, torch.tensor(1.0), True, True, isa=isa
        )
        assert torch.isnan(rows[1:3]).all() and torch.isnan(nll[1:3]).all()
        assert not correct[1:3].any() and torch.isnan(grad[1:3]).all()
        assert torch.isfinite(rows[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_gradient_flags_do_not_change_values():
    # Same arithmetic in every template variant: bitwise-equal rows.
    logits, target = make_case(300, 123, torch.float32, 3.0, -100, seed=3)
    gs = torch.tensor(0.5)
    for isa in ISAS:
        for prob_mode in (False, True):
            ref = relaxed_argmax_forward(
                logits, target, 0.1, prob_mode, -100, 1.0, 0.7, gs, True, True, isa=isa
            )
            for need_grad in (False, True):
                out = relaxed_argmax_forward(
                    logits, target, 0.1, prob_mode, -100, 1.0, 0.7, gs, need_grad, True, isa=isa
                )
                assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
                assert torch.equal(out[2], ref[2])


def test_grad_scale_is_read_from_the_tensor():
    logits, target = make_case(200, 37, torch.float32, 2.0, -100, seed=5)
    grad_scale = torch.tensor(1.0)
    _, _, _, g1 = relaxed_argmax_forward(
        logits, target, 0.2, False, -100, 1.0, 0.5, grad_scale, True, True
    )
    grad_scale.fill_(0.125)  # in place: the kernel must read memory, not a cached value
    _, _, _, g2 = relaxed_argmax_forward(
        logits, target, 0.2, False, -100, 1.0, 0.5, grad_scale, True, True
    )
    # fp32: the scale is folded into fp32 constants; both rounded once (rel <= 2u)
    torch.testing.assert_close(g2, 0.125 * g1, rtol=3e-7, atol=1e-30)
    # weights enter linearly
    _, _, _, ga = relaxed_argmax_forward(
        logits, target, 0.2, False, -100, 1.0, 0.0, grad_scale, True, True
    )
    _, _, _, gn = relaxed_argmax_forward(
        logits, target, 0.2, False, -100, 0.0, 0.5, grad_scale, True, True
    )
    torch.testing.assert_close(ga + gn, g2, rtol=1e-5, atol=1e-6)


def test_threads_do_not_change_results():
    logits, target = make_case(2000, 64, torch.float32, 3.0, -100, seed=11)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(
                relaxed_argmax_forward(
                    logits, target, 0.1, False, -100, 1.0, 0.5, torch.tensor(1.0), True, True
                )
            )
    finally:
        torch.set_num_threads(old)
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            assert torch.equal(a, b)


def test_row_offsets_beyond_int32(tmp_path):
    # Row 1 starts 2^31 + 64 elements (8 GiB) after row 0: only int64 offsets
    # reach it. The file is sparse, so only the touched pages use memory/disk.
    num_classes = 64
    row_stride = 2**31 + 64
    nbytes = (row_stride + num_classes) * 4
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(nbytes)
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), nbytes)
        try:
            flat = torch.frombuffer(mapped, dtype=torch.float32)
            logits = flat.as_strided((2, num_classes), (row_stride, 1))
            gen = torch.Generator().manual_seed(0)
            values = torch.randn(2, num_classes, generator=gen)
            logits[0] = values[0]
            logits[1] = values[1]
            target = torch.tensor([5, 9])
            out = relaxed_argmax_forward(
                logits, target, 0.1, False, -100, 1.0, 1.0, torch.tensor(1.0), True, True
            )
            expect = relaxed_argmax_forward(
                values, target, 0.1, False, -100, 1.0, 1.0, torch.tensor(1.0), True, True
            )
            for a, b in zip(out, expect):
                assert torch.equal(a, b)
            del flat, logits
        finally:
            mapped.close()


# --------------------------------------------------------------------------
# The polynomial exp and log1p
# --------------------------------------------------------------------------


def _math(op, x, isa):
    out = torch.empty_like(x)
    ext.math(op, x.data_ptr(), out.data_ptr(), x.numel(), x.dtype == torch.float64, isa)
    return out


def _ulp_error(y, reference, dtype):
    """|y - reference| in units of the last place of the reference, in ``dtype``."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    ref = reference.astype(np_dtype)
    ulp = np.spacing(np.abs(ref)).astype(np.longdouble)
    ulp = np.maximum(ulp, np.longdouble(np.finfo(np_dtype).smallest_subnormal))
    return np.abs(y.numpy().astype(np.longdouble) - reference) / ulp


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_polynomial_exp_accuracy(isa, dtype):
    # Measured: max 0.99 ulp (fp32) / 0.98 ulp (fp64) on [EXP_LO, 0]; the
    # reference is x87 long double (64-bit mantissa).
    lo = EXP_LO[dtype]
    x = torch.cat(
        [
            torch.linspace(lo, 0.0, 1_000_001, dtype=torch.float64),
            -torch.logspace(-30, 0, 20_001, dtype=torch.float64),
            torch.linspace(
                0.0, 80.0 if dtype == torch.float32 else 700.0, 10_001, dtype=torch.float64
            ),
        ]
    ).to(dtype)
    y = _math("exp", x, isa)
    err = _ulp_error(y, np.exp(x.numpy().astype(np.longdouble)), dtype)
    assert err.max() <= 1.5
    # below the range: exactly 0; NaN propagates; exp(0) == 1 exactly
    special = torch.tensor([lo - 1.0, -1e30, -math.inf, math.nan, 0.0], dtype=dtype)
    out = _math("exp", special, isa)
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(out[3]) and out[4] == 1.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_polynomial_log1p_accuracy(isa, dtype):
    # Measured: max 1.9 ulp (fp32) / 2.1 ulp (fp64) on [0, 1], including
    # subnormal arguments (relative accuracy where log1p(e) ~ e).
    tiny = -44 if dtype == torch.float32 else -320
    e = torch.cat(
        [
            torch.linspace(0.0, 1.0, 1_000_001, dtype=torch.float64),
            torch.logspace(tiny, 0, 20_001, dtype=torch.float64),
        ]
    ).to(dtype)
    y = _math("log1p", e, isa)
    err = _ulp_error(y, np.log1p(e.numpy().astype(np.longdouble)), dtype)
    assert err.max() <= 2.5
    out = _math("log1p", torch.tensor([0.0, math.nan], dtype=dtype), isa)
    assert out[0] == 0.0 and math.isnan(out[1])


# --------------------------------------------------------------------------
# Input checks of the wrapper
# --------------------------------------------------------------------------


def _call(
    logits=None,
    target=None,
    tau=0.1,
    prob_mode=False,
    ignore_index=-100,
    aw=1.0,
    nw=0.0,
    grad_scale=None,
    need_grad=True,
    need_nll=False,
    **kw,
):
    logits = torch.randn(3, 4) if logits is None else logits
    target = torch.tensor([0, 1, 2]) if target is None else target
    grad_scale = torch.tensor(1.0) if grad_scale is None else grad_scale
    return relaxed_argmax_forward(
        logits, target, tau, prob_mode, ignore_index, aw, nw, grad_scale, need_grad, need_nll, **kw
    )


def _op(
    logits=None,
    target=None,
    tau=0.1,
    prob_mode=False,
    ignore_index=-100,
    aw=1.0,
    nw=0.0,
    need_grad=True,
    need_nll=False,
):
    """The custom op on the cpp backend: the one place the contract's preconditions are checked."""
    logits = torch.randn(3, 4) if logits is None else logits
    target = torch.tensor([0, 1, 2]) if target is None else target
    return torch.ops.ddvae_fast.relaxed_argmax(
        logits, target, tau, prob_mode, ignore_index, aw, nw, "mean", need_grad, need_nll, "cpp"
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(logits=torch.ones(3, 4, dtype=torch.int32)), TypeError),
        (dict(logits=torch.randn(12)), ValueError),
        (dict(logits=torch.randn(3, 0), target=torch.tensor([0, 0, 0])), ValueError),
        (dict(target=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError),
        (dict(target=torch.tensor([0, 1])), ValueError),
        (dict(target=torch.tensor([[0, 1, 2]])), ValueError),
        (dict(target=torch.tensor([0, 5, 1])), ValueError),  # out of range
        (dict(tau=0.0), ValueError),
        (dict(tau=1.0), ValueError),
        (dict(tau=math.nan), ValueError),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error):
    with pytest.raises(error):
        _op(**kwargs)


def test_op_reads_strided_rows_and_strided_targets():
    logits, target = torch.randn(4, 3).t(), torch.tensor([0, 9, 1, 9, 2, 9])[::2]
    got = _op(logits=logits, target=target)
    want = _op(logits=logits.contiguous(), target=target.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError):
        _call(isa="avx9000")


def test_lazy_negation_view_is_read_as_its_values():
    logits, target = make_case(50, 37, torch.float32, 2.0, -100, seed=2)
    neg_view = torch._neg_view(-logits)  # same values, stored negated with the neg bit set
    assert neg_view.is_neg()
    out = relaxed_argmax_forward(
        neg_view, target, 0.1, False, -100, 1.0, 0.5, torch.tensor(1.0), True, True
    )
    expect = relaxed_argmax_forward(
        logits, target, 0.1, False, -100, 1.0, 0.5, torch.tensor(1.0), True, True
    )
    for a, b in zip(out, expect):
        assert torch.equal(a, b)


def test_empty_batch():
    for need_grad in (True, False):
        rows, nll, correct, grad = _call(
            logits=torch.randn(0, 7), target=torch.zeros(0, dtype=torch.long), need_grad=need_grad
        )
        assert rows.shape == nll.shape == correct.shape == (0,)
        assert grad.shape == ((0, 7) if need_grad else (0,))


# --------------------------------------------------------------------------
# bfloat16 and float16 logits: three-way against float64
# --------------------------------------------------------------------------

HALF_DTYPES = (torch.bfloat16, torch.float16)
# unit roundoff of the gradient's storage type
HALF_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# float16's smallest subnormal: the absolute resolution of a float16 gradient
HALF_ABS_FLOOR = {torch.bfloat16: 0.0, torch.float16: 2.0**-24}


def check_half_three_way(logits, target, tau, prob_mode, aw, nw, scale, need_grad, need_nll, isa):
    """cpp on 16-bit logits vs the reference on the same logits, both vs float64.

    Both read the same 16-bit values (exact in fp32 and fp64) and compute in
    fp32, so the float64 oracle of those values is the truth for both, and the
    fp32 bounds of ``error_bounds`` (times SAFETY) apply to the cpp rows. The
    gradient is rounded once to the 16-bit type by each backend; two fp32
    values within the fp32 bound can round to neighbouring 16-bit values, so
    cpp may be up to 2 u16 |g| (+ float16's subnormal spacing) further from
    the truth than the reference: err_cpp <= err_ref + SAFETY fp32 bound + that.
    """
    from ddvae_fast.loss.reference import forward as reference_forward

    dtype = logits.dtype
    grad_scale = torch.tensor(scale, dtype=torch.float32)
    args = (logits, target, tau, prob_mode, -100, aw, nw, grad_scale, need_grad, need_nll)
    rows, nll, correct, grad = relaxed_argmax_forward(*args, isa=isa)
    r_rows, r_nll, r_correct, r_grad = reference_forward(*args)
    assert rows.dtype == nll.dtype == torch.float32  # as the triton backend
    assert torch.equal(correct, r_correct)
    o_rows, o_nll, o_correct, o_grad = oracle(logits, target, tau, prob_mode, -100, aw, nw, scale)
    assert torch.equal(correct, o_correct)
    b_rows, b_nll, b_grad = error_bounds(
        logits.float(), target, tau, prob_mode, -100, aw, nw, scale
    )
    k = SAFETY[torch.float32]

    def within(got, ref, truth, bound, what):
        err = (got.double() - truth).abs()
        err_ref = (ref.double() - truth).abs()
        excess = err - err_ref - bound
        assert (excess <= 0).all(), f"{what}: cpp error exceeds the reference's by {excess.max()}"

    within(rows, r_rows, o_rows, k * b_rows, "argmax rows")
    if need_nll:
        within(nll, r_nll, o_nll, k * b_nll, "nll rows")
    if need_grad:
        assert grad.dtype == dtype and grad.shape == logits.shape and grad.is_contiguous()
        rounding = 2.0 * HALF_UNIT_ROUNDOFF[dtype] * o_grad.abs() + HALF_ABS_FLOOR[dtype]
        within(grad, r_grad, o_grad, k * b_grad + rounding, "grad")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("num_classes", [5, 64, 1000])
def test_half_logits_three_way(isa, dtype, prob_mode, num_classes):
    # V = 5 and 1000 have a tail chunk; rows: random, confident, tied, constant, ignored
    logits, target = make_case(60, num_classes, dtype, 3.0, -100, seed=num_classes + 1)
    for need_grad, need_nll, nw in [(True, True, 0.8), (True, False, 0.0), (False, True, 0.0)]:
        check_half_three_way(
            logits, target, 0.1, prob_mode, 1.0, nw, 0.25, need_grad, need_nll, isa
        )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(HALF_DTYPES),
    num_classes=st.sampled_from([2, 37, 123, 4099]),
    prob_mode=st.booleans(),
    tau=st.sampled_from([0.01, 0.1, 0.9]),
    logit_scale=st.sampled_from([1.0, 10.0]),
    row_pad=st.sampled_from([0, 3]),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_logits_three_way_random(
    dtype, num_classes, prob_mode, tau, logit_scale, row_pad, isa, seed
):
    logits, target = make_case(97, num_classes, dtype, logit_scale, -100, seed, row_pad)
    check_half_three_way(logits, target, tau, prob_mode, 1.0, 0.5, 1.0 / 97, True, True, isa)


def test_half_logits_are_not_copied_to_fp32():
    # Read as they are: the kernel's peak extra memory is its outputs, not an
    # fp32 copy of the logits (which would show as a 2x larger allocation).
    logits, target = make_case(4096, 512, torch.bfloat16, 3.0, -100, seed=1)
    before = logits.clone()
    out = relaxed_argmax_forward(
        logits, target, 0.1, False, -100, 1.0, 0.5, torch.tensor(1.0), True, True
    )
    assert torch.equal(logits, before) and out[3].dtype == torch.bfloat16


# --------------------------------------------------------------------------
# Edge values: NaN and +-inf logits, ties (correct_rows of the reference)
# --------------------------------------------------------------------------


def edge_case_rows(num_classes, dtype):
    """(logits, target, what) with NaN / inf / tie rows; the special value sits in
    a full chunk and in the tail chunk for the V used below."""
    nan, inf = math.nan, math.inf
    rows, target, what = [], [], []

    def add(values, t, label):
        row = torch.linspace(-1.0, 1.0, num_classes, dtype=torch.float64)
        for i, v in values.items():
            row[i % num_classes] = v
        rows.append(row)
        target.append(t % num_classes)
        what.append(label)

    last = num_classes - 1
    add({0: 5.0}, 0, "finite unique max")
    add({0: nan}, 0, "NaN at the target")
    add({0: 5.0, 1: nan}, 0, "NaN elsewhere, early")
    add({0: 5.0, last: nan}, 0, "NaN elsewhere, last column")
    add({last: 5.0, 1: nan}, last, "NaN elsewhere, target last")
    add({0: inf}, 0, "+inf target, unique")
    add({0: inf, last: inf}, 0, "+inf target tied with +inf")
    add({0: 5.0, last: inf}, 0, "+inf elsewhere")
    add({0: -inf}, 0, "-inf target")
    add({0: 5.0, 1: -inf, last: -inf}, 0, "-inf elsewhere")
    add({i: -inf for i in range(num_classes)}, 0, "all -inf")
    add({0: 5.0, last: 5.0}, 0, "finite tie")
    add({0: 5.0, last: 5.0}, last, "finite tie, target last")
    add({0: inf, 1: nan}, 0, "+inf target, NaN elsewhere")
    add({i: nan for i in range(num_classes)}, 0, "all NaN")
    logits = torch.stack(rows).to(dtype)
    return logits, torch.tensor(target), what


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("num_classes", [1, 2, 5, 37, 64])
def test_correct_rows_with_nan_inf_and_ties(isa, dtype, prob_mode, num_classes):
    from ddvae_fast.loss.reference import correct_rows

    logits, target, what = edge_case_rows(num_classes, dtype)
    _, _, correct, _ = relaxed_argmax_forward(
        logits, target, 0.1, prob_mode, -100, 1.0, 0.5, torch.tensor(1.0), True, True, isa=isa
    )
    expected = correct_rows(logits, target, -100)
    for i, label in enumerate(what):
        assert bool(correct[i]) == bool(expected[i]), (label, logits[i].tolist())
    # the definition, independently: a NaN anywhere in the row is never correct
    has_nan = torch.isnan(logits.double()).any(1)
    assert not correct[has_nan].any()
