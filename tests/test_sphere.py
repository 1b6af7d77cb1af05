"""The sphere measurements and theory (harness.sphere) against hand-computed values."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from harness import sphere
from harness.schedules import Constant
from harness.spec import Arm, Group


def _ctx(weight: torch.nn.Parameter, t: int, state: dict):
    model = SimpleNamespace(si_names=("w",), named_parameters=lambda: [("w", weight)])
    arm = SimpleNamespace(model=model, spec=Arm("a", Group(Constant(0.1))))
    return SimpleNamespace(arms={"a": arm}, t=t, state=state)


def test_angular_update_is_exact_for_a_known_rotation_even_for_tiny_angles():
    """Rotate a 2-D weight by a fixed tiny angle per step: the RMS must equal that angle, where
    arccos of a float32 cosine would return 0."""
    step = 1e-5
    state, rows = {}, []
    w = torch.nn.Parameter(torch.tensor([3.0, 0.0], dtype=torch.float64))
    for t in range(0, 11):
        with torch.no_grad():
            w.copy_(3.0 * torch.tensor([math.cos(t * step), math.sin(t * step)], dtype=torch.float64))
        rows += sphere.angular(_ctx(w, t, state), window=10)
    got = dict((m, v) for _, m, v in rows)
    assert got["angular_rms:w"] == pytest.approx(step, rel=1e-6)
    assert got["norm:w"] == pytest.approx(3.0)
    assert got["eff_lr:w"] == pytest.approx(0.1 / 9)
    assert math.acos(float(torch.tensor(math.cos(step), dtype=torch.float32))) == 0.0


def test_equilibrium_constants():
    assert sphere.equilibrium_angle(0.1, 5e-3, 0.9) == pytest.approx(math.sqrt(2 * 5e-4 / 1.9))
    assert sphere.equilibrium_angle(0.1, 2e-2, 0.0) == pytest.approx(math.acos(1 - 2e-3))
    assert sphere.equilibrium_angle(0.1, 5e-3, 0.9, decoupled=True) == pytest.approx(
        sphere.equilibrium_angle(0.1, 5e-3, 0.9) * math.sqrt(0.1))
    assert sphere.relaxation_time(0.1, 5e-3, 0.9) == pytest.approx(50)


def _series(values, quantity="eff_lr", arm="a", layer="w"):
    return pd.DataFrame([dict(case="c", arm=arm, seed=0, step=20 * (i + 1), metric=f"{quantity}:{layer}", value=v)
                         for i, v in enumerate(values)])


def test_time_to_equilibrium_is_the_first_window_inside_the_band():
    values = [0.1, 0.5, 0.8, 0.7, 0.96, 1.0, 1.02, 0.99, 1.0, 1.01]
    assert sphere.time_to_equilibrium(_series(values), "a", late=(161, None), band=0.25)[0] == 60
    assert sphere.time_to_equilibrium(_series(values), "a", late=(161, None), band=0.1)[0] == 100


def test_time_scaling_property_separates_exponents():
    """Synthetic times 400 / 800 / 200 for λ_e, λ_e/2, 2λ_e: exponent 1 holds, exponent 0 fails."""
    rows = []
    for arm, t_eq in (("base", 400), ("half", 800), ("double", 200)):
        values = [0.1 if 20 * (i + 1) < t_eq else 1.0 for i in range(100)]
        rows.append(_series(values, arm=arm))
    res = pd.concat(rows)
    lam = {"base": 1.0, "half": 0.5, "double": 2.0}
    ok = sphere.time_scales_as("base", lam, 1.0, 0.3, late=(1500, None), source="t", name="p").check(res, None)
    bad = sphere.time_scales_as("base", lam, 0.0, 0.3, late=(1500, None), source="t", name="p").check(res, None)
    assert ok.passed and ok.measured < 0.01
    assert not bad.passed and bad.measured == pytest.approx(1.0)
