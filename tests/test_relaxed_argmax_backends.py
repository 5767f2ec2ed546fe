"""The fast relaxed arg-max backends ('cpp', 'triton') against the reference.

Main check (the Cut-Cross-Entropy three-way test): in a given dtype, a
backend's error against a float64 ground truth must not exceed the error of
plain PyTorch (the reference backend) in the same dtype plus a small stated
slack, for the loss and for the gradient. Backends run through the public API,
so the custom op, its autograd and the reductions are part of what is tested.
The slack is a few ulps of the largest true value plus a first-order bound on
the rounding error that the problem itself imposes on any implementation
(exp amplifying the rounding of z, 1/tau amplifying that of p, cancellation in
the softmax backward): see ``inherent_errors``. Measured on 'cpp' (float32 and
float64) and interpreted 'triton' over a few hundred random cases, the
backends used at most ~20% of their allowance, and typically a few percent.

- 'cpp' always runs (CI builds the extension; a missing module fails).
- 'triton' runs on CPU tensors under TRITON_INTERPRET=1 when there is no GPU
  (small shapes: the interpreter is slow), and on CUDA tensors in
  float32/bfloat16/float16 when there is one.
"""

from __future__ import annotations

import math
import os

import torch

# Triton must see the interpreter switch before it is first imported (the
# conftest does the same; this keeps the module runnable on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.backends import implementation, resolve_backend
from ddvae_fast.loss import reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# With a GPU, triton is tested on CUDA tensors (the interpreter is off there).
interpreted_only = pytest.mark.skipif(
    HAS_CUDA, reason="with a GPU, triton is covered by the CUDA cases"
)

# (backend, device, dtype)
COMPILED_CASES = [
    pytest.param("cpp", "cpu", torch.float32, id="cpp-f32"),
    pytest.param("cpp", "cpu", torch.float64, id="cpp-f64"),
    pytest.param("triton", "cuda", torch.float32, id="triton-cuda-f32", marks=needs_cuda),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16", marks=needs_cuda),
    pytest.param("triton", "cuda", torch.float16, id="triton-cuda-f16", marks=needs_cuda),
]
INTERPRETED_CASES = [
    pytest.param(
        "triton", "cpu", torch.float32, id="triton-interpreted-f32", marks=interpreted_only
    ),
]
ALL_CASES = COMPILED_CASES + INTERPRETED_CASES

TAUS = (1e-4, 0.1, 0.999)
SCORES = ("logit", "prob")
REDUCTIONS = ("mean", "sum", "none")

# Slack of the three-way test, relative to the largest ground-truth entry:
# eps(dtype) * (ELEMENT_ULPS + SUM_ULPS * sqrt(V)). Per element, the backends
# use their own exp/log1p/sigmoid (SIMD or libdevice approximations, a few ulp
# each, composed two or three deep in softplus); per row, they sum V terms in
# another order than torch.sum (blocked/SIMD partial sums, not pairwise), and
# reordered float sums differ by about sqrt(V) roundings. Neither allowance
# hides an O(1) defect or an error growing like eps * V.
ELEMENT_ULPS = 16.0
SUM_ULPS = 4.0
# Absolute floor: values below it are subnormal in the working precision
# (GPU kernels may flush them to zero; float16 storage cannot hold them).
ABS_FLOOR = {
    torch.float64: 1e-300,
    torch.float32: 1e-30,
    torch.bfloat16: 1e-30,
    torch.float16: 6e-8,
}


def loss_and_grad(logits, target, tau, score, ignore_index, reduction, upstream, backend):
    x = logits.detach().clone().requires_grad_(True)
    loss = ddf.relaxed_argmax_loss(
        x, target, tau, score=score, ignore_index=ignore_index, reduction=reduction, backend=backend
    )
    (grad,) = torch.autograd.grad(loss, x, upstream.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), grad


