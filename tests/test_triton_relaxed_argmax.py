"""The triton backend of the fused relaxed arg-max forward against float64 math.

Runs the kernels on CPU tensors under TRITON_INTERPRET=1 (set here before triton
is imported; triton decides interpretation when a kernel is decorated). The
oracle is an independent float64 computation written below with plain torch:
direct formulas for the losses and autograd of the float64 loss for the gradient.
On a machine with CUDA, test_compiled_kernels_on_cuda also runs the compiled
kernels in a subprocess without the interpreter.

Tolerances (checked as |got - ref| <= rtol |ref| + atol):
- float32 logits, losses and gradient: rtol 1e-5, atol 1e-5 * max|ref| (1e-6 for
  nll, which is O(log V)). The kernel computes in fp32 (unit roundoff 6e-8):
  a few roundings per element and tree sums over V ('prob' mode forms p_s - p_t
  as p_t expm1(l_s - l_t) near the target, so 1/tau does not magnify p's
  rounding). Measured worst case over tau in {1e-4, 1e-3, 0.1, 0.999} and
  |logits| up to 1e4: 1.5e-6.
- bfloat16 / float16 logits: the inputs convert to fp32 exactly, so the losses
  keep the float32 tolerance; the gradient is rounded once to the input dtype,
  so rtol = atol / max|ref| = the dtype's epsilon (2^-7 bf16, 2^-10 fp16),
  twice its round-to-nearest error.
- Gradient floor 1e-13 * gs * (|aw|/tau + |nw|): the float64 oracle rounds too
  (p_t - 1 of a confident row is 0 in float64, the kernel keeps -sum_{s!=t} p_s).
- argmax_rows atol floor 1e-30: below float32's range (the oracle gives 1e-260
  for very confident rows); small values get a relative-accuracy test of their own.
- nll_rows atol 1e-6: likewise, float64 logsumexp(l) - l_t is 0 for a very
  confident row whose true nll (which the kernel returns) is ~1e-30.
"""

import os

_COMPILED_CHECK = os.environ.get("DDVAE_TRITON_COMPILED_CHECK") == "1"
if not _COMPILED_CHECK:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        raise RuntimeError("these tests run the triton kernels under TRITON_INTERPRET=1")

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import loss_oracle

from ddvae_fast.loss import reference as loss_reference
from ddvae_fast.loss import triton as triton_ra
from ddvae_fast.loss.triton import MAX_BLOCK_V
from ddvae_fast.loss.triton import forward as relaxed_argmax_forward

IGNORE = -100
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


# --------------------------------------------------------------------------- #
# Independent float64 oracle
# --------------------------------------------------------------------------- #
def reference(logits, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight, grad_scale):
    """Float64 losses per row, correct flags and d(sum of weighted losses)/dlogits."""
    return loss_oracle(
        logits, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight, grad_scale
    )


def assert_close(got, ref, rtol, atol, what):
    got = got.double()
    err = (got - ref).abs()
    bound = rtol * ref.abs() + atol
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), (
        f"{what}: max error {err.max().item():.3e}, worst ratio "
        f"{(err / bound.clamp_min(1e-300)).max().item():.3g}"
    )


def check_against_reference(
    logits,
    target,
    tau,
    prob_mode,
    ignore_index=IGNORE,
    argmax_weight=1.0,
    nll_weight=0.5,
    grad_scale=0.3,
    need_grad=True,
    need_nll=True,
    max_block_v=MAX_BLOCK_V,
):
    """Run the triton forward and compare every output with the float64 oracle."""
    gs = torch.tensor(grad_scale, dtype=torch.float32, device=logits.device)
    outputs = relaxed_argmax_forward(
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        gs,
        need_grad,
        need_nll,
        max_block_v=max_block_v,
    )
    assert_matches_reference(
        outputs,
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        grad_scale,
        need_grad,
        need_nll,
    )
    return outputs


