import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf


def _naive_argmax(row):
    best = max(row)
    hits = [i for i, x in enumerate(row) if x == best]
    return hits[0] if len(hits) == 1 else -1


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(-3, 3), min_size=1, max_size=7), min_size=1, max_size=6
    ).filter(lambda rs: len({len(r) for r in rs}) == 1),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_matches_naive_argmax_with_ties_undefined(rows, dtype):
    # Small integer scores make ties frequent, which is the case under test.
    scores = torch.tensor(rows, dtype=dtype)
    got = ddf.deterministic_argmax(scores)
    assert got.tolist() == [_naive_argmax(r) for r in rows]
    assert got.dtype == torch.int64


def test_dim_argument_and_undefined_token():
    scores = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, -5.0]])
    assert ddf.deterministic_argmax(scores, dim=0).tolist() == [-1, -1]
    assert ddf.UNDEFINED_TOKEN == -1


@pytest.mark.parametrize(
    "scores,exc",
    [
        (torch.tensor([1, 2]), TypeError),
        ([1.0, 2.0], TypeError),
        (torch.tensor(1.0), ValueError),
        (torch.empty(3, 0), ValueError),
        (torch.tensor([float("nan"), 1.0]), ValueError),
    ],
)
def test_bad_input(scores, exc):
    with pytest.raises(exc):
        ddf.deterministic_argmax(scores)
