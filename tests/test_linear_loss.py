"""The output projection fused with the relaxed arg-max loss (ddvae_fast/loss/linear.py).

Main check (the Cut-Cross-Entropy three-way test, as in
tests/test_relaxed_argmax_backends.py): in a given dtype, the fused path's
error against a float64 ground truth (the 'reference' backend on float64
inputs: F.linear, the reference loss, autograd) must not exceed the error of
plain PyTorch in the same dtype (the 'reference' backend on the same inputs)
plus a stated slack, for the loss and for the gradients of hidden, weight and
bias. The slack (``slack``) is

    ABS_FLOOR + eps * (ELEMENT_ULPS + SUM_ULPS * sqrt(K)) * magnitude + 2 * first_order

- magnitude: the largest entry of the result computed with absolute values
  (|g| @ |W| for grad_hidden, |g|.T @ |h| for grad_weight, sum |g| for the
  bias, |truth| for the loss), the scale of the rounding error of a K-term
  sum in any order (K = V for the loss and grad_hidden, N for grad_weight and
  grad_bias, which the fused path sums chunk by chunk);
- first_order: a first-order worst-case bound on the error any evaluation in
  precision eps makes because the logits themselves are rounded (Higham's
  gamma_{H+2} for an H-term dot product plus the bias), propagated through
  the loss's derivatives (``first_order_bounds``). The fused path's matmuls
  see chunks, not the whole (N, H) matrix, so its logits can round
  differently from F.linear's; two evaluations can each be off by this bound,
  in opposite directions, hence the factor 2.
Neither term hides an O(1) defect (a dropped or doubled chunk, a wrong row,
a missing bias or scale), which these tests exist to catch.
"""

from __future__ import annotations

import math
import os

import torch

# Triton must see the interpreter switch before it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.loss import linear as linear_module
from ddvae_fast.loss import reference
from ddvae_fast.loss.linear import (
    CHUNK_BYTES,
    chunk_rows_for,
    linear_decoder_loss,
    linear_relaxed_argmax_loss,
)

HAS_CUDA = torch.cuda.is_available()
interpreted_only = pytest.mark.skipif(HAS_CUDA, reason="with a GPU the interpreter is off")

ELEMENT_ULPS = 16.0
SUM_ULPS = 4.0
ABS_FLOOR = {torch.float64: 1e-300, torch.float32: 1e-30}
TAUS = (0.05, 0.3, 0.9)
SCORES = ("logit", "prob")
REDUCTIONS = ("mean", "sum", "none")


