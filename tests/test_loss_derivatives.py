"""Higher-order and forward-mode derivatives of the losses, on every backend (issue 9, class 1).

The fused backends ('cpp', 'triton') compute the first-order gradient in the
forward pass. Every other derivative must still be exact: create_graph=True
recomputes a differentiable gradient (reference.gradient), and forward mode
and torch.func transforms run on the reference graph. Each check compares a
backend with the reference backend, whose derivatives are plain autograd and
which gradcheck/gradgradcheck verify against finite differences in float64.

Tolerances: float64 paths agree with the reference to 1e-10 relative (both
compute the same formulas in float64; only summation order differs). The
interpreted Triton backend runs float32 only: it is compared with the float64
reference at 1e-4 relative (float32 rounding of z = (r_s - r_t)/tau + c at
tau = 0.3, amplified by at most a few units through sigmoid and softmax).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf

HAS_CUDA = torch.cuda.is_available()
# (backend, device, dtype of the checks); float64 where the backend has it.
CASES = [
    pytest.param("reference", "cpu", torch.float64, id="reference"),
    pytest.param("cpp", "cpu", torch.float64, id="cpp"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu", torch.float32, id="triton"),
]
FLOAT64_CASES = CASES[:2]
TAU = 0.3


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def batch(shape, num_classes, seed, device="cpu", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, num_classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, num_classes, shape, generator=gen)
    target.view(-1)[::3] = -100
    return logits.to(device=device, dtype=dtype), target.to(device)


def relaxed(backend, score="logit", reduction="mean"):
    return lambda x, t: ddf.relaxed_argmax_loss(
        x, t, TAU, score=score, reduction=reduction, backend=backend
    )


def decoder_terms(backend, score="logit"):
    # All three differentiable outputs, weighted so that each one matters.
    def fn(x, t):
        out = ddf.decoder_loss(x, t, TAU, nll_weight=0.4, score=score, backend=backend)
        return out.loss + 0.3 * out.argmax_loss - 0.7 * out.nll

    return fn


FUNCTIONS = {
    "logit-mean": lambda b: relaxed(b),
    "prob-none": lambda b: relaxed(b, "prob", "none"),
    "logit-sum": lambda b: relaxed(b, "logit", "sum"),
    "decoder-prob": lambda b: decoder_terms(b, "prob"),
}


@pytest.mark.parametrize("what", FUNCTIONS)
@pytest.mark.parametrize("backend, device, dtype", FLOAT64_CASES)
def test_gradcheck_and_gradgradcheck_float64(backend, device, dtype, what):
    logits, target = batch((2, 3), 5, seed=1)
    fn = FUNCTIONS[what](backend)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, target), (x,))
    assert torch.autograd.gradgradcheck(lambda a: fn(a, target), (x,))


@pytest.mark.parametrize("what", FUNCTIONS)
@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_hessian_vector_products_match_the_reference(backend, device, dtype, what):
    # d/dx <grad f(x), v>: the second backward through the fused op's backward.
    logits, target = batch((2, 3), 5, seed=2)
    v = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for name, dev, dt in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
        x = logits.to(dev, dt).requires_grad_(True)
        loss = FUNCTIONS[what](name)(x, target.to(dev))
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=dev)
        (g,) = torch.autograd.grad(loss, x, upstream.reshape(loss.shape), create_graph=True)
        (hv,) = torch.autograd.grad((g * v.to(dev, dt)).sum(), x)
        results.append((g.detach().double().cpu(), hv.double().cpu()))
    (g, hv), (g_ref, hv_ref) = results
    torch.testing.assert_close(g, g_ref, **tol(dtype))
    torch.testing.assert_close(hv, hv_ref, **tol(dtype))
    assert torch.count_nonzero(hv_ref) > 0  # the check has something to compare


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("score", ["logit", "prob"])
def test_full_hessians_match_the_reference(backend, device, dtype, score):
    # The reproducer: autograd.functional.hessian returned zeros on
    # cpp and triton. torch.func.hessian (forward over reverse) too.
    logits, target = batch((2,), 3, seed=4)
    target = torch.tensor([0, 1])
    want = torch.autograd.functional.hessian(
        lambda a: relaxed("reference", score)(a, target), logits
    )
    assert torch.count_nonzero(want) > 0
    x, t = logits.to(device, dtype), target.to(device)
    fn = relaxed(backend, score)
    got_reverse = torch.autograd.functional.hessian(lambda a: fn(a, t), x)
    got_func = torch.func.hessian(lambda a: fn(a, t))(x)
    torch.testing.assert_close(got_reverse.double().cpu(), want, **tol(dtype))
    torch.testing.assert_close(got_func.double().cpu(), want, **tol(dtype))


@pytest.mark.parametrize("what", FUNCTIONS)
@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_forward_mode_tangents_match_the_reference(backend, device, dtype, what):
    # torch.func.jvp returned a zero tangent on the fused backends.
    logits, target = batch((2, 3), 5, seed=5)
    tangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6)).double()
    fn = FUNCTIONS[what]
    want = torch.func.jvp(lambda a: fn("reference")(a, target), (logits,), (tangent,))
    assert torch.count_nonzero(want[1]) > 0
    x, t, v = logits.to(device, dtype), target.to(device), tangent.to(device, dtype)
    got = torch.func.jvp(lambda a: fn(backend)(a, t), (x,), (v,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, **tol(dtype))
    # the same through torch.autograd.forward_ad's dual tensors
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, v)
        out = torch.autograd.forward_ad.unpack_dual(fn(backend)(dual, t))
    torch.testing.assert_close(out.tangent.double().cpu(), want[1], **tol(dtype))


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_gradient_penalty_training_step_matches_the_reference(backend, device, dtype):
    # loss + lambda * |d loss / d logits|^2 through a linear head: the penalty
    # was silently dropped from the parameters' gradient.
    hidden, target = batch((4,), 6, seed=7)
    grads = []
    for name, dev, dt in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
        torch.manual_seed(0)
        head = torch.nn.Linear(6, 5).to(dev, torch.float64).to(dt)
        logits = head(hidden.to(dev, dt))
        loss = ddf.relaxed_argmax_loss(logits, target.to(dev).clamp(max=4), TAU, backend=name)
        (g,) = torch.autograd.grad(loss, logits, create_graph=True)
        (loss + 10.0 * g.pow(2).sum()).backward()
        grads.append([p.grad.double().cpu() for p in head.parameters()])
    penalty_only = []
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol(dtype))
        penalty_only.append(b)
    # the penalty changes the step (else this test would not see it dropped)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 5).double()
    ddf.relaxed_argmax_loss(head(hidden), target.clamp(max=4), TAU, backend="reference").backward()
    assert not torch.allclose(head.weight.grad, penalty_only[0])


@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_retained_graph_second_backward_equals_the_first(backend, device, dtype):
    logits, target = batch((3, 2), 5, seed=8, device=device, dtype=dtype)
    x = logits.requires_grad_(True)
    out = ddf.decoder_loss(x, target, TAU, nll_weight=0.5, backend=backend)
    first = torch.autograd.grad(out.loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(out.loss, x, retain_graph=True)[0]
    assert torch.equal(first, second)
    # and through the separately weighted terms, twice
    blend = 2 * out.argmax_loss + out.nll
    third = torch.autograd.grad(blend, x, retain_graph=True)[0]
    fourth = torch.autograd.grad(blend, x)[0]
    assert torch.equal(third, fourth)


@pytest.mark.parametrize("backend, device, dtype", FLOAT64_CASES)
@settings(max_examples=10, deadline=None)
@given(
    num_classes=st.sampled_from([1, 2, 7]),
    rows=st.integers(0, 5),
    score=st.sampled_from(["logit", "prob"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_double_backward_matches_the_reference_on_random_shapes(
    backend, device, dtype, num_classes, rows, score, reduction, seed
):
    logits, target = batch((rows,), num_classes, seed)
    v = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    results = []
    for name in (backend, "reference"):
        x = logits.clone().requires_grad_(True)
        loss = relaxed(name, score, reduction)(x, target)
        (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
        if not g.requires_grad:  # no row, or V = 1: the gradient is the constant 0
            results.append((g, torch.zeros_like(x)))
            continue
        (hv,) = torch.autograd.grad((g * v).sum(), x)
        results.append((g.detach(), hv))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol(dtype))


def test_torch_compile_fullgraph_first_order_still_works_with_the_terms():
    logits, target = batch((3, 4), 7, seed=9, dtype=torch.float32)

    def fn(x, t):
        out = ddf.decoder_loss(x, t, 0.2, nll_weight=0.5, backend="cpp")
        return out.loss + 0.5 * out.argmax_loss + 2.0 * out.nll

    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x = logits.clone().requires_grad_(True)
        f(x, target).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
