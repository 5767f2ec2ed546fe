"""Hostile and edge-value input to the loss API (issue 9, classes 3 and 6; issue 12, items 3-6).

The Hypothesis suite feeds malformed arguments, one at a time, to
relaxed_argmax_loss, decoder_loss and RelaxedArgmaxLoss on a fast backend
and on the reference. Each call either returns the reference's answer (NaN
only where the reference gives NaN) or raises TypeError / ValueError /
RuntimeError whose message names the argument; nothing else may escape
(a segfault would end the run). The named-case tests below pin the
behaviours the issues list.
"""

from __future__ import annotations

import itertools
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.loss import api as _registers_the_ops  # noqa: F401
from ddvae_fast.loss import reference

HAS_CUDA = torch.cuda.is_available()
V = 5

# ------------------------------------------------------- hostile values ----


def _sparse():
    return torch.randn(3, V).to_sparse()


def _nested():
    return torch.nested.nested_tensor([torch.randn(2, V), torch.randn(3, V)])


BAD = {
    "logits": [
        lambda: [[0.0] * V] * 3,
        lambda: None,
        lambda: torch.ones(3, V, dtype=torch.int64),
        lambda: torch.ones(3, V, dtype=torch.complex64),
        lambda: torch.randn(3, 0),
        lambda: torch.tensor(1.0),
        lambda: torch.randn(3, V + 1),
        _sparse,
        _nested,
        lambda: torch.randn(3, V).half(),
        lambda: torch.randn(3, V).bfloat16(),
        lambda: torch.full((3, V), math.nan),
        lambda: torch.full((3, V), math.inf),
        lambda: torch.randn(V, 3).t(),
    ],
    "target": [
        lambda: [0, 1, 2],
        lambda: torch.tensor([0, 1, 2], dtype=torch.int32),
        lambda: torch.tensor([0.0, 1.0, 2.0]),
        lambda: torch.tensor([0, V, 1]),
        lambda: torch.tensor([0, -1, 1]),
        lambda: torch.tensor([0, 2**40, 1]),
        lambda: torch.tensor([0, 1]),
        lambda: torch.tensor([[0, 1, 2]]),
        lambda: torch.tensor([0, 1, 2]).to_sparse(),
        lambda: torch.tensor([-100, -100, -100]),
    ],
    "tau": [
        0.0,
        1.0,
        -0.5,
        2.0,
        math.nan,
        math.inf,
        "0.1",
        None,
        True,
        1j,
        [0.1],
        torch.tensor([0.1]),
        torch.tensor(True),
        np.float16(0.25),
        np.float32(0.25),
        np.longdouble(0.25),
        torch.tensor(0.25, dtype=torch.float64),
        0,
    ],
    "ignore_index": [2**70, -(2**70), 1.5, "x", None, True, np.int32(-100), np.int64(3)],
    "score": ["probability", None, 1, "LOGIT"],
    "reduction": ["avg", None, "Mean", 0],
    "backend": ["gpu", None, 3, "Reference"],
    "class_dim": [5, -3, 1.0, "1", True, 0],
}
DECODER_BAD = {
    "argmax_weight": [math.nan, math.inf, "1", None, torch.tensor([1.0]), np.float32(0.5)],
    "nll_weight": [-math.inf, "0", [0.5], np.float16(0.5)],
    "batch_first": [1, "yes", None, np.bool_(True)],
}
ERRORS = (TypeError, ValueError, RuntimeError)


def _make(value):
    return value() if callable(value) else value


def _call(kind, args, backend):
    args = dict(args, backend=backend) if "backend" not in args else dict(args)
    if kind == "function":
        return ddf.relaxed_argmax_loss(args.pop("logits"), args.pop("target"), **args)
    if kind == "module":
        logits, target = args.pop("logits"), args.pop("target")
        return ddf.RelaxedArgmaxLoss(**args)(logits, target)
    return ddf.decoder_loss(args.pop("logits"), args.pop("target"), **args)