def inherent_errors(logits, target, tau, score, ignore_index, reduction, upstream, eps):
    """First-order bounds (loss, grad) on the rounding error of ANY evaluation at precision eps.

    Both the reference and a backend round z_s = (r_s - r_t)/tau + c, and
    exp/softplus/sigmoid amplify an error dz in z: softplus(z) by sigmoid(z) dz
    (absolute), sigmoid(z) by (1 - sigmoid(z)) dz (relative). In 'prob' mode
    the rounding of p (relative eps (|l - max l| + 2), from exp and the
    division) enters z divided by tau, and the gradient p_s (g_s - sum_j p_j g_j)
    rounds at eps times the size of the terms it subtracts. These errors
    belong to the problem, not to an implementation; two implementations can
    differ by about their sum, so the three-way test allows for them.
    """
    num_classes = logits.shape[-1]
    valid, _, index = reference._safe_target(target, num_classes, ignore_index)
    c = reference.log_odds(tau)
    cols = torch.arange(num_classes)
    others = cols != index.unsqueeze(1)
    if score == "prob":
        p = torch.softmax(logits, dim=-1)
        p_err = p * eps * ((logits - logits.max(dim=-1, keepdim=True).values).abs() + 2)
        r = p
    else:
        r = logits
    z = (r - r.gather(1, index.unsqueeze(1))) / tau + c
    dz = eps * (2 * z.abs() + 2 * abs(c))
    if score == "prob":
        dz = dz + (p_err + p_err.gather(1, index.unsqueeze(1))) / tau
    sig = torch.sigmoid(z)
    loss_rows = torch.where(others, sig * dz, 0.0).sum(dim=1)
    g = torch.where(others, sig / tau, 0.0)
    g_err = torch.where(others, g * (1 - sig) * dz, 0.0)
    g_abs = torch.where(others, g, g.sum(dim=1, keepdim=True))  # |g_t| = sum of the others
    g_err = torch.where(others, g_err, g_err.sum(dim=1, keepdim=True))
    if score == "prob":
        g_err = p * (g_err + (p * g_err).sum(dim=1, keepdim=True)) + eps * p * (
            g_abs + (p * g_abs).sum(dim=1, keepdim=True)
        )
    count = max(int(valid.sum()), 1)
    if reduction == "none":
        row_scale = upstream.abs()
        loss_err = float(loss_rows.max()) if loss_rows.numel() else 0.0
    else:
        row_scale = upstream.abs().expand(len(target)) / (count if reduction == "mean" else 1)
        loss_err = float(torch.where(valid, loss_rows, 0.0).sum()) / (
            count if reduction == "mean" else 1
        )
    grad_err = g_err * (row_scale * valid).unsqueeze(1)
    return loss_err, float(grad_err.max()) if grad_err.numel() else 0.0


def max_error(value, truth) -> float:
    err = (value.double().cpu() - truth).abs()
    if err.numel() == 0:
        return 0.0
    # a NaN in the result is an infinite error
    return float(torch.nan_to_num(err, nan=math.inf).max())


def make_batch(
    num_rows, num_classes, *, scale, ignore_fraction, confident_fraction, ignore_index, seed
):
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, (num_rows,), generator=gen)
    # confident rows: the target logit far above the rest (loss and gradient tiny)
    confident = (torch.rand(num_rows, generator=gen) < confident_fraction).nonzero().squeeze(1)
    if num_classes > 1 and confident.numel():
        top = logits[confident].max(dim=1).values
        logits[confident, target[confident]] = top + 30.0 * max(scale, 1.0)
    ignored = torch.rand(num_rows, generator=gen) < ignore_fraction
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    return logits, target