def assert_matches_reference(
    outputs,
    logits,
    target,
    tau,
    prob_mode,
    ignore_index,
    argmax_weight,
    nll_weight,
    grad_scale,
    need_grad,
    need_nll,
):
    argmax_rows, nll_rows, correct, grad = outputs
    gs = torch.tensor(grad_scale, dtype=torch.float32)
    ref_argmax, ref_nll, ref_correct, ref_grad = reference(
        logits, target, tau, prob_mode, ignore_index, argmax_weight, nll_weight, gs.double()
    )
    n_rows, vocab = logits.shape
    dtype = logits.dtype
    assert argmax_rows.dtype == torch.float32 and argmax_rows.shape == (n_rows,)
    assert nll_rows.dtype == torch.float32 and nll_rows.shape == (n_rows,)
    assert correct.dtype == torch.bool and correct.shape == (n_rows,)
    rtol = LOSS_RTOL[dtype]
    # 1e-30 floor: float32 outputs cannot hold the oracle's 1e-260 of a
    # confident row (test_tiny_losses_keep_relative_accuracy covers small values).
    assert_close(
        argmax_rows, ref_argmax, rtol, rtol * ref_argmax.abs().max().item() + 1e-30, "argmax_rows"
    )
    if need_nll:
        assert_close(nll_rows, ref_nll, rtol, 1e-6, "nll_rows")
    else:
        assert torch.equal(nll_rows, torch.zeros_like(nll_rows))
    assert torch.equal(correct, ref_correct)
    if need_grad:
        assert grad.dtype == dtype and grad.shape == (n_rows, vocab) and grad.is_contiguous()
        grtol = GRAD_RTOL[dtype]
        # Floor: the float64 oracle itself rounds (e.g. p_t - 1 of a confident
        # row) at ~1e-16 of the natural gradient scale gs (|aw|/tau + |nw|).
        oracle_floor = 1e-13 * grad_scale * (abs(argmax_weight) / tau + abs(nll_weight))
        assert_close(
            grad, ref_grad, grtol, grtol * ref_grad.abs().max().item() + oracle_floor, "grad"
        )
    else:
        assert grad.shape == (0,) and grad.dtype == dtype


def make_logits(n_rows, vocab, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, vocab, generator=gen) * scale
    target = torch.randint(0, vocab, (n_rows,), generator=gen)
    return logits, target


# --------------------------------------------------------------------------- #
# Against the float64 oracle
# --------------------------------------------------------------------------- #
def test_kernels_are_interpreted_here():
    assert isinstance(
        triton_ra.relaxed_argmax_logit_kernel,
        triton_ra.triton.runtime.interpreter.InterpretedFunction,
    )


@pytest.mark.parametrize("vocab", [1, 2, 37, 123, 1000])
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [64, MAX_BLOCK_V], ids=["chunked", "fused"])
@pytest.mark.parametrize("nll_weight", [0.0, 0.5])  # 0: logit mode writes grad in one pass
def test_matches_float64(vocab, prob_mode, max_block_v, nll_weight):
    logits, target = make_logits(8, vocab, 3.0, seed=vocab)
    target[2] = IGNORE
    check_against_reference(
        logits, target, 0.1, prob_mode, nll_weight=nll_weight, max_block_v=max_block_v
    )


