"""The relaxed arg-max loss: reference path, op/autograd layer and public API.

The reference (plain PyTorch, autograd gradient) is checked against an
independent float64 computation of Eq. 12-13 written here with explicit loops,
and by gradcheck. The custom-op path is checked on the reference forward
(``reference_relaxed_argmax_forward``: explicit gradient formulas), so the op
layer (flattening, reductions, in-place backward rescaling, torch.compile) is
tested without any compiled backend; tests/test_relaxed_argmax_backends.py
checks the 'cpp' and 'triton' backends against the reference.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.backends import implementation
from ddvae_fast.loss import api as ra
from ddvae_fast.loss import reference
from ddvae_fast.loss.nn import RelaxedArgmaxLoss

SCORES = ("logit", "prob")
REDUCTIONS = ("mean", "sum", "none")
# 'reference': public API, plain PyTorch + autograd.
# 'op': the custom op + hand-written autograd, running the reference forward.
PATHS = ("reference", "op")


def loss_on(path, logits, target, tau, score="logit", ignore_index=-100, reduction="mean"):
    if path == "reference":
        return ddf.relaxed_argmax_loss(
            logits,
            target,
            tau,
            score=score,
            ignore_index=ignore_index,
            reduction=reduction,
            backend="reference",
        )
    ra._check_logits_target(logits, target)  # the public API validates before the op
    return ra._op_loss(logits, target, tau, score, ignore_index, reduction, "reference")


def neg_log_sigma_tau(x: float, tau: float) -> float:
    """-log sigma_tau(x), Eq. 12 as printed: log(1 + exp(-x/tau) (1/tau - 1)).

    Written as log(1 + e^a) with a = -x/tau + log(1/tau - 1), evaluated without
    overflow so the extreme-value tests can use it too.
    """
    a = -x / tau + math.log(1.0 / tau - 1.0)
    return max(a, 0.0) + math.log1p(math.exp(-abs(a)))


def naive_rows(logits, target, tau, score, ignore_index):
    """Per-position loss by explicit loops in float64 (independent of the library)."""
    num_classes = logits.shape[-1]
    rows = logits.detach().double().reshape(-1, num_classes).tolist()
    targets = target.reshape(-1).tolist()
    out = []
    for row, t in zip(rows, targets):
        if t == ignore_index:
            out.append(0.0)
            continue
        if score == "prob":
            top = max(row)
            e = [math.exp(v - top) for v in row]
            row = [v / sum(e) for v in e]
        out.append(
            sum(neg_log_sigma_tau(row[t] - row[s], tau) for s in range(num_classes) if s != t)
        )
    return torch.tensor(out, dtype=torch.float64).reshape(target.shape)


def naive_reduce(rows, target, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = int((target != ignore_index).sum())
    return rows.sum() / max(count, 1)


def random_batch(
    shape,
    num_classes,
    *,
    ignore_fraction=0.2,
    ignore_index=-100,
    seed=0,
    dtype=torch.float64,
    scale=2.0,
):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_fraction
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return logits.to(dtype), target


# ---------------------------------------------------------------- values ----


@settings(max_examples=40, deadline=None)
@given(
    num_rows=st.integers(0, 6),
    num_classes=st.integers(1, 8),
    tau=st.floats(0.05, 0.95),
    score=st.sampled_from(SCORES),
    reduction=st.sampled_from(REDUCTIONS),
    ignore_index=st.sampled_from([-100, 0]),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_eq12_loops(
    num_rows, num_classes, tau, score, reduction, ignore_index, path, seed
):
    logits, target = random_batch((num_rows,), num_classes, ignore_index=ignore_index, seed=seed)
    got = loss_on(path, logits, target, tau, score, ignore_index, reduction)
    want = naive_reduce(
        naive_rows(logits, target, tau, score, ignore_index), target, ignore_index, reduction
    )
    # float64 on both sides; the loops and the vectorized code round differently
    # over at most a few dozen terms.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("score", SCORES)
def test_logit_score_is_the_log_softmax_difference_form(score):
    # The authors' code applies the loss to log_softmax scores: since
    # log_softmax differences equal logit differences, 'logit' must give the
    # same value when fed log-softmaxed logits.
    logits, target = random_batch((5, 4), 9, seed=1)
    a = ddf.relaxed_argmax_loss(logits, target, 0.2, backend="reference")
    b = ddf.relaxed_argmax_loss(F.log_softmax(logits, -1), target, 0.2, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loss_decreases_to_zero_as_target_dominates():
    # Eq. 11: the relaxed term vanishes as the target becomes the clear arg max.
    target = torch.tensor([2])
    losses = []
    for margin in (0.0, 1.0, 5.0, 50.0):
        logits = torch.zeros(1, 4, dtype=torch.float64)
        logits[0, 2] = margin
        losses.append(float(ddf.relaxed_argmax_loss(logits, target, 0.1, backend="reference")))
    assert all(a > b for a, b in itertools.pairwise(losses))
    assert losses[-1] < 1e-100
    # At a three-way tie with tau: each of the 3 pairs costs -log sigma_tau(0) = -log tau.
    assert losses[0] == pytest.approx(-3 * math.log(0.1), rel=1e-12)


# ------------------------------------------------------------- gradients ----


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("score", SCORES)
def test_reference_gradcheck(score, reduction):
    logits, target = random_batch((2, 3), 5, seed=2)
    target[0, 0] = -100
    logits[1, 1, :2] = logits[1, 1, 2]  # a three-way tie: the softplus at z = c
    logits.requires_grad_(True)

    def fn(x):
        return ddf.relaxed_argmax_loss(
            x, target, 0.3, score=score, reduction=reduction, backend="reference"
        )

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("tau", [1e-3, 0.3, 0.99])
def test_op_gradient_equals_autograd_of_reference(score, reduction, tau):
    # The op's gradient comes from explicit formulas and an in-place rescale by
    # the upstream gradient; autograd of the plain reference is the oracle.
    logits, target = random_batch((4, 5), 11, seed=3, scale=0.5)
    upstream = torch.randn(
        () if reduction != "none" else (4, 5),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(4),
    )
    grads = []
    for path in PATHS:
        x = logits.clone().requires_grad_(True)
        loss = loss_on(path, x, target, tau, score, -100, reduction)
        (grad,) = torch.autograd.grad(loss, x, upstream)
        grads.append((loss.detach(), grad))
    (ref_loss, ref_grad), (op_loss, op_grad) = grads
    # float64 both ways; differences are rounding of O(V) terms.
    torch.testing.assert_close(op_loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op_grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("score", SCORES)
def test_reference_forward_contract_outputs(score):
    # reference_relaxed_argmax_forward (the op layer's 'reference' backend)
    # against the plain reference: rows, nll, correctness, weighted gradient.
    logits, target = random_batch((40,), 7, seed=5, scale=1.0)
    logits[:5] = torch.round(logits[:5])  # integer logits: ties are likely
    aw, nw, scale = 0.7, 0.4, 0.25
    a_rows, n_rows, correct, grad = reference.forward(
        logits,
        target,
        0.2,
        score == "prob",
        -100,
        aw,
        nw,
        torch.tensor(scale, dtype=torch.float32),
        True,
        True,
    )
    x = logits.clone().requires_grad_(True)
    want_a = reference.relaxed_argmax_rows(x, target, 0.2, score, -100)
    want_n = F.cross_entropy(x, target, ignore_index=-100, reduction="none")
    (want_grad,) = torch.autograd.grad(scale * (aw * want_a + nw * want_n).sum(), x)
    torch.testing.assert_close(a_rows, want_a.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n_rows, want_n.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    decoded = ddf.deterministic_argmax(logits)
    assert correct.tolist() == ((decoded == target) | (target == -100)).tolist()
    # Without the gradient: an empty grad and zero nll rows when need_nll is off.
    *_, no_grad = reference.forward(
        logits,
        target,
        0.2,
        score == "prob",
        -100,
        1.0,
        0.0,
        torch.tensor(1.0),
        False,
        False,
    )
    assert no_grad.shape == (0,)


def test_reference_forward_masks_out_of_range_targets_with_nan():
    # The last line of defence when the target check is skipped: no
    # out-of-bounds read, NaN losses on that row, other rows unaffected.
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([1, 7, -3])
    a_rows, n_rows, correct, _grad = reference.forward(
        logits,
        target,
        0.2,
        False,
        -100,
        1.0,
        1.0,
        torch.tensor(1.0),
        True,
        True,
    )
    assert math.isfinite(a_rows[0]) and math.isfinite(n_rows[0])
    assert torch.isnan(a_rows[1:]).all() and torch.isnan(n_rows[1:]).all()
    assert not correct[1:].any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_with_retained_graph_recomputes_the_same_gradient(reduction):
    logits, target = random_batch((3,), 5, seed=6)
    x = logits.clone().requires_grad_(True)
    loss = loss_on("op", x, target, 0.2, reduction=reduction)
    upstream = (
        torch.linspace(0.5, 2.0, 3, dtype=loss.dtype).reshape(loss.shape)
        if (reduction == "none")
        else torch.tensor(0.75, dtype=loss.dtype)
    )
    (first,) = torch.autograd.grad(loss, x, upstream, retain_graph=True)
    # The first backward handed its buffer to autograd; the second reruns the
    # forward kernel into a new one: the same values, bit for bit.
    (second,) = torch.autograd.grad(loss, x, upstream)
    assert torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr()


def test_op_never_writes_the_callers_logits():
    logits, target = random_batch((4, 3), 6, seed=7)
    x = logits.clone().requires_grad_(True)
    loss_on("op", x, target, 0.2, "prob", -100, "none").sum().backward()
    assert torch.equal(x.detach(), logits)


def test_need_grad_follows_requires_grad_and_grad_mode(monkeypatch):
    seen = []
    forward = implementation("relaxed_argmax", "reference")

    def recording_forward(*args):
        seen.append(args[8])  # need_grad
        out = forward(*args)
        seen.append(tuple(out[3].shape))
        return out

    monkeypatch.setattr(ra, "implementation", lambda op, name: recording_forward)
    logits, target = random_batch((3,), 5, seed=8)
    loss_on("op", logits, target, 0.2)
    with torch.no_grad():
        loss_on("op", logits.clone().requires_grad_(True), target, 0.2)
    loss_on("op", logits.clone().requires_grad_(True), target, 0.2)
    assert seen == [False, (0,), False, (0,), True, (3, 5)]


# ------------------------------------------------------ ignore / shapes ----


@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("path", PATHS)
def test_ignored_positions_are_skipped(path, ignore_index):
    logits, target = random_batch((6, 5), 7, seed=9, ignore_index=ignore_index, ignore_fraction=0.4)
    kept = target != ignore_index
    assert 0 < int(kept.sum()) < kept.numel()
    x = logits.clone().requires_grad_(True)
    loss = loss_on(path, x, target, 0.25, ignore_index=ignore_index)
    loss.backward()
    # mean over the non-ignored positions only
    sub = logits[kept]
    want = ddf.relaxed_argmax_loss(
        sub, target[kept], 0.25, ignore_index=ignore_index, backend="reference"
    )
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(x.grad[~kept]) == 0
    assert torch.count_nonzero(x.grad[kept]) > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
def test_all_ignored_gives_zero_and_zero_gradient(path, reduction):
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.full((3, 4), -100)
    loss = loss_on(path, logits, target, 0.2, reduction=reduction)
    assert torch.count_nonzero(loss) == 0 and not torch.isnan(loss).any()
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.count_nonzero(grad) == 0 and not torch.isnan(grad).any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("score", SCORES)
def test_single_class_vocabulary_costs_nothing(path, score):
    # V = 1: the target is trivially the unique arg max; there is no s != t.
    logits = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(4, dtype=torch.int64)
    loss = loss_on(path, logits, target, 0.2, score, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", PATHS)
def test_empty_batch(path, reduction):
    logits = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(0, dtype=torch.int64)
    loss = loss_on(path, logits, target, 0.2, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert torch.count_nonzero(loss) == 0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("path", PATHS)
def test_extra_leading_dims_equal_flattened_rows(path):
    logits, target = random_batch((2, 3, 4), 123, seed=10)
    flat_l, flat_t = logits.reshape(-1, 123), target.reshape(-1)
    for reduction in REDUCTIONS:
        got = loss_on(path, logits, target, 0.15, "prob", -100, reduction)
        want = loss_on(path, flat_l, flat_t, 0.15, "prob", -100, reduction)
        if reduction == "none":
            assert got.shape == (2, 3, 4)
            want = want.reshape(2, 3, 4)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # A single position: target of shape () and logits (V,)
    got = loss_on(path, logits[0, 0, 0], target[0, 0, 0].clamp(min=0), 0.15, reduction="none")
    assert got.shape == ()


def _non_contiguous_views(base):
    """Non-contiguous views of (6, 9) float64 logits, as (view, target shape)."""
    wide = torch.cat([base, torch.randn(6, 4, dtype=base.dtype)], dim=1)
    interleaved = torch.stack([base, torch.zeros_like(base)], dim=-1)
    doubled_rows = torch.stack([base, torch.zeros_like(base)], dim=1).reshape(12, 9)
    return {
        "transposed": base.t().contiguous().t(),  # strides (1, 6)
        "column_slice": wide[:, :9],  # row stride 13, read in place
        "row_step": doubled_rows[::2],  # row stride 18
        "every_other_element": interleaved[..., 0],  # stride(-1) == 2
        "batch_transposed": base.reshape(2, 3, 9).transpose(0, 1),  # reshape must copy
    }


@pytest.mark.parametrize(
    "view", ["transposed", "column_slice", "row_step", "every_other_element", "batch_transposed"]
)
@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_logits_equal_contiguous(path, view):
    base, _ = random_batch((6,), 9, seed=11)
    logits = _non_contiguous_views(base)[view]
    assert not logits.is_contiguous()
    target = torch.randint(0, 9, logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    target.view(-1)[0] = -100
    upstream = torch.randn(logits.shape[:-1], dtype=torch.float64)
    for score in SCORES:
        x = logits.detach().requires_grad_(True)
        y = logits.detach().contiguous().requires_grad_(True)
        lx = loss_on(path, x, target, 0.3, score, -100, "none")
        ly = loss_on(path, y, target, 0.3, score, -100, "none")
        (gx,) = torch.autograd.grad(lx, x, upstream)
        (gy,) = torch.autograd.grad(ly, y, upstream)
        # same float64 math on differently laid-out memory
        torch.testing.assert_close(lx, ly, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(gx, gy, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------- extremes ----


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("tau", [1e-4, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_tau_and_logits_stay_finite_and_accurate(path, score, tau, dtype):
    gen = torch.Generator().manual_seed(12)
    logits = 1e4 * torch.sign(torch.randn(8, 6, generator=gen))
    logits[0] = 0.0  # an all-tie row
    logits[1, 3] = 1e4
    logits[1, :3] = -1e4  # a confident row
    target = torch.tensor([0, 3, 1, 2, 5, 4, 0, 1])
    x = logits.to(dtype).requires_grad_(True)
    loss = loss_on(path, x, target, tau, score, -100, "none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    want = naive_rows(x, target, tau, score, -100)
    # float32: the scores r_t - r_s are exact (+-1e4, 0, or softmax of them)
    # and each softplus is correctly rounded to ~1 ulp, summed over 5 terms.
    rtol = 1e-12 if dtype == torch.float64 else 4e-6
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=rtol)


# ------------------------------------------------------------ bad input ----


def _good():
    return torch.randn(3, 5), torch.tensor([0, 4, -100])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(tau=0.0), ValueError, "strictly inside"),
        (dict(tau=1.0), ValueError, "strictly inside"),
        (dict(tau=-1.0), ValueError, "strictly inside"),
        (dict(tau=float("nan")), ValueError, "strictly inside"),
        (dict(tau=True), TypeError, "tau"),
        (dict(tau="0.1"), TypeError, "tau"),
        (dict(tau=torch.tensor([0.1])), TypeError, "0-dim"),
        (dict(target=torch.tensor([0, 5, -100])), ValueError, "target contains 5"),
        (dict(target=torch.tensor([0, -1, 2])), ValueError, "target contains -1"),
        (dict(target=torch.tensor([0, 4])), ValueError, "shape"),
        (dict(target=torch.tensor([0.0, 4.0, 1.0])), TypeError, "int64"),
        (dict(target=torch.tensor([0, 4, 1], dtype=torch.int32)), TypeError, "int64"),
        (dict(logits=torch.randint(0, 3, (3, 5))), TypeError, "float"),
        (
            dict(logits=torch.randn(3, 0), target=torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "vocabulary",
        ),
        (dict(logits=torch.randn(())), ValueError, "vocabulary"),
        (dict(target=torch.tensor([0, 4, -100], device="meta")), ValueError, "same device"),
        (dict(score="softmax"), ValueError, "score"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_raises_clear_error(change, error, match, backend):
    logits, target = _good()
    kwargs = dict(
        logits=logits,
        target=target,
        tau=0.1,
        score="logit",
        reduction="mean",
        ignore_index=-100,
        backend=backend,
    )
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ddf.relaxed_argmax_loss(
            kwargs.pop("logits"), kwargs.pop("target"), kwargs.pop("tau"), **kwargs
        )


def test_op_path_checks_targets_too():
    logits, _ = _good()
    with pytest.raises(ValueError, match="target contains 9"):
        loss_on("op", logits, torch.tensor([0, 9, 1]), 0.1)


def test_skip_env_does_not_skip_the_check_on_cpu(monkeypatch):
    monkeypatch.setenv(ra.SKIP_TARGET_CHECK_ENV, "1")
    logits, _ = _good()
    with pytest.raises(ValueError, match="target contains 7"):
        ddf.relaxed_argmax_loss(logits, torch.tensor([0, 7, 1]), 0.1, backend="reference")


def test_tau_accepts_ints_floats_and_cpu_scalar_tensors():
    logits, target = _good()
    a = ddf.relaxed_argmax_loss(logits, target, 0.25, backend="reference")
    b = ddf.relaxed_argmax_loss(logits, target, torch.tensor(0.25), backend="reference")
    assert torch.equal(a, b)


def test_half_precision_loss_is_returned_in_float32():
    logits, target = _good()
    loss = ddf.relaxed_argmax_loss(logits.bfloat16(), target, 0.3, backend="reference")
    assert loss.dtype == torch.float32
    for dtype in (torch.float16, torch.bfloat16):
        fused = ddf.relaxed_argmax_loss(logits.to(dtype), target, 0.3, backend="cpp")
        assert fused.dtype == torch.float32
    # A backend without the dtype refuses it by name (triton has no float64).
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        ddf.relaxed_argmax_loss(logits.double(), target, 0.3, backend="triton")


# --------------------------------------------------------------- module ----


def test_module_matches_function_and_tau_is_settable():
    logits, target = random_batch((4, 3), 8, seed=13)
    module = RelaxedArgmaxLoss(0.5, score="prob", reduction="sum", backend="reference")
    assert isinstance(module, torch.nn.Module)
    assert ddf.RelaxedArgmaxLoss is RelaxedArgmaxLoss
    want = ddf.relaxed_argmax_loss(
        logits, target, 0.5, score="prob", reduction="sum", backend="reference"
    )
    assert torch.equal(module(logits, target), want)
    module.tau = 0.05  # a temperature schedule sets it each epoch
    want = ddf.relaxed_argmax_loss(
        logits, target, 0.05, score="prob", reduction="sum", backend="reference"
    )
    assert torch.equal(module(logits, target), want)
    assert "tau=0.05" in repr(module)
    with pytest.raises(ValueError, match="strictly inside"):
        module.tau = 1.5
    assert module.tau == 0.05
    with pytest.raises(ValueError, match="reduction"):
        RelaxedArgmaxLoss(0.1, reduction="avg")
    with pytest.raises(ValueError, match="strictly inside"):
        RelaxedArgmaxLoss(0.0)


# -------------------------------------------------------------- compile ----


def _compiled_matches_eager(fn, logits, target):
    eager_x = logits.clone().requires_grad_(True)
    eager = fn(eager_x, target)
    eager.backward()
    compiled_x = logits.clone().requires_grad_(True)
    compiled_fn = torch.compile(fn, fullgraph=True)
    compiled = compiled_fn(compiled_x, target)
    compiled.backward()
    # float32 throughout; inductor may fuse and reorder the reductions.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
    return compiled_fn


def test_torch_compile_fullgraph_reference_path():
    logits, target = random_batch((3, 4), 7, seed=14, dtype=torch.float32)

    def fn(x, t):
        a = ddf.relaxed_argmax_loss(x, t, 0.2, score="prob", reduction="none", backend="reference")
        b = ddf.decoder_loss(x, t, 0.2, nll_weight=0.5, backend="reference")
        return (a * torch.linspace(0.5, 1.5, 4)).sum() + b.loss + 0 * b.token_accuracy

    compiled_fn = _compiled_matches_eager(fn, logits, target)
    with pytest.raises(ValueError, match="target contains 7"):
        compiled_fn(logits, torch.full_like(target, 7))


def test_backend_resolution_is_a_compile_constant_without_importing_dynamo():
    # api.py sets by hand the mark torch.compiler.assume_constant_result sets,
    # so that importing the library does not import torch._dynamo (seconds per
    # process). If torch changes what the decorator does, this fails.
    def probe():
        return 1

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and set(vars(probe)) == {"_dynamo_marked_constant"}
    assert ra._resolve_backend._dynamo_marked_constant is True
    logits, target = random_batch((3, 4), 7, seed=16, dtype=torch.float32)
    _compiled_matches_eager(lambda x, t: ddf.relaxed_argmax_loss(x, t, 0.2), logits, target)
    code = (
        "import sys, ddvae_fast, ddvae_fast.loss.api, ddvae_fast.loss.linear, "
        "ddvae_fast.sampling.sampler, ddvae_fast.distributions.proposals; "
        "sys.exit('torch._dynamo' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_torch_compile_fullgraph_op_path():
    logits, target = random_batch((3, 4), 7, seed=15, dtype=torch.float32)

    def fn(x, t):
        a = ra._op_loss(x, t, 0.2, "prob", -100, "none", "reference")
        b = ra._op_loss(x, t, 0.1, "logit", -100, "mean", "reference")
        return (a * torch.linspace(0.5, 1.5, 4)).sum() + 3 * b

    compiled_fn = _compiled_matches_eager(fn, logits, target)
    # The target check runs inside the op, so it still runs in the compiled graph.
    with pytest.raises(ValueError, match="target contains 7"):
        compiled_fn(logits, torch.full_like(target, 7))
