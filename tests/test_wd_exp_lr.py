"""WD ≡ exp-LR beyond the fixed table: hypothesis over the hyperparameters, every optimizer
implementation the harness ships, and the negative controls failing by a clear margin."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases.wd_exp_lr import CASES, MLP, wd_vs_exp_case
from harness import registry
from harness.runner import RunEnv
from harness.schedules import SettingError
from harness.session import execute


# Upper end of ηλ drawn. Beyond it the WD arm's weights shrink by ρ = 1 − ηλ per step towards the
# eps = 1e-30 floor of the normalization (hypothesis found ηλ = 0.875, ρ^16 ≈ 3e-15: gap 1.25e-9),
# which is float64 + eps, not the theorem. Practical training uses ηλ ≈ 1e-5 … 1e-3.
MAX_ETA_LAMBDA = 0.05


@st.composite
def in_region_settings(draw):
    """(η, λ, γ) with ηλ ≤ (1 − √γ)², the real-root region of Thm 2.9 (drawn as a fraction of it)."""
    momentum = draw(st.sampled_from([0.0]) | st.floats(0.0, 0.95))
    lr = draw(st.floats(1e-3, 0.5))
    frac = draw(st.floats(1e-3, 0.99))
    wd = frac * min((1 - math.sqrt(momentum)) ** 2, MAX_ETA_LAMBDA) / lr
    return lr, wd, momentum


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(in_region_settings(), st.integers(4, 48), st.integers(10, 60), st.sampled_from(["thm", "zero_buffer"]))
def test_equivalence_holds_across_hyperparameters(hp, width, steps, form):
    lr, wd, momentum = hp
    case = wd_vs_exp_case("hypothesis", model=(MLP[0], {**MLP[1], "width": width}), lr=lr, wd=wd,
                          momentum=momentum, form=form, steps=steps)
    outcome = execute(case, RunEnv(seeds=(0,)))
    gap = outcome.verdicts.set_index("property").measured
    assert outcome.status == "ok", (hp, width, steps, form, outcome.message)
    assert gap["function_gap"] < 1e-9 and gap["si_norm_ratio"] < 1e-9


@settings(max_examples=25)
@given(st.floats(0.0, 0.95), st.floats(1e-3, 1.0), st.floats(1.01, 100.0))
def test_settings_outside_the_real_root_region_are_rejected(momentum, lr, excess):
    wd = excess * (1 - math.sqrt(momentum)) ** 2 / lr
    for form in ("thm", "zero_buffer"):
        with pytest.raises(SettingError, match=r"\(1 − √γ\)²"):
            wd_vs_exp_case("outside", lr=lr, wd=wd, momentum=momentum, form=form)


EXACT_POSITIVE = ["wdexp-thm2.1-mlp-bn", "wdexp-thm2.9-mlp-bn", "wdexp-zerobuf-mlp-bn", "wdexp-zerobuf-cnn-bn"]


@pytest.mark.parametrize("optimizer", ["torch.optim:SGD", "harness.optim:sgd_foreach",
                                       "harness.optim:sgd_forloop", "harness.optim:ReferenceSGD"])
@pytest.mark.parametrize("case_id", EXACT_POSITIVE)
def test_conforming_implementations_pass(optimizer, case_id):
    outcome = execute(registry.get(case_id), RunEnv(optimizer=optimizer))
    assert outcome.status == "ok", outcome.message


@pytest.mark.parametrize("case_id", ["wdexp-thm2.9-mlp-bn", "wdexp-zerobuf-mlp-bn", "wdexp-zerobuf-cnn-bn"])
def test_decoupled_weight_decay_optimizer_fails(case_id):
    """SGDW plugged in as the system under test: with momentum it is not Definition 1.2."""
    outcome = execute(registry.get(case_id), RunEnv(optimizer="harness.optim:SGDW"))
    assert outcome.status == "fail"
    assert outcome.verdicts.set_index("property").measured["function_gap"] > 1e-6


def test_without_momentum_decoupled_and_coupled_coincide():
    """Not a loophole: with γ = 0, θ(1 − ηλ) − ηg is exactly θ − η(g + λθ), so SGDW conforms."""
    outcome = execute(registry.get("wdexp-thm2.1-mlp-bn"), RunEnv(optimizer="harness.optim:SGDW"))
    assert outcome.status == "ok", outcome.message


class NoBufferState(__import__("torch").optim.Optimizer):
    """A plug-in that keeps its momentum elsewhere: cases seeding 'momentum_buffer' must skip."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self, closure=None):
        import torch
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                        v.mul_(group["momentum"]).add_(p.grad + group["weight_decay"] * p)
                        p.sub_(group["lr"] * v)


def test_plugin_without_buffer_state_skips_seeded_cases_and_passes_zero_buffer_ones():
    spec = f"{__name__}:NoBufferState"
    seeded = execute(registry.get("wdexp-thm2.9-mlp-bn"), RunEnv(optimizer=spec))
    assert seeded.status == "skipped" and "momentum_buffer" in seeded.message
    zero = execute(registry.get("wdexp-zerobuf-mlp-bn"), RunEnv(optimizer=spec))
    assert zero.status == "ok", zero.message


NEGATIVES = [c for c in CASES if c.negative]


@pytest.mark.parametrize("case", NEGATIVES, ids=[c.id for c in NEGATIVES])
def test_negative_controls_fail_by_a_clear_margin(case):
    """CLAIMS.md §1: each negative control misses the exact bound by orders, not by noise."""
    outcome = execute(case, RunEnv())
    assert outcome.status == "ok", outcome.message  # ok = every property failed as intended
    for v in outcome.verdicts.itertuples():
        assert not v.passed
        assert v.measured > 100 * v.tolerance, (v.property, v.measured, v.tolerance)


def test_every_claim_case_family_has_a_negative_control():
    by_property = {}
    for case in registry.all_cases().values():
        for prop in case.properties:
            by_property.setdefault((case.claim, prop.name), set()).add(case.negative)
    for (claim, prop), kinds in by_property.items():
        if prop in ("function_gap", "eval_gap_recomputed", "train_gap_within_roundoff_floor",
                    "function_gap_first_10_steps"):
            assert kinds == {True, False} or prop == "eval_gap_recomputed", (claim, prop, kinds)