def _result_tensors(out):
    return list(out) if isinstance(out, tuple) else [out]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_inputs_give_the_reference_answer_or_a_named_error(data):
    kind = data.draw(st.sampled_from(["function", "module", "decoder"]))
    table = dict(BAD, **DECODER_BAD) if kind == "decoder" else BAD
    if kind == "decoder":
        table = {k: v for k, v in table.items() if k not in ("reduction", "class_dim")}
    bad_arg = data.draw(st.sampled_from([None, *table]))
    args = {
        "logits": torch.randn(3, V, generator=torch.Generator().manual_seed(0)),
        "target": torch.tensor([0, 3, -100]),
        "tau": 0.2,
    }
    if bad_arg is not None:
        args[bad_arg] = _make(data.draw(st.sampled_from(table[bad_arg])))
    if kind == "decoder":
        for name in ("logits", "target"):  # (B, L, V) and (B, L): one sequence
            value = args[name]
            dense = isinstance(value, torch.Tensor) and value.layout == torch.strided
            if dense and not value.is_nested and value.dim() >= 1:
                args[name] = value.unsqueeze(0)
    fast_backend = data.draw(st.sampled_from(["cpp", "auto"]))
    fast_args = dict(args)
    if "backend" not in fast_args:
        fast_args["backend"] = fast_backend

    try:
        want = _call(kind, args if bad_arg == "backend" else dict(args, backend="reference"), None)
    except ERRORS as exc:
        want = exc
    try:
        got = _call(kind, fast_args, None)
    except ERRORS as exc:
        # the message names the argument at fault (the dtype a backend lacks
        # names the backend and the logits)
        names = {bad_arg} if bad_arg else set()
        if bad_arg in ("logits",):
            names.add("backend")
        assert bad_arg is not None, f"valid input raised {exc!r}"
        assert any(n in str(exc) for n in names), f"{bad_arg}: message {exc!r} does not name it"
        if isinstance(want, Exception):
            assert any(n in str(want) for n in names), f"reference: {want!r}"
        return
    assert not isinstance(want, Exception), f"reference raised {want!r}, {fast_backend} returned"
    logits = args.get("logits")
    dtype = logits.dtype if isinstance(logits, torch.Tensor) else torch.float32
    # float32 fused vs reference: sums of a few terms in another order (1e-5).
    # 16-bit logits: the reference evaluates each term in the 16-bit dtype while
    # the fused kernels accumulate in float32, so they differ by the reference's
    # own rounding: a few units of the dtype's epsilon, relative.
    tol = 3 * torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-5
    for g, w in zip(_result_tensors(got), _result_tensors(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.detach(), w.detach(), rtol=tol, atol=tol, equal_nan=True)


# ------------------------------------------------- named edge behaviours ----


def test_compiled_reference_path_raises_on_out_of_range_targets_as_eager_does():
    # 'sum' and 'none' never used the target count, so torch.compile dropped
    # the range check as dead code and returned NaN.
    logits, target = torch.randn(2, 3), torch.tensor([0, 7])
    for reduction in ("mean", "sum", "none"):

        def fn(x, t, reduction=reduction):
            return ddf.relaxed_argmax_loss(x, t, 0.3, reduction=reduction, backend="reference")

        with pytest.raises(ValueError, match="target contains 7"):
            fn(logits, target)
        compiled = torch.compile(fn, fullgraph=True)
        good = torch.tensor([0, 2])
        torch.testing.assert_close(compiled(logits, good), fn(logits, good))
        with pytest.raises(ValueError, match="target contains 7"):
            compiled(logits, target)

    def dec(x, t):
        out = ddf.decoder_loss(x, t, 0.3, backend="reference")
        return out.loss, out.sequence_accuracy

    with pytest.raises(ValueError, match="target contains 7"):
        torch.compile(dec, fullgraph=True)(logits[None], target[None])


EDGE_CASES = [
    pytest.param("reference", "cpu", torch.float32, id="reference"),
    pytest.param("cpp", "cpu", torch.float32, id="cpp"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu", torch.float32, id="triton"),
]


@pytest.mark.parametrize("backend, device, dtype", EDGE_CASES)
def test_a_row_with_a_nan_logit_is_never_correct(backend, device, dtype):
    # reference.correct_rows defines it: NaN anywhere in the row (target or
    # not) makes the position wrong. Needs the kernels of every backend to
    # agree (csrc/ and kernels/ implement it).
    target = torch.tensor([[0, 1, 2, 0]])
    logits = torch.full((1, 4, 3), -1.0)
    logits.scatter_(2, target.unsqueeze(2), 2.0)  # all correct ...
    logits[0, 1, 1] = math.nan  # ... but the target logit is NaN
    logits[0, 2, 0] = math.nan  # ... a non-target logit is NaN
    logits[0, 3, :] = math.nan  # ... every logit is NaN
    want = reference.correct_rows(logits, target, -100)
    assert want.tolist() == [[True, False, False, False]]
    out = ddf.decoder_loss(logits.to(device, dtype), target.to(device), 0.3, backend=backend)
    assert float(out.token_accuracy) == 0.25
    assert float(out.sequence_accuracy) == 0.0


EDGE_VALUES = (math.nan, math.inf, -math.inf, 1.0, -2.0)


def _every_edge_row(num_classes):
    """Every row of EDGE_VALUES of this width, once per target: (logits, target)."""
    rows = list(itertools.product(EDGE_VALUES, repeat=num_classes))
    logits = torch.tensor([row for row in rows for _ in range(num_classes)])
    return logits, torch.arange(num_classes).repeat(len(rows))


@pytest.mark.parametrize("backend, device, dtype", EDGE_CASES[1:])
@pytest.mark.parametrize("num_classes", [1, 2, 3])
@pytest.mark.parametrize("prob_mode", [False, True], ids=["logit", "prob"])
def test_every_non_finite_row_gives_the_references_values(
    backend, device, dtype, num_classes, prob_mode
):
    # All 3 * 5**V rows of NaN, +-inf and finite logits for V = 1, 2, 3 and
    # every target, with and without the nll term: the argmax and nll rows,
    # correct rows and the gradient equal the reference's, NaN exactly where
    # it has NaN and +-inf where it has +-inf (docs/loss_backend_contract.md).
    # Tolerance: these rows are fp32 sums of at most 3 terms, a few ulps apart.
    logits, target = _every_edge_row(num_classes)
    op = torch.ops.ddvae_fast.relaxed_argmax
    names = ("loss", "argmax", "nll", "correct_rows", "count", "grad")
    for nll_weight, need_nll in ((0.0, False), (0.0, True), (1.0, True), (0.5, False)):
        args = (0.1, prob_mode, -100, 1.0, nll_weight, "none", True, need_nll)
        want = op(logits, target, *args, "reference")
        got = op(logits.to(device, dtype), target.to(device), *args, backend)
        for name, w, g in zip(names, want, got):
            torch.testing.assert_close(
                g.cpu(),
                w,
                equal_nan=True,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m, name=name, nw=nll_weight, nn=need_nll: (
                    f"{name} (nll_weight {nw}, need_nll {nn}): {m}"
                ),
            )


def test_ignore_index_out_of_int64_is_a_clear_value_error():
    logits, target = torch.randn(3, V), torch.tensor([0, 1, 2])
    for call in (
        lambda: ddf.relaxed_argmax_loss(logits, target, 0.2, ignore_index=2**70),
        lambda: ddf.decoder_loss(logits[None], target[None], 0.2, ignore_index=2**70),
        lambda: ddf.RelaxedArgmaxLoss(0.2, ignore_index=2**70),
    ):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            call()


@pytest.mark.parametrize("make", [_sparse, _nested], ids=["sparse", "nested"])
def test_sparse_and_nested_logits_are_clear_errors(make):
    for backend in ("reference", "cpp"):
        with pytest.raises(ValueError, match="logits must be a dense strided tensor"):
            ddf.relaxed_argmax_loss(make(), torch.tensor([0, 1, 2]), 0.2, backend=backend)


@pytest.mark.parametrize(
    "tau",
    [
        0.25,
        np.float16(0.25),
        np.float32(0.25),
        np.float64(0.25),
        np.longdouble(0.25),
        torch.tensor(0.25),
        torch.tensor(0.25, dtype=torch.float64),
        torch.tensor(0.25).half(),
    ],
    ids=lambda t: type(t).__name__ + str(getattr(t, "dtype", "")),
)
def test_tau_accepts_every_real_scalar_type(tau):
    logits, target = torch.randn(3, V), torch.tensor([0, 1, 2])
    want = ddf.relaxed_argmax_loss(logits, target, 0.25)
    assert torch.equal(ddf.relaxed_argmax_loss(logits, target, tau), want)
    assert torch.equal(ddf.decoder_loss(logits[None], target[None], tau).argmax_loss, want)
    assert torch.equal(ddf.RelaxedArgmaxLoss(tau)(logits, target), want)


# ---------------------------------------------- CrossEntropyLoss layout ----


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", [(6, V), (2, V, 4), (2, V, 3, 4)])
def test_class_dim_1_takes_cross_entropy_shaped_calls(backend, shape):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
    target = torch.randint(0, V, shape[:1] + shape[2:], generator=gen)
    target.view(-1)[::4] = 7  # the pad token
    criterion = ddf.RelaxedArgmaxLoss(0.2, ignore_index=7, class_dim=1, backend=backend)
    # F.cross_entropy accepts exactly this call; ours equals the class-last reading
    F.cross_entropy(logits, target, ignore_index=7)
    want = ddf.relaxed_argmax_loss(
        logits.movedim(1, -1), target, 0.2, ignore_index=7, backend="reference"
    )
    torch.testing.assert_close(criterion(logits, target), want, rtol=1e-12, atol=1e-12)


def test_a_shape_that_reads_two_ways_raises():
    # (B, L, V) with L == V is also CE's (N, C, d1) with C == d1.
    logits, target = torch.randn(2, V, V), torch.zeros(2, V, dtype=torch.int64)
    for call in (
        lambda: ddf.relaxed_argmax_loss(logits, target, 0.2),
        lambda: ddf.RelaxedArgmaxLoss(0.2)(logits, target),
    ):
        with pytest.raises(ValueError, match="read two ways"):
            call()
    a = ddf.relaxed_argmax_loss(logits, target, 0.2, class_dim=-1)
    b = ddf.relaxed_argmax_loss(logits.transpose(1, 2), target, 0.2, class_dim=1)
    assert torch.equal(a, b)
    # CE layout without class_dim: a shape error that says how to ask for it
    with pytest.raises(ValueError, match="class_dim=1"):
        ddf.relaxed_argmax_loss(torch.randn(2, V, 3), torch.zeros(2, 3, dtype=torch.int64), 0.2)


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(weight=torch.ones(V)), "weight is not supported"),
        (dict(label_smoothing=0.1), "label_smoothing is not supported"),
    ],
)
def test_cross_entropy_options_without_meaning_are_refused_with_the_reason(option, match):
    with pytest.raises(ValueError, match=match):
        ddf.RelaxedArgmaxLoss(0.2, **option)
    with pytest.raises(ValueError, match=match):
        ddf.relaxed_argmax_loss(torch.randn(3, V), torch.tensor([0, 1, 2]), 0.2, **option)
    ddf.RelaxedArgmaxLoss(0.2, weight=None, label_smoothing=0.0)  # the defaults are fine


# ---------------------------------------------------------------- autocast ----


def test_cpu_bf16_autocast_runs_in_float32_like_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V)
    hidden, target = torch.randn(2, 3, 8), torch.randint(0, V, (2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)
        assert logits.dtype == torch.bfloat16
        ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        loss = ddf.relaxed_argmax_loss(logits, target, 0.2)  # backend='auto' -> cpp
        out = ddf.decoder_loss(logits, target, 0.2, nll_weight=1.0)
        op = torch.ops.ddvae_fast.relaxed_argmax(
            logits.reshape(-1, V),
            target.reshape(-1),
            0.2,
            False,
            -100,
            1.0,
            0.0,
            "mean",
            False,
            False,
            "cpp",
        )[0]
    assert ce.dtype == loss.dtype == out.loss.dtype == op.dtype == torch.float32
    # the same values as reading the bf16 logits in float32 outside autocast
    want = ddf.relaxed_argmax_loss(logits.float(), target, 0.2, backend="reference")
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        out.nll,
        F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1)),
        rtol=1e-6,
        atol=1e-6,
    )
    (loss + out.loss).backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
