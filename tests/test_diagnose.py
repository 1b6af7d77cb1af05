"""harness.diagnose: every known form recognised as itself and as nothing else, Definition 1.2
never mis-diagnosed (whatever the hyperparameters), real third-party optimizers put in their place,
and a failing optimizer reported, not raised."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import forms
from harness.diagnose import FORMS, PROJECTED_TOLERANCE, TOLERANCE, diagnose
from harness.optim import SGDW, ReferenceSGD

MOMENTUM_FREE = ("def12", "wd_after_update", "lr_read_once", "trust_ratio", "projected", "unknown")


def matched(d) -> set[str]:
    return {m.form for m in d.matches if m.matched}


def deviation(d, form: str) -> float:
    return next(m.deviation for m in d.matches if m.form == form)


def tolerance(form: str) -> float:
    return PROJECTED_TOLERANCE if form == "projected" else TOLERANCE


@pytest.mark.parametrize("form", list(forms.FORMS))
def test_each_hand_written_form_is_diagnosed_as_itself_and_only_itself(form):
    d = diagnose(forms.FORMS[form], f"harness.forms:{forms.FORMS[form].__name__}")
    assert d.form == form and d.conforms == (form == "def12") and not d.error
    assert matched(d) == ({form} - {"unknown"})
    assert [m.form for m in d.matches] == [f for f in FORMS if f != "unknown"]  # all probed (momentum 0.9)
    for m in d.matches:
        if m.form == form:
            assert m.deviation < tolerance(form) * 1e-3  # three decades of margin below the tolerance
        else:  # far from every other form (1e-4: dampening's floor τ ≥ 1e-4 seen from def12)
            assert m.deviation >= 1e-4 and m.deviation >= tolerance(m.form) * 1e4, m


@pytest.mark.parametrize("form", MOMENTUM_FREE + ("decoupled",))
def test_a_factory_without_momentum_probes_only_the_momentum_free_forms(form):
    cls = forms.FORMS[form]

    def factory(params, lr, weight_decay=0.0):
        return cls(params, lr, 0.0, weight_decay)

    d = diagnose(factory, f"no-momentum {form}")
    # without momentum, decoupled WD is exactly coupled WD: θ(1 − ηλ) − ηg = θ − η(g + λθ)
    assert d.form == ("def12" if form == "decoupled" else form)
    assert matched(d) == ({d.form} - {"unknown"})
    na = {m.form: m for m in d.matches if math.isnan(m.deviation)}
    assert set(na) == {"nesterov", "dampening", "lr_in_buffer", "decoupled"}
    assert all(not m.matched and m.note.startswith("not applicable") for m in na.values())
    assert "takes no momentum" in na["nesterov"].note and "identical to def12" in na["decoupled"].note


@pytest.mark.parametrize("factory, kwargs", [
    (torch.optim.SGD, {"foreach": False}), (torch.optim.SGD, {"foreach": True}),
    (torch.optim.SGD, {"fused": True}), (ReferenceSGD, {})], ids=["forloop", "foreach", "fused", "ReferenceSGD"])
def test_definition_1_2_implementations_conform(factory, kwargs):
    d = diagnose(factory, "def12 implementation", kwargs)
    assert d.form == "def12" and d.conforms and matched(d) == {"def12"}
    assert d.implication == "Definition 1.2: every claim of Li & Arora applies as stated"
    assert deviation(d, "def12") < TOLERANCE * 1e-3


@given(lr=st.floats(1e-3, 1.0), momentum=st.floats(0.0, 0.99), weight_decay=st.floats(0.0, 0.1),
       kwargs=st.sampled_from([{"foreach": False}, {"foreach": True}, {"fused": True}]))
def test_torch_sgd_is_def12_at_any_probe_hyperparameters(lr, momentum, weight_decay, kwargs):
    """Forms that coincide with def12 at these hyperparameters (momentum 0, λ → 0) are reported
    not applicable rather than matched, so def12 is the only match."""
    d = diagnose(torch.optim.SGD, "torch.optim:SGD", kwargs, lr=lr, momentum=momentum, weight_decay=weight_decay)
    assert d.form == "def12" and matched(d) == {"def12"}, [(m.form, m.deviation, m.note) for m in d.matches]


THIRD_PARTY = [  # (module, attribute, kwargs, form)
    ("timm.optim", "SGDW", {}, "decoupled"),
    ("pytorch_optimizer", "SGDW", {}, "decoupled"),
    ("timm.optim", "SGDP", {}, "projected"),
    ("pytorch_optimizer", "SGDP", {}, "projected"),
    ("timm.optim", "Lars", {}, "trust_ratio"),
    ("torch.optim", "SGD", {"nesterov": True}, "nesterov"),
    ("torch.optim", "SGD", {"dampening": 0.5}, "dampening"),
    ("harness.optim", "SGDW", {}, "decoupled"),
]


@pytest.mark.parametrize("module, name, kwargs, form", THIRD_PARTY,
                         ids=[f"{m}:{n}{'-' + '-'.join(k) if k else ''}" for m, n, k, _ in THIRD_PARTY])
def test_third_party_optimizers_are_put_in_their_place(module, name, kwargs, form):
    factory = getattr(pytest.importorskip(module), name)
    d = diagnose(factory, f"{module}:{name}", kwargs)
    assert d.form == form and not d.conforms and matched(d) == {form}, \
        [(m.form, m.deviation, m.note) for m in d.matches]
    assert deviation(d, form) < tolerance(form) * 1e-2 and deviation(d, "def12") > 0.1
    if form == "dampening":
        assert "fitted τ = 0.5" in d.implication


def test_implications_say_design_choice_or_bug():
    for form, (label, implication) in FORMS.items():
        assert label and implication
        if form not in ("def12", "unknown"):
            assert "design choice" in implication or "bug" in implication, form
    assert "Thm 2.9" in FORMS["decoupled"][1] and "a bug" in FORMS["lr_read_once"][1]


class RaisesInStep(torch.optim.SGD):
    def step(self, closure=None):
        raise ZeroDivisionError("planted bug in step()\nsecond line")


class WritesNaN(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(float("nan"))


def test_an_optimizer_that_raises_is_unknown_with_the_error():
    d = diagnose(RaisesInStep, "tests:RaisesInStep")
    assert d.form == "unknown" and not d.conforms
    assert d.error == "ZeroDivisionError: planted bug in step()"


def test_an_optimizer_that_writes_nan_matches_nothing():
    d = diagnose(WritesNaN, "tests:WritesNaN")
    assert d.form == "unknown" and not matched(d) and not d.error
    json.dumps(dataclasses.asdict(d))  # inf/NaN deviations still serialise


def test_a_factory_that_cannot_be_constructed_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"cannot be constructed .*TypeError: .*'bogus'") as info:
        diagnose(torch.optim.SGD, "torch.optim:SGD", {"bogus": 1})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="must not set lr"):
        diagnose(torch.optim.SGD, "torch.optim:SGD", {"lr": 1.0})


def test_diagnosis_is_plain_data():
    d = diagnose(forms.LrReadOnceSGD, "harness.forms:LrReadOnceSGD")  # about 10 ms: a figure, not a test
    data = json.loads(json.dumps(dataclasses.asdict(d)))
    assert data["form"] == "lr_read_once" and "silently ignored" in data["implication"]
    assert {"form", "label", "deviation", "matched", "note"} == set(data["matches"][0])