def check_three_way(
    backend,
    device,
    dtype,
    *,
    num_rows,
    num_classes,
    tau,
    score,
    reduction,
    ignore_index,
    ignore_fraction,
    confident_fraction,
    scale,
    seed,
):
    logits64, target = make_batch(
        num_rows,
        num_classes,
        scale=scale,
        ignore_fraction=ignore_fraction,
        confident_fraction=confident_fraction,
        ignore_index=ignore_index,
        seed=seed,
    )
    # Everyone starts from the same dtype-rounded logits (finite in float16 too).
    bound = torch.finfo(dtype).max / 4
    logits = logits64.clamp(-bound, bound).to(dtype)
    truth_logits = logits.double()
    gen = torch.Generator().manual_seed(seed + 1)
    if reduction == "none":
        upstream = torch.randn(num_rows, generator=gen, dtype=torch.float64).float().double()
    else:
        upstream = torch.tensor(0.75, dtype=torch.float64)

    truth = loss_and_grad(
        truth_logits, target, tau, score, ignore_index, reduction, upstream, "reference"
    )
    on_device = logits.to(device), target.to(device)
    plain = loss_and_grad(*on_device, tau, score, ignore_index, reduction, upstream, "reference")
    fast = loss_and_grad(*on_device, tau, score, ignore_index, reduction, upstream, backend)
    # working precision of the computation: float32 for every input but float64
    compute_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    inherent = inherent_errors(
        truth_logits, target, tau, score, ignore_index, reduction, upstream, compute_eps
    )

    assert fast[0].dtype == plain[0].dtype and fast[0].shape == plain[0].shape
    assert fast[1].dtype == dtype and fast[1].shape == logits.shape
    eps = torch.finfo(dtype).eps
    records = []
    for what, f, p, t, extra in zip(("loss", "grad"), fast, plain, truth, inherent):
        scale_t = float(t.abs().max()) if t.numel() else 0.0
        ulps = ELEMENT_ULPS + SUM_ULPS * math.sqrt(num_classes)
        # two implementations can each be off by the inherent error, in opposite directions
        slack = ABS_FLOOR[dtype] + ulps * eps * scale_t + 2.0 * extra
        err_fast, err_plain = max_error(f, t), max_error(p, t)
        if t.numel() and scale_t < torch.finfo(dtype).max:
            # stable where the true value is representable, even if plain PyTorch is not
            assert torch.isfinite(f).all(), f"{backend} {what} is not finite"
        assert err_fast <= err_plain + slack, (
            f"{backend} {what} error {err_fast:.3e} > reference error {err_plain:.3e} + "
            f"slack {slack:.3e} (max |truth| {scale_t:.3e}, inherent {extra:.3e})"
        )
        records.append((what, err_fast, err_plain, slack, scale_t))
    return records


def three_way_strategy(draw, vocab_sizes, row_counts):
    return dict(
        num_rows=draw(st.sampled_from(row_counts)),
        num_classes=draw(st.sampled_from(vocab_sizes)),
        tau=draw(st.sampled_from(TAUS)),
        score=draw(st.sampled_from(SCORES)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        ignore_index=draw(st.sampled_from([-100, 0])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.25, 1.0])),
        confident_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])),
        scale=draw(st.sampled_from([0.3, 3.0, 1e4])),
        seed=draw(st.integers(0, 2**20)),
    )