@pytest.mark.parametrize("max_block_v", [32, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_prob_mode_small_tau_unlikely_target(max_block_v):
    # Every sigmoid is ~1 when the target is far from the top at tau = 1e-4, so
    # the naive softmax backward g_s - sum_j p_j g_j cancels ~1e4 down to ~1
    # (error ~1e-3 relative); the kernel's rewritten form keeps fp32 accuracy.
    logits, target = make_logits(8, 123, 3.0, seed=0)
    target = logits.argmin(1)
    check_against_reference(logits, target, 1e-4, True, nll_weight=0.0, max_block_v=max_block_v)


@pytest.mark.parametrize("prob_mode", [False, True])
def test_row_longer_than_block_cap(prob_mode):
    # V > MAX_BLOCK_V: the real multi-chunk loop at the default cap (2 chunks).
    logits, target = make_logits(2, MAX_BLOCK_V + 8, 2.0, seed=7)
    check_against_reference(logits, target, 0.1, prob_mode)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_float64_hypothesis(data):
    n_rows = data.draw(st.integers(1, 8), label="n_rows")
    vocab = data.draw(st.sampled_from([1, 2, 37, 123]), label="vocab")
    tau = data.draw(st.sampled_from([1e-4, 0.1, 0.999]), label="tau")
    prob_mode = data.draw(st.booleans(), label="prob_mode")
    scale = data.draw(st.sampled_from([0.1, 3.0, 1e4]), label="scale")
    max_block_v = data.draw(st.sampled_from([32, MAX_BLOCK_V]), label="max_block_v")
    ignore_index = data.draw(st.sampled_from([IGNORE, 0]), label="ignore_index")
    argmax_weight = data.draw(st.sampled_from([0.0, 1.0, 0.37]), label="argmax_weight")
    nll_weight = data.draw(st.sampled_from([0.0, 1.0, 2.5]), label="nll_weight")
    grad_scale = data.draw(st.floats(1e-3, 10.0), label="grad_scale")
    need_grad = data.draw(st.booleans(), label="need_grad")
    need_nll = data.draw(st.booleans(), label="need_nll")
    kinds = data.draw(
        st.lists(
            st.sampled_from(["plain", "ignored", "confident", "tie"]),
            min_size=n_rows,
            max_size=n_rows,
        ),
        label="row_kinds",
    )
    logits, target = make_logits(n_rows, vocab, scale, data.draw(st.integers(0, 2**31 - 1)))
    ties = []
    for row, kind in enumerate(kinds):
        t = int(target[row])
        if kind == "ignored":
            target[row] = ignore_index
        elif kind == "confident":
            logits[row, t] = logits[row].max() + 20.0 * scale
        elif kind == "tie" and vocab > 1:
            top = logits[row].max() + scale
            logits[row, t] = top
            logits[row, (t + 1) % vocab] = top
            if t != ignore_index:
                ties.append(row)
    _, _, correct, _ = check_against_reference(
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        grad_scale,
        need_grad,
        need_nll,
        max_block_v,
    )
    assert not correct[ties].any(), "a tied arg max is the undefined token, never correct"


@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_extreme_temperature_and_logits_stay_finite(prob_mode, max_block_v):
    # tau = 1e-4 with |logits| = 1e4: |z| reaches 2e8, exp(z) would overflow.
    logits, target = make_logits(6, 37, 1.0, seed=3)
    logits = torch.sign(logits) * 1e4
    check_against_reference(logits, target, 1e-4, prob_mode, max_block_v=max_block_v)


@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_tiny_losses_keep_relative_accuracy(max_block_v):
    # 1 + exp(z) rounds to 1 in fp32 here; a naive log(1 + exp(z)) would return 0.
    # float64 log1p of the direct sum is exact to ~1e-16 relative.
    vocab = 20
    logits = -torch.arange(vocab, dtype=torch.float32)[None].repeat(3, 1) * 0.25 - 5.0
    target = torch.zeros(3, dtype=torch.int64)
    logits[:, 0] = 0.0
    tau = 0.1
    gs = torch.tensor(1.0)
    argmax_rows, nll_rows, _, _ = relaxed_argmax_forward(
        logits, target, tau, False, IGNORE, 1.0, 1.0, gs, False, True, max_block_v=max_block_v
    )
    diff = logits[:, 1:].double() - logits[:, :1].double()
    z = diff / tau + math.log(1 / tau - 1)
    ref_argmax = torch.log1p(torch.exp(z)).sum(1)
    ref_nll = torch.log1p(torch.exp(diff).sum(1))
    assert ref_argmax.max() < 1e-9 and ref_nll.max() < 0.06
    assert_close(argmax_rows, ref_argmax, 1e-5, 0.0, "tiny argmax_rows")
    assert_close(nll_rows, ref_nll, 1e-5, 0.0, "nll_rows")
    # A very confident row: nll ~ 1e-17 relative-accurate, not rounded to 0.
    logits[:, 0] = 37.0
    _, nll_rows, _, _ = relaxed_argmax_forward(
        logits, target, tau, False, IGNORE, 1.0, 1.0, gs, False, True, max_block_v=max_block_v
    )
    ref_nll = torch.log1p(torch.exp(logits[:, 1:].double() - 37.0).sum(1))
    assert_close(nll_rows, ref_nll, 1e-5, 0.0, "confident nll_rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_half_precision_inputs(dtype, prob_mode, max_block_v):
    logits, target = make_logits(8, 37, 3.0, seed=11)
    target[0] = IGNORE
    check_against_reference(logits.to(dtype), target, 0.1, prob_mode, max_block_v=max_block_v)


@pytest.mark.parametrize("prob_mode", [False, True])
def test_row_strided_and_broadcast_logits(prob_mode):
    base, target = make_logits(10, 60, 3.0, seed=5)
    strided = base[::2, 7:44]  # row stride 120, columns contiguous
    target = target[:5] % 37
    assert not strided.is_contiguous() and strided.stride(1) == 1
    out = check_against_reference(strided, target, 0.1, prob_mode, max_block_v=16)
    out_contig = relaxed_argmax_forward(
        strided.contiguous(),
        target,
        0.1,
        prob_mode,
        IGNORE,
        1.0,
        0.5,
        torch.tensor(0.3),
        True,
        True,
        max_block_v=16,
    )
    for a, b in zip(out, out_contig):
        assert torch.equal(a, b)
    # Rows sharing memory (stride 0) are only read, so they are fine too.
    shared = base[0, :37].expand(4, 37)
    check_against_reference(shared, torch.tensor([0, 5, 36, IGNORE]), 0.1, prob_mode)


def test_callers_logits_unchanged():
    logits, target = make_logits(8, 123, 3.0, seed=2)
    before = logits.clone()
    for prob_mode in (False, True):
        relaxed_argmax_forward(
            logits,
            target,
            0.1,
            prob_mode,
            IGNORE,
            1.0,
            1.0,
            torch.tensor(1.0),
            True,
            True,
            max_block_v=16,
        )
    assert torch.equal(logits, before)


def test_need_nll_off_changes_nothing_else():
    logits, target = make_logits(8, 37, 3.0, seed=4)
    gs = torch.tensor(0.5)
    for prob_mode in (False, True):
        for nll_weight in (0.0, 1.0):
            on = relaxed_argmax_forward(
                logits, target, 0.1, prob_mode, IGNORE, 1.0, nll_weight, gs, True, True
            )
            off = relaxed_argmax_forward(
                logits, target, 0.1, prob_mode, IGNORE, 1.0, nll_weight, gs, True, False
            )
            assert torch.equal(off[1], torch.zeros(8))
            assert not torch.equal(on[1], off[1])
            for i in (0, 2, 3):
                assert torch.equal(on[i], off[i])


@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_correct_needs_a_strict_unique_max(prob_mode, max_block_v):
    logits = torch.zeros(4, 40)
    target = torch.tensor([5, 5, 5, 5])
    logits[0, 5] = logits[0, 33] = 2.0  # target tied with another (later chunk): not correct
    logits[1, 5], logits[1, 0] = 2.0, 2.0  # tied with an earlier chunk's token: not correct
    logits[2, 5] = 2.0  # unique max: correct
    logits[2, 7] = logits[2, 9] = 1.0  # ties below the target don't matter
    logits[3, 5] = 1.0
    logits[3, 20] = logits[3, 21] = 2.0  # others tie above the target: not correct
    _, _, correct, _ = check_against_reference(
        logits, target, 0.1, prob_mode, max_block_v=max_block_v
    )
    assert correct.tolist() == [False, False, True, False]


def edge_value_rows(vocab=40, target_col=5):
    """Rows with NaN, inf and ties around target column 5 (of 40: with
    max_block_v=16 the target sits in the first chunk, col 33 in the last)."""
    nan, inf = math.nan, math.inf
    logits = torch.linspace(-2.0, 1.0, vocab).repeat(13, 1)
    logits[:, target_col] = 1.5  # the unique max unless a row says otherwise
    edits = [
        {target_col: nan},  # NaN at the target
        {33: nan},  # NaN elsewhere, a later chunk
        {0: nan},  # NaN elsewhere, an earlier chunk
        {target_col: inf},  # +inf target, finite others: correct
        {target_col: inf, 33: inf},  # +inf tie: not correct
        {target_col: -inf},  # -inf target: not correct
        {c: -inf for c in range(vocab) if c != target_col},  # others all -inf: correct
        {20: inf},  # +inf elsewhere: not correct
        {0: 1.5},  # finite tie, earlier chunk: not correct
        {33: 1.5},  # finite tie, later chunk: not correct
        {c: nan for c in range(vocab)},  # all NaN
        {},  # plain row: correct
        {33: nan},  # NaN in an ignored row: ignored rows count as correct
    ]
    for row, edit in enumerate(edits):
        for col, value in edit.items():
            logits[row, col] = value
    target = torch.full((13,), target_col, dtype=torch.int64)
    target[12] = IGNORE
    expected = [False] * 3 + [True, False, False, True, False, False, False, False, True, True]
    return logits, target, expected


def check_edge_values(device, dtype, prob_mode, max_block_v):
    """correct_rows agrees with the reference's definition (ddvae_fast/loss/reference.py:
    ties and any NaN in the row are never correct); a row with a NaN logit has
    NaN losses, like the reference; inf rows keep the reference's values."""
    logits, target, expected = edge_value_rows()
    logits, target = logits.to(device, dtype), target.to(device)
    gs = torch.tensor(1.0, device=device)
    argmax_rows, nll_rows, correct, _grad = relaxed_argmax_forward(
        logits, target, 0.1, prob_mode, IGNORE, 1.0, 1.0, gs, True, True, max_block_v=max_block_v
    )
    ref = loss_reference.forward(
        logits.float(), target, 0.1, prob_mode, IGNORE, 1.0, 1.0, gs, False, True
    )
    assert correct.tolist() == expected
    assert torch.equal(correct, loss_reference.correct_rows(logits, target, IGNORE))
    has_nan = logits.isnan().any(1) & (target != IGNORE)
    for got in (argmax_rows, nll_rows):
        assert torch.equal(got.isnan() & has_nan, has_nan)  # NaN in, NaN out
    torch.testing.assert_close(argmax_rows, ref[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    # nll of a row with an infinite logit is not pinned down: the reference's
    # logsumexp gives inf - inf = NaN for a lone +inf target (the one-block
    # kernel path returns the limit 0) and +inf for a +inf elsewhere (the
    # kernels NaN, from exp(inf - inf)). Every other row must agree.
    finite_or_nan = ~logits.isinf().any(1)
    torch.testing.assert_close(
        nll_rows[finite_or_nan], ref[1][finite_or_nan], rtol=1e-5, atol=1e-5, equal_nan=True
    )


# NaN and inf arithmetic is the point here; numpy (the interpreter) warns about it.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_edge_values_nan_inf_and_ties(dtype, prob_mode, max_block_v):
    check_edge_values("cpu", dtype, prob_mode, max_block_v)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_single_class_nan_row_is_not_correct():
    logits = torch.tensor([[math.nan], [1.0], [-math.inf]])
    target = torch.zeros(3, dtype=torch.int64)
    for prob_mode in (False, True):
        for max_block_v in (16, MAX_BLOCK_V):
            out = _call(logits, target, prob_mode=prob_mode, max_block_v=max_block_v)
            assert out[2].tolist() == [False, True, True]
            assert torch.equal(out[2], loss_reference.correct_rows(logits, target, IGNORE))


def test_ignored_rows_and_single_class():
    logits, target = make_logits(4, 1, 3.0, seed=0)
    target[1] = IGNORE
    argmax_rows, nll_rows, correct, grad = check_against_reference(logits, target, 0.5, True)
    assert torch.equal(argmax_rows, torch.zeros(4)) and torch.equal(nll_rows, torch.zeros(4))
    assert correct.all() and torch.equal(grad, torch.zeros(4, 1))
    logits, target = make_logits(4, 37, 3.0, seed=0)
    target[:] = IGNORE
    out = relaxed_argmax_forward(
        logits, target, 0.5, False, IGNORE, 1.0, 1.0, torch.tensor(1.0), True, True, max_block_v=16
    )
    assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[1], torch.zeros(4))
    assert out[2].all() and torch.equal(out[3], torch.zeros(4, 37))


@pytest.mark.parametrize("prob_mode", [False, True])
@pytest.mark.parametrize("max_block_v", [16, MAX_BLOCK_V], ids=["chunked", "fused"])
def test_out_of_range_target_gives_nan_row_only(prob_mode, max_block_v):
    # The caller rejects these; the kernel's last line of defence is a masked
    # load (no out-of-bounds read) and NaN losses for that row alone.
    logits, target = make_logits(4, 37, 3.0, seed=9)
    good = target.clone()
    target[1], target[3] = 37, -5
    argmax_rows, nll_rows, correct, grad = relaxed_argmax_forward(
        logits,
        target,
        0.1,
        prob_mode,
        IGNORE,
        1.0,
        1.0,
        torch.tensor(1.0),
        True,
        True,
        max_block_v=max_block_v,
    )
    for row in (1, 3):
        assert argmax_rows[row].isnan() and nll_rows[row].isnan() and not correct[row]
    ref = relaxed_argmax_forward(
        logits,
        good,
        0.1,
        prob_mode,
        IGNORE,
        1.0,
        1.0,
        torch.tensor(1.0),
        True,
        True,
        max_block_v=max_block_v,
    )
    for row in (0, 2):
        assert argmax_rows[row] == ref[0][row] and nll_rows[row] == ref[1][row]
        assert torch.equal(grad[row], ref[3][row])


def test_empty_batch():
    out = relaxed_argmax_forward(
        torch.empty(0, 5),
        torch.empty(0, dtype=torch.int64),
        0.1,
        True,
        IGNORE,
        1.0,
        1.0,
        torch.tensor(1.0),
        True,
        True,
    )
    assert [tuple(o.shape) for o in out] == [(0,), (0,), (0,), (0, 5)]


def test_block_and_warp_choice():
    for vocab in (1, 2, 37, 1000, MAX_BLOCK_V, MAX_BLOCK_V + 1, 50257):
        block = triton_ra._block_v(vocab, MAX_BLOCK_V)
        assert block & (block - 1) == 0 and 16 <= block <= MAX_BLOCK_V
        assert block >= vocab or (vocab > MAX_BLOCK_V and block == triton_ra.CHUNK_BLOCK_V)
        # values per thread per row vector: 8 at most, 16 on the one-block 8192
        # (more spilled: tests/test_aot_compile.py)
        per_thread = block // (32 * triton_ra._num_warps(block))
        assert per_thread <= (16 if block == MAX_BLOCK_V else 8)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def _call(
    logits=None,
    target=None,
    tau=0.1,
    prob_mode=False,
    ignore_index=IGNORE,
    argmax_weight=1.0,
    nll_weight=1.0,
    grad_scale=None,
    need_grad=True,
    need_nll=True,
    **kw,
):
    logits = torch.randn(3, 5) if logits is None else logits
    target = torch.tensor([0, 1, 4]) if target is None else target
    grad_scale = torch.tensor(1.0) if grad_scale is None else grad_scale
    return relaxed_argmax_forward(
        logits,
        target,
        tau,
        prob_mode,
        ignore_index,
        argmax_weight,
        nll_weight,
        grad_scale,
        need_grad,
        need_nll,
        **kw,
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(max_block_v=100), ValueError),
        (dict(max_block_v=8), ValueError),
    ],
)
def test_bad_launch_limits_are_rejected(kwargs, error):
    with pytest.raises(error):
        _call(**kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call()


# --------------------------------------------------------------------------- #
# Compiled kernels on a real GPU (subprocess without the interpreter)
# --------------------------------------------------------------------------- #
def _compiled_cuda_check():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    dev = "cuda"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vocab in (1, 37, 1000, MAX_BLOCK_V + 8, 50257):
            for prob_mode in (False, True):
                for tau in (1e-4, 0.1, 0.999):
                    if dtype == torch.float16 and tau < 0.01:
                        continue  # |grad| ~ V/tau overflows float16's range
                    logits, target = make_logits(16, vocab, 3.0, seed=vocab)
                    target[3] = IGNORE
                    check_against_reference(
                        logits.to(dev, dtype), target.to(dev), tau, prob_mode, grad_scale=1.0 / 16
                    )
    # NaN, inf and ties: the GPU's max drops NaN where the interpreter keeps it.
    for dtype in (torch.float32, torch.bfloat16):
        for prob_mode in (False, True):
            for max_block_v in (16, MAX_BLOCK_V):
                check_edge_values(dev, dtype, prob_mode, max_block_v)
    # int64 row offsets: N * V > 2^31 elements; check the last rows.
    vocab = 32768
    n_rows = 2**31 // vocab + 3
    logits = torch.randn(n_rows, vocab, device=dev, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (n_rows,), device=dev)
    for prob_mode in (False, True):
        out = relaxed_argmax_forward(
            logits,
            target,
            0.1,
            prob_mode,
            IGNORE,
            1.0,
            0.5,
            torch.tensor(0.3, device=dev),
            True,
            True,
        )
        assert_matches_reference(
            tuple(o[-3:] for o in out),
            logits[-3:],
            target[-3:],
            0.1,
            prob_mode,
            IGNORE,
            1.0,
            0.5,
            0.3,
            True,
            True,
        )
        del out
    print("compiled CUDA check passed")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device; the interpreted tests cover the kernels' math",
)
def test_compiled_kernels_on_cuda():
    env = dict(os.environ, TRITON_INTERPRET="0", DDVAE_TRITON_COMPILED_CHECK="1")
    code = f"import runpy; runpy.run_path({__file__!r})['_compiled_cuda_check']()"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize(
    "logits, error",
    [
        (torch.randn(3, 5, dtype=torch.float64), TypeError),  # the backend's dtypes
        (torch.randint(0, 5, (3, 5)), TypeError),
        (torch.randn(15), ValueError),
    ],
)
def test_the_op_checks_preconditions_before_the_triton_backend(logits, error):
    target = torch.tensor([0, 1, 4])
    with pytest.raises(error):
        torch.ops.ddvae_fast.relaxed_argmax(
            logits, target, 0.1, False, IGNORE, 1.0, 1.0, "mean", True, True, "triton"
        )