def make_problem(
    num_rows,
    features,
    num_classes,
    *,
    scale,
    with_bias,
    ignore_fraction,
    ignore_index,
    strided,
    seed,
):
    """float64 hidden (N, H), weight (V, H), bias (V,) or None, target (N,)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(num_rows, features + 3, generator=gen, dtype=torch.float64)
    # strided=True: rows of a wider matrix, a view with row stride H + 3
    hidden = scale * (wide[:, :features] if strided else wide[:, :features].contiguous())
    weight = torch.randn(num_classes, features, generator=gen, dtype=torch.float64)
    weight = weight / math.sqrt(features)
    bias = 0.5 * torch.randn(num_classes, generator=gen, dtype=torch.float64) if with_bias else None
    target = torch.randint(0, num_classes, (num_rows,), generator=gen)
    ignored = torch.rand(num_rows, generator=gen) < ignore_fraction
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return hidden, weight, bias, target


def loss_and_grads(
    backend,
    hidden,
    weight,
    bias,
    target,
    tau,
    score,
    ignore_index,
    reduction,
    upstream,
    chunk_rows=None,
):
    """(loss, grad_hidden, grad_weight, grad_bias or None) through the public function."""
    h = hidden.detach().clone().requires_grad_(True)
    if hidden.stride() != h.stride():  # keep the layout under test (clone may compact it)
        h = torch.empty_strided(hidden.shape, hidden.stride(), dtype=hidden.dtype)
        h.copy_(hidden)
        h.requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss = linear_relaxed_argmax_loss(
        h,
        w,
        target,
        tau,
        bias=b,
        score=score,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        chunk_rows=chunk_rows,
    )
    leaves = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return [loss.detach(), grads[0], grads[1], grads[2] if b is not None else None]


def first_order_bounds(
    hidden, weight, bias, target, tau, score, ignore_index, reduction, upstream, eps
):
    """(first_order, magnitude) per output [loss, grad_hidden, grad_weight, grad_bias].

    float64 inputs. dl bounds the rounding of each logit (an H-term dot
    product plus the bias, stored in precision eps). In 'prob' mode it moves
    p by at most p_s (dl_s + sum_j p_j dl_j), plus the rounding of exp and the
    division. z_s = (r_s - r_t)/tau + c then moves by (dr_s + dr_t)/tau plus
    its own rounding; softplus(z) moves by sigmoid(z) dz, u_s = sigmoid(z_s)/tau
    by u_s (1 - sigmoid(z_s)) dz (u_t = -sum of the others), and in 'prob' mode
    the softmax backward p (u - <p, u>) by the sum of its terms' moves.
    """
    features = hidden.shape[1]
    num_classes = weight.shape[0]
    abs_logits = hidden.abs() @ weight.abs().T
    logits = hidden @ weight.T
    if bias is not None:
        abs_logits = abs_logits + bias.abs()
        logits = logits + bias
    dl = (features + 2) * eps * abs_logits
    valid, _, index = reference._safe_target(target, num_classes, ignore_index)
    c = reference.log_odds(tau)
    others = torch.arange(num_classes) != index.unsqueeze(1)
    if score == "prob":
        p = torch.softmax(logits, dim=1)
        dp = p * (dl + (p * dl).sum(dim=1, keepdim=True))
        dp = dp + p * eps * ((logits - logits.max(dim=1, keepdim=True).values).abs() + 2)
        r, dr = p, dp
    else:
        r, dr = logits, dl
    z = (r - r.gather(1, index.unsqueeze(1))) / tau + c
    dz = (dr + dr.gather(1, index.unsqueeze(1))) / tau + eps * (2 * z.abs() + 2 * abs(c))
    sig = torch.sigmoid(z)
    loss_rows = torch.where(others, sig * dz, 0.0).sum(dim=1)
    u = torch.where(others, sig / tau, 0.0)
    du = torch.where(others, u * (1 - sig) * dz, 0.0)
    du = torch.where(others, du, du.sum(dim=1, keepdim=True))
    u_abs = torch.where(others, u, u.sum(dim=1, keepdim=True))
    if score == "prob":
        pu = (p * u_abs).sum(dim=1, keepdim=True)
        g_abs = p * (u_abs + pu)
        g_err = dp * (u_abs + pu) + p * (
            du + (p * du).sum(dim=1, keepdim=True) + (dp * u_abs).sum(dim=1, keepdim=True)
        )
        g_err = g_err + eps * g_abs
    else:
        g_abs, g_err = u_abs, du
    count = max(int(valid.sum()), 1)
    if reduction == "none":
        row_scale = upstream.abs().reshape(-1)
        loss_err = float(loss_rows.max()) if loss_rows.numel() else 0.0
    else:
        scalar = float(upstream.abs()) / (count if reduction == "mean" else 1)
        row_scale = torch.full((len(target),), scalar, dtype=torch.float64)
        loss_err = float(torch.where(valid, loss_rows, 0.0).sum()) * scalar
    row_scale = (row_scale * valid).unsqueeze(1)
    g_abs, g_err = g_abs * row_scale, g_err * row_scale

    def biggest(t):
        return float(t.max()) if t.numel() else 0.0

    first_order = [
        loss_err,
        biggest(g_err @ weight.abs()),
        biggest(g_err.T @ hidden.abs()),
        biggest(g_err.sum(dim=0)),
    ]
    magnitude = [
        None,  # the loss uses |truth|
        biggest(g_abs @ weight.abs()),
        biggest(g_abs.T @ hidden.abs()),
        biggest(g_abs.sum(dim=0)),
    ]
    return first_order, magnitude


def max_error(value, truth) -> float:
    err = (value.double() - truth).abs()
    if err.numel() == 0:
        return 0.0
    return float(torch.nan_to_num(err, nan=math.inf).max())


def check_three_way(
    backend,
    dtype,
    *,
    num_rows,
    features,
    num_classes,
    tau,
    score,
    reduction,
    ignore_index,
    ignore_fraction,
    with_bias,
    strided,
    chunk_rows,
    scale,
    seed,
):
    hidden64, weight64, bias64, target = make_problem(
        num_rows,
        features,
        num_classes,
        scale=scale,
        with_bias=with_bias,
        ignore_fraction=ignore_fraction,
        ignore_index=ignore_index,
        strided=strided,
        seed=seed,
    )
    # Everyone starts from the same dtype-rounded inputs.
    hidden = hidden64.to(dtype)
    if strided:
        hidden = torch.cat([hidden, hidden[:, :3]], dim=1)[:, :features]
    weight = weight64.to(dtype)
    bias = None if bias64 is None else bias64.to(dtype)
    truth_inputs = (hidden.double(), weight.double(), None if bias is None else bias.double())
    gen = torch.Generator().manual_seed(seed + 1)
    if reduction == "none":
        upstream = torch.randn(num_rows, generator=gen, dtype=torch.float64).float().double()
    else:
        upstream = torch.tensor(0.75, dtype=torch.float64)
    common = (target, tau, score, ignore_index, reduction, upstream)
    truth = loss_and_grads("reference", *truth_inputs, *common)
    plain = loss_and_grads("reference", hidden, weight, bias, *common)
    fast = loss_and_grads(backend, hidden, weight, bias, *common, chunk_rows=chunk_rows)
    eps = torch.finfo(dtype).eps
    first_order, magnitude = first_order_bounds(*truth_inputs, *common, eps)
    lengths = [num_classes, num_classes, num_rows, num_rows]

    assert fast[0].dtype == plain[0].dtype and fast[0].shape == plain[0].shape
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    for what, f, p, t, extra, mag, k in zip(
        names, fast, plain, truth, first_order, magnitude, lengths
    ):
        if t is None:
            assert f is None and p is None
            continue
        assert f.dtype == p.dtype and f.shape == t.shape, what
        if mag is None:
            mag = float(t.abs().max()) if t.numel() else 0.0
        slack = ABS_FLOOR[dtype] + (ELEMENT_ULPS + SUM_ULPS * math.sqrt(k)) * eps * mag
        slack += 2.0 * extra
        assert torch.isfinite(f).all(), f"{backend} {what} is not finite"
        err_fast, err_plain = max_error(f, t), max_error(p, t)
        assert err_fast <= err_plain + slack, (
            f"{backend} {what} error {err_fast:.3e} > reference error {err_plain:.3e} + "
            f"slack {slack:.3e} (magnitude {mag:.3e}, first order {extra:.3e})"
        )


def problem_strategy(draw, vocab_sizes, row_counts, feature_counts, chunk_choices):
    return dict(
        num_rows=draw(st.sampled_from(row_counts)),
        features=draw(st.sampled_from(feature_counts)),
        num_classes=draw(st.sampled_from(vocab_sizes)),
        tau=draw(st.sampled_from(TAUS)),
        score=draw(st.sampled_from(SCORES)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        ignore_index=draw(st.sampled_from([-100, 0])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.25, 1.0])),
        with_bias=draw(st.booleans()),
        strided=draw(st.booleans()),
        chunk_rows=draw(st.sampled_from(chunk_choices)),
        scale=draw(st.sampled_from([0.3, 3.0])),
        seed=draw(st.integers(0, 2**20)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_three_way_cpp(dtype, data):
    # chunk_rows 1, 4 and 5 split N = 7 and 33 with a remainder; None is the budget's choice
    params = problem_strategy(
        data.draw, [1, 2, 37, 123], [0, 1, 7, 33], [1, 5, 17], [None, 1, 4, 5, 64]
    )
    check_three_way("cpp", dtype, **params)


@interpreted_only
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_three_way_triton_interpreted(data):
    # The interpreter runs each program in numpy: tiny shapes only.
    params = problem_strategy(data.draw, [2, 37], [0, 5, 9], [3, 8], [None, 2, 4])
    check_three_way("triton", torch.float32, **params)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_three_way_cpp_every_combination(score, reduction, with_bias):
    # Each mode x reduction x bias at least once, with an uneven last chunk (50 = 3 * 16 + 2),
    # odd V and H, some ignored rows and strided hidden rows.
    check_three_way(
        "cpp",
        torch.float32,
        num_rows=50,
        features=13,
        num_classes=301,
        tau=0.1,
        score=score,
        reduction=reduction,
        ignore_index=-100,
        ignore_fraction=0.2,
        with_bias=with_bias,
        strided=True,
        chunk_rows=16,
        scale=2.0,
        seed=11,
    )


# ------------------------------------------------------------- chunking ----


def test_chunk_rows_for_fits_the_budget():
    for num_rows, num_classes, dtype in [
        (8192, 32000, torch.float32),
        (10, 7, torch.float64),
        (3, 2**30, torch.float32),
        (0, 5, torch.float32),
    ]:
        rows = chunk_rows_for(num_rows, num_classes, dtype)
        per_row = 2 * num_classes * torch.empty((), dtype=dtype).element_size()
        assert 1 <= rows <= max(num_rows, 1)
        # as many rows as fit, unless the rows run out or a single row is over budget
        assert rows * per_row <= CHUNK_BYTES or rows == 1
        assert rows == num_rows or rows == 1 or (rows + 1) * per_row > CHUNK_BYTES
    assert chunk_rows_for(8192, 32000, torch.float32) == 131


def test_kernel_sees_chunks_of_the_requested_size(monkeypatch):
    # Spy on the backend forward: every row is seen once, in order, chunk_rows at a time.
    seen = []
    real = linear_module.implementation

    def spying(op, backend):
        forward = real(op, backend)

        def wrapped(logits, target, *args):
            seen.append((logits.shape[0], target.clone()))
            return forward(logits, target, *args)

        return wrapped

    monkeypatch.setattr(linear_module, "implementation", spying)
    hidden, weight, _, target = make_problem(
        23,
        4,
        9,
        scale=1.0,
        with_bias=True,
        ignore_fraction=0.0,
        ignore_index=-100,
        strided=False,
        seed=1,
    )
    linear_relaxed_argmax_loss(hidden.float(), weight.float(), target, 0.2, chunk_rows=5)
    assert [n for n, _ in seen] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([t for _, t in seen]), target)


# ----------------------------------------------------- edges and errors ----


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_rows(backend, reduction):
    hidden = torch.randn(0, 3, 6, requires_grad=True)
    weight = torch.randn(11, 6, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    target = torch.zeros(0, 3, dtype=torch.long)
    loss = linear_relaxed_argmax_loss(
        hidden, weight, target, 0.2, bias=bias, reduction=reduction, backend=backend
    )
    assert loss.shape == ((0, 3) if reduction == "none" else ())
    loss.sum().backward()
    if reduction != "none":
        assert float(loss) == 0.0
    assert hidden.grad.shape == hidden.shape
    assert torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(bias.grad) == 0


def test_all_ignored_is_zero_with_zero_gradients():
    hidden = torch.randn(9, 5, requires_grad=True)
    weight = torch.randn(7, 5, requires_grad=True)
    target = torch.full((9,), -100)
    loss = linear_relaxed_argmax_loss(hidden, weight, target, 0.2, chunk_rows=4)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_non_contiguous_time_major_hidden():
    # (L, B, H) transposed to (B, L, H): reshape copies it; the result must not depend on layout.
    gen = torch.Generator().manual_seed(2)
    time_major = torch.randn(6, 4, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(21, 9, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 21, (4, 6), generator=gen)
    upstream = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    view = time_major.transpose(0, 1)
    assert not view.is_contiguous()
    args = (target, 0.3, "prob", -100, "none", upstream)
    a = loss_and_grads("cpp", view, weight, None, *args, chunk_rows=5)
    b = loss_and_grads("reference", view.contiguous(), weight, None, *args)
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_frozen_weight_no_grad_and_upstream_scale():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 4, generator=gen, dtype=torch.float64)  # frozen
    target = torch.randint(0, 8, (10,), generator=gen)
    loss = linear_relaxed_argmax_loss(hidden, weight, target, 0.2, reduction="sum", chunk_rows=3)
    (3.0 * loss).backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref = linear_relaxed_argmax_loss(
        ref_hidden, weight, target, 0.2, reduction="sum", backend="reference"
    )
    (3.0 * ref).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-12, atol=1e-12)
    assert weight.grad is None
    with torch.no_grad():
        quiet = linear_relaxed_argmax_loss(hidden, weight, target, 0.2, reduction="sum")
    torch.testing.assert_close(quiet, ref.detach(), rtol=1e-12, atol=1e-12)


def test_second_backward_raises_but_none_reduction_recomputes():
    hidden = torch.randn(6, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = linear_relaxed_argmax_loss(hidden, weight, target, 0.2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()
    # 'none' keeps the inputs and recomputes, so a second backward is the same again
    hidden.grad = None
    rows = linear_relaxed_argmax_loss(hidden, weight, target, 0.2, reduction="none")
    rows.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


def _bad_inputs():
    h, w, b, t = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5), torch.tensor([0, 1, 2, 3])
    return [
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
        (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
        (dict(bias=[0.0] * 5), TypeError, "bias must be a torch.Tensor or None"),
        (dict(hidden=h.long()), TypeError, "hidden must be float16"),
        (dict(weight=w.double()), TypeError, "weight dtype"),
        (dict(bias=b.double()), TypeError, "bias dtype"),
        (dict(weight=torch.randn(5, 4)), ValueError, "H must match"),
        (dict(weight=torch.randn(5)), ValueError, r"weight must be \(V, H\)"),
        (dict(weight=torch.randn(0, 3)), ValueError, "V >= 1"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(V,\)"),
        (dict(weight=w.to("meta")), ValueError, "weight must be on hidden's device"),
        (dict(target=t.int()), TypeError, "target must be int64"),
        (dict(target=t[:3]), ValueError, "target shape"),
        (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, r"outside \[0, 5\)"),
        (dict(tau=1.0), ValueError, "tau must lie strictly inside"),
        (dict(score="softmax"), ValueError, "score must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be >= 1"),
        (dict(chunk_rows=True), TypeError, "chunk_rows must be an int"),
        (dict(backend="gpu"), ValueError, "unknown backend"),
        (
            # triton has no float64 (ddvae_fast/backends.py REGISTRY)
            dict(hidden=h.double(), weight=w.double(), bias=b.double(), backend="triton"),
            TypeError,
            "backend 'triton' supports",
        ),
    ], dict(hidden=h, weight=w, bias=b, target=t, tau=0.2)


@pytest.mark.parametrize("index", range(len(_bad_inputs()[0])))
def test_bad_input_raises_naming_the_argument(index):
    cases, good = _bad_inputs()
    change, exc, match = cases[index]
    args = {**good, **change}
    with pytest.raises(exc, match=match):
        linear_relaxed_argmax_loss(
            args.pop("hidden"), args.pop("weight"), args.pop("target"), args.pop("tau"), **args
        )


def test_decoder_loss_bad_layout_raises():
    hidden, weight, target = torch.randn(2, 3, 4, 5), torch.randn(7, 5), torch.zeros(2, 3, 4).long()
    with pytest.raises(ValueError, match=r"expects \(B, L, H\) hidden"):
        linear_decoder_loss(hidden, weight, target, 0.2)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        linear_decoder_loss(hidden[0], weight, target[0], 0.2, batch_first=1)


# -------------------------------------------------- linear_decoder_loss ----


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 4),
    length=st.integers(0, 7),
    vocab=st.sampled_from([1, 2, 5, 37]),
    score=st.sampled_from(SCORES),
    nll_weight=st.sampled_from([0.0, 0.5]),
    with_bias=st.booleans(),
    batch_first=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_decoder_loss_equals_decoder_loss_of_the_logits(
    backend, batch, length, vocab, score, nll_weight, with_bias, batch_first, seed
):
    gen = torch.Generator().manual_seed(seed)
    # small integers: exact logits, so ties (wrong tokens) and unique maxima both occur
    hidden = torch.randint(-2, 3, (batch, length, 6), generator=gen).double()
    weight = torch.randint(-1, 2, (vocab, 6), generator=gen).double()
    bias = torch.randint(-1, 2, (vocab,), generator=gen).double() if with_bias else None
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    target[torch.rand(batch, length, generator=gen) < 0.2] = -100
    kwargs = dict(score=score, nll_weight=nll_weight, argmax_weight=0.7)

    h = hidden.clone().requires_grad_(True)
    logits = F.linear(h, weight, bias)
    want = ddf.decoder_loss(logits, target, 0.2, backend="reference", **kwargs)
    want.loss.backward()

    # time-major input is handed over as a (L, B, H) view of the same data
    g = (hidden if batch_first else hidden.transpose(0, 1).contiguous()).requires_grad_(True)
    got = linear_decoder_loss(
        g,
        weight,
        target if batch_first else target.T,
        0.2,
        bias=bias,
        batch_first=batch_first,
        backend=backend,
        chunk_rows=3,
        **kwargs,
    )
    got.loss.backward()
    # accuracies are exact; float64 losses to rounding
    assert float(got.token_accuracy) == float(want.token_accuracy)
    assert float(got.sequence_accuracy) == float(want.sequence_accuracy)
    for name in ("loss", "argmax_loss", "nll"):
        torch.testing.assert_close(
            getattr(got, name).detach(), getattr(want, name).detach(), rtol=1e-12, atol=1e-12
        )
    grad = g.grad if batch_first else g.grad.transpose(0, 1)
    torch.testing.assert_close(grad, h.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------- compile ----


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 4, 6, generator=gen)
    weight = torch.randn(11, 6, generator=gen)
    bias = torch.randn(11, generator=gen)
    target = torch.randint(0, 11, (3, 4), generator=gen)
    target[0, 0] = -100

    def fn(h, w, b, t):
        rows = linear_relaxed_argmax_loss(
            h, w, t, 0.2, bias=b, score="prob", reduction="none", chunk_rows=5
        )
        out = linear_decoder_loss(h, w, t, 0.1, bias=b, nll_weight=0.5)
        return (rows * torch.linspace(0.5, 1.5, 4)).sum() + out.loss, out.token_accuracy

    results = []
    for run in (fn, torch.compile(fn, fullgraph=True)):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        loss, accuracy = run(*leaves, target)
        loss.backward()
        results.append((loss.detach(), accuracy, *(x.grad for x in leaves)))
    for eager, compiled in zip(*results):
        # float32; inductor may reorder the small reductions around the ops
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
