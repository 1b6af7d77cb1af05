"""Schedules are pure functions of the step; their closed forms and recursions must agree."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.schedules import (Constant, ExpLR, SettingError, StepDecay, TexpPP, real_root_alpha,
                               zero_buffer_exp_lr)

lrs = st.floats(1e-3, 1.0)
wds = st.floats(1e-6, 1e-1)
momenta = st.floats(0.0, 0.95)


def in_region(lr, wd, momentum):
    return lr * wd <= (1 - math.sqrt(momentum)) ** 2


@given(lrs, wds)
def test_thm21_schedule_is_eta_rho_pow(lr, wd):
    if lr * wd >= 1:
        return
    rho = 1 - lr * wd
    s = ExpLR(lr, wd, 0.0)
    for k in (0, 1, 7, 50):
        assert s(k) == pytest.approx(lr * rho ** (-2 * k - 1), rel=1e-12)
        assert s.weight_scale(k) == pytest.approx(rho ** (-k), rel=1e-12)


@given(lrs, wds, momenta)
def test_alpha_is_the_larger_root(lr, wd, momentum):
    if not in_region(lr, wd, momentum):
        with pytest.raises(SettingError, match="real root"):
            real_root_alpha(lr, wd, momentum)
        return
    a = real_root_alpha(lr, wd, momentum)
    assert a * a - (1 + momentum - lr * wd) * a + momentum == pytest.approx(0, abs=1e-12)
    assert a >= momentum / a - 1e-12  # the other root is γ/α


@given(lrs, wds)
def test_zero_buffer_recursion_without_momentum_is_thm21(lr, wd):
    if lr * wd >= 1:
        return
    rec, closed = TexpPP(Constant(lr), wd, 0.0), ExpLR(lr, wd, 0.0)
    for k in (0, 3, 40):
        assert rec(k) == pytest.approx(closed(k), rel=1e-10)
        assert rec.weight_scale(k) == pytest.approx(closed.weight_scale(k), rel=1e-10)


@given(lrs, wds, momenta)
def test_zero_buffer_recursion_tends_to_alpha(lr, wd, momentum):
    if not in_region(lr, wd, momentum) or (1 - math.sqrt(momentum)) ** 2 - lr * wd < 1e-4:
        return  # at the boundary the two roots merge and convergence is only algebraic
    rec = zero_buffer_exp_lr(lr, wd, momentum)
    alpha = real_root_alpha(lr, wd, momentum)
    t = 3000
    beta_t = rec.weight_scale(t - 1) / rec.weight_scale(t)
    assert beta_t == pytest.approx(alpha, rel=1e-6)


def test_schedules_are_pure_functions_of_the_step():
    rec = zero_buffer_exp_lr(0.1, 5e-3, 0.9)
    late_first = rec(100)
    fresh = zero_buffer_exp_lr(0.1, 5e-3, 0.9)
    assert [fresh(k) for k in range(101)][-1] == late_first == rec(100)


def test_step_decay():
    s = StepDecay(0.1, (10, 20), 0.1)
    assert [s(0), s(9), s(10), s(19), s(20)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("bad", [dict(lr=0.0, wd=1e-3, momentum=0.9), dict(lr=0.1, wd=-1, momentum=0.0),
                                 dict(lr=0.1, wd=1e-3, momentum=1.0), dict(lr=1.0, wd=0.5, momentum=0.9)])
def test_bad_settings_are_rejected_with_a_reason(bad):
    with pytest.raises(SettingError) as err:
        ExpLR(bad["lr"], bad["wd"], bad["momentum"])
    assert str(err.value)


def test_recursion_rejects_nonpositive_beta():
    with pytest.raises(SettingError, match="β_1"):
        TexpPP(Constant(2.0), 1.0, 0.0)(0)
