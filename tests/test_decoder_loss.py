"""decoder_loss: the DD-VAE decoder's training loss and statistics in one pass.

Each statistic is checked against a naive per-token/per-sequence computation
written here with Python loops in float64, on the reference path, on the
'cpp' backend (which CI builds: these tests fail if it is missing) and on the
custom-op path running the reference forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf
from ddvae_fast.loss import api as ra

PATHS = ("reference", "cpp", "op")


def decoder_loss_on(
    path,
    logits,
    target,
    tau,
    *,
    argmax_weight=1.0,
    nll_weight=0.0,
    score="logit",
    ignore_index=-100,
    batch_first=True,
):
    if path == "op":  # decoder_loss's fused path on the reference forward
        return ra._decoder_loss(
            logits,
            target,
            tau,
            argmax_weight,
            nll_weight,
            score,
            ignore_index,
            "reference",
            fused=True,
            batch_first=batch_first,
        )
    return ddf.decoder_loss(
        logits,
        target,
        tau,
        argmax_weight=argmax_weight,
        nll_weight=nll_weight,
        score=score,
        ignore_index=ignore_index,
        backend=path,
        batch_first=batch_first,
    )


def naive_statistics(logits, target, tau, ignore_index, score):
    """(argmax_loss, nll, token_accuracy, sequence_accuracy) by explicit loops."""
    batch, length, vocab = logits.shape
    rows = logits.double().tolist()
    argmax_sum = nll_sum = 0.0
    counted = correct_tokens = correct_sequences = 0
    for b in range(batch):
        sequence_ok = True
        for i in range(length):
            t = int(target[b, i])
            if t == ignore_index:
                continue
            row = rows[b][i]
            top = max(row)
            lse = top + math.log(sum(math.exp(v - top) for v in row))
            r = [math.exp(v - lse) for v in row] if score == "prob" else row
            for s in range(vocab):
                if s != t:
                    # -log sigma_tau(r_t - r_s), Eq. 12
                    a = -(r[t] - r[s]) / tau + math.log(1 / tau - 1)
                    argmax_sum += max(a, 0.0) + math.log1p(math.exp(-abs(a)))
            nll_sum += lse - row[t]
            # correct iff the target is the strict unique maximum (a tie is wrong)
            ok = all(row[t] > row[s] for s in range(vocab) if s != t)
            correct_tokens += ok
            sequence_ok &= ok
            counted += 1
        correct_sequences += sequence_ok
    if counted == 0:
        return 0.0, 0.0, 1.0, 1.0
    return (
        argmax_sum / counted,
        nll_sum / counted,
        correct_tokens / counted,
        correct_sequences / max(batch, 1),
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 4),
    length=st.integers(0, 5),
    vocab=st.sampled_from([1, 2, 3, 6]),
    ignore_index=st.sampled_from([-100, 0]),
    ignore_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    score=st.sampled_from(["logit", "prob"]),
    tau=st.sampled_from([0.01, 0.2, 0.9]),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
)
def test_statistics_match_naive_loops(
    batch, length, vocab, ignore_index, ignore_fraction, score, tau, path, seed
):
    gen = torch.Generator().manual_seed(seed)
    # Small integer logits: ties (which must count as wrong) are frequent,
    # and so are rows where the target is the unique maximum.
    logits = torch.randint(-2, 3, (batch, length, vocab), generator=gen).double()
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    # make about half the positions decode correctly, so sequence accuracy varies
    hit = torch.rand(batch, length, generator=gen) < 0.5
    logits.scatter_add_(2, target.unsqueeze(2), 5.0 * hit.unsqueeze(2).double())
    ignored = torch.rand(batch, length, generator=gen) < ignore_fraction
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)

    out = decoder_loss_on(
        path,
        logits,
        target,
        tau,
        ignore_index=ignore_index,
        score=score,
        nll_weight=0.5,
        argmax_weight=2.0,
    )
    argmax_loss, nll, token_acc, seq_acc = naive_statistics(
        logits, target, tau, ignore_index, score
    )
    # float64 everywhere; loops vs vectorized rounding only
    close = dict(rel=1e-10, abs=1e-12)
    assert float(out.argmax_loss) == pytest.approx(argmax_loss, **close)
    assert float(out.nll) == pytest.approx(nll, **close)
    assert float(out.loss) == pytest.approx(2.0 * argmax_loss + 0.5 * nll, **close)
    # accuracies are ratios of integer counts: exact
    assert float(out.token_accuracy) == pytest.approx(token_acc, rel=1e-15)
    assert float(out.sequence_accuracy) == pytest.approx(seq_acc, rel=1e-15)


@pytest.mark.parametrize("path", PATHS)
def test_ties_count_as_wrong_and_ignored_positions_do_not_count(path):
    logits = torch.tensor(
        [
            [[3.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 9.0]],
            [[0.0, 5.0, 1.0], [1.0, 1.0, 1.0], [4.0, 0.0, 4.0]],
        ],
        dtype=torch.float64,
    )
    # sequence 0: correct, a two-way tie on the target (wrong), ignored
    # sequence 1: correct, ignored, a tie on the target (wrong)
    target = torch.tensor([[0, 0, -100], [1, -100, 2]])
    out = decoder_loss_on(path, logits, target, 0.1)
    assert float(out.token_accuracy) == 2 / 4
    assert float(out.sequence_accuracy) == 0.0
    # sequence 0: correct, ignored, wrong (target 1 scores 0 < 9)
    # sequence 1: correct, then only ignored positions: the sequence is correct
    target = torch.tensor([[0, -100, 1], [1, -100, -100]])
    out = decoder_loss_on(path, logits, target, 0.1)
    assert float(out.token_accuracy) == 2 / 3
    assert float(out.sequence_accuracy) == 0.5


@pytest.mark.parametrize("path", PATHS)
def test_nll_weight_blends_gradients_linearly(path):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 6, (3, 4), generator=gen)
    target[0, 1] = -100

    def grad_of(argmax_weight, nll_weight):
        x = logits.clone().requires_grad_(True)
        out = decoder_loss_on(
            path, x, target, 0.2, argmax_weight=argmax_weight, nll_weight=nll_weight, score="prob"
        )
        out.loss.backward()
        return out.loss.detach(), x.grad

    argmax_only_loss, argmax_only = grad_of(1.0, 0.0)
    nll_only_loss, nll_only = grad_of(0.0, 1.0)
    blend_loss, blend = grad_of(0.7, 0.3)
    # The nll gradient is that of PyTorch's mean cross-entropy over non-ignored tokens.
    x = logits.clone().requires_grad_(True)
    F.cross_entropy(x.reshape(-1, 6), target.reshape(-1), ignore_index=-100).backward()
    torch.testing.assert_close(nll_only, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blend, 0.7 * argmax_only + 0.3 * nll_only, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        blend_loss, 0.7 * argmax_only_loss + 0.3 * nll_only_loss, rtol=1e-12, atol=1e-12
    )
    # with argmax_weight = 1, nll_weight = 0 the loss is relaxed_argmax_loss's mean
    want = ddf.relaxed_argmax_loss(logits, target, 0.2, score="prob", backend="reference")
    torch.testing.assert_close(argmax_only_loss, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_losses_carry_gradients_and_accuracies_are_detached(path):
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 3))
    out = decoder_loss_on(path, logits, target, 0.2, nll_weight=1.0)
    assert isinstance(out, ddf.DecoderLoss)
    for name in ("loss", "argmax_loss", "nll"):
        term = getattr(out, name)
        assert term.requires_grad and term.shape == () and term.dtype == torch.float64
    for name in ("token_accuracy", "sequence_accuracy"):
        stat = getattr(out, name)
        assert not stat.requires_grad and stat.shape == () and stat.dtype == torch.float64


def _blend_oracle(logits, target, score, a, b, c, argmax_weight, nll_weight):
    """Gradient of c * loss + a * argmax_loss + b * nll from relaxed_argmax_loss and CE."""
    x = logits.clone().requires_grad_(True)
    argmax = ddf.relaxed_argmax_loss(x, target, 0.2, score=score, backend="reference")
    nll = F.cross_entropy(x.reshape(-1, x.shape[-1]), target.reshape(-1), ignore_index=-100)
    total = c * (argmax_weight * argmax + nll_weight * nll) + a * argmax + b * nll
    (grad,) = torch.autograd.grad(total, x)
    return grad


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=12, deadline=None)
@given(
    a=st.sampled_from([0.0, 1.0, -0.5, 3.0]),
    b=st.sampled_from([0.0, 1.0, 0.25]),
    c=st.sampled_from([0.0, 1.0]),
    weights=st.sampled_from([(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)]),
    score=st.sampled_from(["logit", "prob"]),
    seed=st.integers(0, 2**16),
)
def test_any_blend_of_the_terms_trains_with_the_right_gradient(path, a, b, c, weights, score, seed):
    # The authors' pretraining blend puts argmax_loss and nll into a loss dict
    # and weights them there: every blend must get the true gradient,
    # whatever weights the forward was called with.
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 6, (3, 4), generator=gen)
    target[0, 1] = -100
    x = logits.clone().requires_grad_(True)
    out = decoder_loss_on(
        path, x, target, 0.2, argmax_weight=weights[0], nll_weight=weights[1], score=score
    )
    total = c * out.loss + a * out.argmax_loss + b * out.nll
    if not total.requires_grad:  # a = b = c = 0: nothing to train
        return
    (grad,) = torch.autograd.grad(total, x)
    want = _blend_oracle(logits, target, score, a, b, c, *weights)
    # float64 on both sides; the fused gradients round differently (sums of V terms)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_nll_alone_trains_every_decoder_parameter(path):
    # A decoder trained on out.nll alone got no gradient before; a clamp loop
    # over p.grad then crashed on None.
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 7).double()
    hidden = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.randint(0, 7, (2, 3))
    out = decoder_loss_on(path, head(hidden), target, 0.2)
    out.nll.backward()
    for p in head.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    x = hidden @ head.weight.detach().T + head.bias.detach()
    x.requires_grad_(True)
    F.cross_entropy(x.reshape(-1, 7), target.reshape(-1)).backward()
    torch.testing.assert_close(head.bias.grad, x.grad.sum(dim=(0, 1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_time_major_input_is_read_in_place_and_grouped_by_time(path, monkeypatch):
    # 2 sequences of length 3 in time-major (L, B, V): sequence 0 decodes
    # every token, sequence 1 misses one. Read as batch-first it would be
    # 3 "sequences" of length 2, two of them all correct: 2/3 instead of 1/2.
    target = torch.tensor([[0, 1], [2, 0], [1, 2]])  # (L, B)
    logits = torch.full((3, 2, 3), -1.0, dtype=torch.float64)
    logits.scatter_(2, target.unsqueeze(2), 1.0)
    logits[1, 1] = torch.tensor([0.0, 0.0, 5.0])  # position 1 of sequence 1 decodes wrong
    out = decoder_loss_on(path, logits, target, 0.2, batch_first=False)
    assert float(out.sequence_accuracy) == 0.5
    assert float(out.token_accuracy) == 5 / 6
    batch_first = decoder_loss_on(path, logits.transpose(0, 1), target.t(), 0.2)
    assert float(batch_first.sequence_accuracy) == 0.5
    torch.testing.assert_close(out.loss, batch_first.loss, rtol=1e-12, atol=0)
    if path in ("cpp", "op"):  # the fused forward reads the caller's storage
        seen = []
        forward = ra.implementation("relaxed_argmax", "cpp" if path == "cpp" else "reference")

        def recording(logits_rows, *args):
            seen.append(logits_rows.data_ptr())
            return forward(logits_rows, *args)

        monkeypatch.setattr(ra, "implementation", lambda op, name: recording)
        decoder_loss_on(path, logits, target, 0.2, batch_first=False)
        assert seen == [logits.data_ptr()]


def test_batch_first_is_a_bool_and_the_layout_is_named_in_errors():
    logits, target = torch.randn(3, 2, 4), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="batch_first"):
        ddf.decoder_loss(logits, target, 0.2, batch_first=1)
    with pytest.raises(ValueError, match=r"\(L, B, V\)"):
        ddf.decoder_loss(logits[0], target[0], 0.2, batch_first=False)


@pytest.mark.parametrize("path", PATHS)
def test_all_ignored_and_empty_batches_are_defined(path):
    for logits, target in [
        (torch.randn(2, 3, 4, dtype=torch.float64), torch.full((2, 3), -100)),
        (torch.randn(0, 3, 4, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.int64)),
        (torch.randn(2, 0, 4, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.int64)),
    ]:
        x = logits.requires_grad_(True)
        out = decoder_loss_on(path, x, target, 0.2, nll_weight=1.0)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and float(out.argmax_loss.detach()) == 0.0
        assert float(out.nll.detach()) == 0.0
        # no position to decode: vacuously every counted token and sequence is right
        assert float(out.token_accuracy) == 1.0 and float(out.sequence_accuracy) == 1.0
        assert torch.count_nonzero(x.grad) == 0


def test_float32_statistics_for_half_precision_reference():
    logits = torch.randn(2, 3, 5).bfloat16()
    out = ddf.decoder_loss(logits, torch.randint(0, 5, (2, 3)), 0.2, backend="reference")
    assert all(v.dtype == torch.float32 for v in out)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(logits=torch.randn(6, 5), target=torch.zeros(6, dtype=torch.int64)),
            ValueError,
            r"\(B, L, V\)",
        ),
        (dict(nll_weight=float("nan")), ValueError, "nll_weight"),
        (dict(argmax_weight="1"), TypeError, "argmax_weight"),
        (dict(tau=1.0), ValueError, "strictly inside"),
        (dict(target=torch.full((2, 3), 5)), ValueError, "target contains 5"),
        (dict(score="probability"), ValueError, "score"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    args = dict(logits=torch.randn(2, 3, 5), target=torch.zeros(2, 3, dtype=torch.int64), tau=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ddf.decoder_loss(
            args.pop("logits"), args.pop("target"), args.pop("tau"), backend="reference", **args
        )