@pytest.mark.parametrize("backend, device, dtype", COMPILED_CASES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_three_way_error_compiled_backends(backend, device, dtype, data):
    params = three_way_strategy(data.draw, [1, 2, 37, 123, 1000, 4099], [0, 1, 507])
    check_three_way(backend, device, dtype, **params)


@pytest.mark.parametrize("backend, device, dtype", INTERPRETED_CASES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_three_way_error_triton_interpreted(backend, device, dtype, data):
    # The interpreter runs each program in numpy: keep N <= 64 and V <= 1000.
    params = three_way_strategy(data.draw, [1, 2, 37, 123, 1000], [0, 1, 64])
    check_three_way(backend, device, dtype, **params)


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
@pytest.mark.parametrize("score", SCORES)
def test_extreme_values_three_way(backend, device, dtype, score):
    # tau = 1e-4 with logits of magnitude 1e4: |z| ~ 2e8, nothing may overflow.
    for tau in (1e-4, 0.999):
        check_three_way(
            backend,
            device,
            dtype,
            num_rows=33,
            num_classes=37,
            tau=tau,
            score=score,
            reduction="none",
            ignore_index=-100,
            ignore_fraction=0.1,
            confident_fraction=0.3,
            scale=1e4,
            seed=7,
        )


# ------------------------------------------------------ decoder_loss ----


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 4),
    length=st.integers(0, 9),
    vocab=st.sampled_from([1, 2, 5, 37]),
    score=st.sampled_from(SCORES),
    nll_weight=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**20),
)
def test_decoder_statistics_agree_with_reference(
    backend, device, dtype, batch, length, vocab, score, nll_weight, seed
):
    gen = torch.Generator().manual_seed(seed)
    # small integers: ties (wrong tokens) and unique maxima both occur
    logits = torch.randint(-2, 3, (batch, length, vocab), generator=gen).to(dtype)
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    hit = torch.rand(batch, length, generator=gen) < 0.6
    logits.scatter_add_(2, target.unsqueeze(2), 4 * hit.unsqueeze(2).to(dtype))
    target[torch.rand(batch, length, generator=gen) < 0.2] = -100
    logits, target = logits.to(device), target.to(device)

    outs = []
    for name in ("reference", backend):
        x = logits.clone().requires_grad_(True)
        out = ddf.decoder_loss(x, target, 0.2, score=score, nll_weight=nll_weight, backend=name)
        out.loss.backward()
        outs.append((out, x.grad))
    (ref, ref_grad), (fast, fast_grad) = outs
    # strict comparisons of the same values: accuracies are exactly equal
    assert float(fast.token_accuracy) == float(ref.token_accuracy)
    assert float(fast.sequence_accuracy) == float(ref.sequence_accuracy)
    # integer-valued logits are exact in every dtype; the reference rounds its
    # elementwise math in the input dtype, hence a dtype-sized tolerance
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    for name in ("loss", "argmax_loss", "nll"):
        torch.testing.assert_close(
            getattr(fast, name).detach(), getattr(ref, name).detach(), rtol=tol, atol=tol
        )
    torch.testing.assert_close(fast_grad.double(), ref_grad.double(), rtol=tol, atol=tol)


# ------------------------------------------------ the contract itself ----


def _forward(backend):
    return implementation("relaxed_argmax", backend)


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
def test_raw_forward_matches_reference_forward(backend, device, dtype):
    # The contract outputs directly: rows, nll, correctness and the weighted,
    # scaled gradient, on a row-strided (non-contiguous) input read in place.
    gen = torch.Generator().manual_seed(3)
    wide = torch.randint(-3, 4, (40, 50), generator=gen).to(dtype)
    logits = wide[:, :37]  # row stride 50: a view, not a copy
    target = torch.randint(0, 37, (40,), generator=gen)
    target[::7] = -100
    logits, target = logits.to(device), target.to(device)
    before = logits.clone()
    scale = torch.tensor(0.125, device=device)
    for prob_mode in (False, True):
        want = reference.forward(logits, target, 0.3, prob_mode, -100, 0.6, 0.4, scale, True, True)
        got = _forward(backend)(logits, target, 0.3, prob_mode, -100, 0.6, 0.4, scale, True, True)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for w, g in zip(want[:2], got[:2]):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
        assert torch.equal(got[2], want[2])
        torch.testing.assert_close(
            got[3].float(),
            want[3].float(),
            rtol=tol if dtype in (torch.float32, torch.float64) else 1e-2,
            atol=tol if dtype in (torch.float32, torch.float64) else 1e-2,
        )
        assert got[3].is_contiguous() and got[3].dtype == dtype
    assert torch.equal(logits, before)  # the caller's logits are never written
    # need_grad=False: no gradient buffer; need_nll=False: zero nll rows
    a_rows, nll_rows, _, grad = _forward(backend)(
        logits, target, 0.3, False, -100, 1.0, 0.0, scale, False, False
    )
    assert grad.shape == (0,) and torch.count_nonzero(nll_rows) == 0
    torch.testing.assert_close(a_rows, want_rows(logits, target), rtol=1e-5, atol=1e-5)


