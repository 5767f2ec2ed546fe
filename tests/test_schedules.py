import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ddvae_fast as ddf

finite = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(start=finite, end=finite, duration=st.integers(1, 500), step=st.floats(-10, 1000))
def test_linear_schedule_matches_interpolation(start, end, duration, step):
    sched = ddf.LinearSchedule(start, end, duration)
    frac = min(max(step / duration, 0.0), 1.0)
    assert sched(step) == pytest.approx(start + (end - start) * frac, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    start=finite,
    end=finite,
    duration=st.integers(1, 500),
    begin=st.integers(0, 50),
    step=st.floats(-10, 1000),
)
def test_log_linear_schedule_is_linear_in_log_space(start, end, duration, begin, step):
    sched = ddf.LogLinearSchedule(start, end, duration, begin=begin)
    frac = min(max((step - begin) / duration, 0.0), 1.0)
    expected = math.log(start) + (math.log(end) - math.log(start)) * frac
    assert math.log(sched(step)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_appendix_b1_temperature_endpoints_and_midpoint():
    # Appendix B.1: tau from 1e-1 to 1e-3 over 100 epochs, log-linear: 1e-2 halfway.
    tau = ddf.LogLinearSchedule(1e-1, 1e-3, 100)
    assert tau(0) == pytest.approx(1e-1)
    assert tau(50) == pytest.approx(1e-2)
    assert tau(100) == pytest.approx(1e-3)
    assert tau(1000) == pytest.approx(1e-3)


def test_schedule_before_begin_is_start_and_zero_duration_is_a_step():
    beta = ddf.LinearSchedule(0.0, 1.0, 0, begin=2)
    assert beta(1) == 0.0 and beta(2) == 1.0
    ramp = ddf.LinearSchedule(0.0, 1.0, 10, begin=2)
    assert ramp(0) == 0.0 and ramp(7) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "cls,args",
    [
        (ddf.LogLinearSchedule, (0.0, 1.0, 10)),
        (ddf.LogLinearSchedule, (1.0, -1.0, 10)),
        (ddf.LinearSchedule, (0.0, 1.0, -1)),
        (ddf.LinearSchedule, (float("nan"), 1.0, 10)),
    ],
)
def test_schedule_rejects_bad_parameters(cls, args):
    with pytest.raises(ValueError):
        cls(*args)