def want_rows(logits, target):
    return reference.forward(
        logits, target, 0.3, False, -100, 1.0, 0.0, torch.tensor(1.0), False, False
    )[0]


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
def test_raw_forward_out_of_range_target_gives_nan_not_a_crash(backend, device, dtype):
    # The public API rejects these; the kernel's last line of defence is a
    # masked load and NaN losses on that row, other rows unaffected.
    logits = torch.randn(4, 6).to(dtype).to(device)
    target = torch.tensor([1, 6, -5, 2], device=device)
    a_rows, nll_rows, _, _ = _forward(backend)(
        logits, target, 0.2, False, -100, 1.0, 1.0, torch.tensor(1.0, device=device), True, True
    )
    assert torch.isnan(a_rows[1:3]).all() and torch.isnan(nll_rows[1:3]).all()
    assert torch.isfinite(a_rows[[0, 3]]).all() and torch.isfinite(nll_rows[[0, 3]]).all()


# ------------------------------------------------------- API behaviour ----


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
def test_non_contiguous_inputs_through_the_api(backend, device, dtype):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, 29, generator=gen).to(dtype).to(device)
    target = torch.randint(0, 29, (3, 2, 4), generator=gen).to(device)
    views = [
        base.transpose(0, 1),  # leading dims permuted: reshape must copy
        torch.cat([base, base], dim=-1).transpose(0, 1)[..., :29],  # strided rows
        base.transpose(0, 1).transpose(-1, -2).contiguous().transpose(-1, -2),  # stride(-1) != 1
    ]
    for view in views:
        assert not view.is_contiguous()
        for score in SCORES:
            a = loss_and_grad(
                view,
                target,
                0.2,
                score,
                -100,
                "none",
                torch.linspace(-1, 1, 24).reshape(3, 2, 4),
                backend,
            )
            b = loss_and_grad(
                view.contiguous(),
                target,
                0.2,
                score,
                -100,
                "none",
                torch.linspace(-1, 1, 24).reshape(3, 2, 4),
                backend,
            )
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend, device, dtype", ALL_CASES)
def test_second_backward_recomputes_and_all_ignored_is_zero(backend, device, dtype):
    logits = torch.randn(5, 7).to(dtype).to(device).requires_grad_(True)
    target = torch.tensor([1, 2, 3, 4, 5], device=device)
    loss = ddf.relaxed_argmax_loss(logits, target, 0.2, backend=backend)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()  # the kernel reruns into a new buffer: the same gradient again
    assert torch.equal(logits.grad, 2 * first)
    logits.grad = None
    loss = ddf.relaxed_argmax_loss(logits, torch.full_like(target, -100), 0.2, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_auto_backend_is_cpp_on_cpu_and_unavailable_backends_raise(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    auto = ddf.relaxed_argmax_loss(logits, target, 0.2)
    cpp = ddf.relaxed_argmax_loss(logits, target, 0.2, backend="cpp")
    assert torch.equal(auto, cpp)
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        ddf.relaxed_argmax_loss(logits.double(), target, 0.2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        # an explicit request that cannot run raises; nothing falls back
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ddf.relaxed_argmax_loss(logits, target, 0.2, backend="triton")


def test_torch_compile_fullgraph_public_api_on_cpp():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 7, generator=gen)
    target = torch.randint(0, 7, (3, 4), generator=gen)
    target[0, 0] = -100

    def fn(x, t):
        a = ddf.relaxed_argmax_loss(x, t, 0.2, score="prob", reduction="none")
        b = ddf.decoder_loss(x, t, 0.1, nll_weight=0.5)
        return (a * torch.linspace(0.5, 1.5, 4)).sum() + b.loss, b.token_accuracy

    eager_x = logits.clone().requires_grad_(True)
    eager, eager_acc = fn(eager_x, target)
    eager.backward()
    compiled_x = logits.clone().requires_grad_(True)
    compiled, compiled_acc = torch.compile(fn, fullgraph=True)(compiled_x, target)
    compiled.backward()
    # float32; inductor may reorder the small reductions around the op
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
    assert float(compiled_acc) == float(eager_acc)
