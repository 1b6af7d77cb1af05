"""Li, Lyu & Arora (NeurIPS 2020), "Reconciling Modern Deep Learning with Traditional Optimization
Analyses: The Intrinsic Learning Rate", exact reparametrization (CLAIMS.md §4): on a scale-invariant
net, (η, λ, w₀) and (η/c², λc², w₀/c) give w′_t = w_t/c at every step, so only ηλ can matter.

Non-SI parameters (classifier) keep (η, λ) and their initial values in both arms, as for WD ≡ exp-LR.
"""
from __future__ import annotations

from cases.wd_exp_lr import CNN, IMAGES, MLP, NEG, VECTORS
from harness.checks import max_below
from harness.schedules import Constant
from harness.spec import FUNCTION_GAP, Arm, Case, Group

CLAIM = "li-lyu-arora-2020/intrinsic-lr-reparametrization"
ETA, LAM, GAMMA, STEPS = 0.1, 5e-3, 0.9, 200

BITWISE = ("c = 2 is a power of two: every multiply/divide by c is exact in binary floating point, so "
           "the rescaled arm is a bitwise copy (measured 0.0 at every step, float32, 3 seeds)")
C3 = "measured ≤ 4e-15 over 200 steps, 3 seeds (float64, c = 3); bound 1e-12 from the issue"


def reparam_case(case_id: str, c: float, *, dtype: str, bound: float, source: str, inclusive=False,
                 model=MLP, data=VECTORS, scale_other=False, negative=False, **kw) -> Case:
    base = Group(Constant(ETA), LAM, GAMMA)
    scaled = Group(Constant(ETA / c**2), LAM * c**2, GAMMA)
    # With scale_other the classifier is rescaled and trained on (η/c², λc²) too: it is not SI.
    other = scaled if scale_other else base
    return Case(id=case_id, claim=CLAIM, profile="cpu", model=model, data=data,
                arms=(Arm("base", base, base), Arm("scaled", scaled, other, init_scale=1 / c, scale_other=scale_other)),
                steps=STEPS, dtype=dtype, seeds=(0, 1, 2), negative=negative, exact=True,  # bitwise or float64
                measurements=("si_weight_gap", *FUNCTION_GAP, "loss"),
                properties=(max_below("si_weight_gap", bound, source=source, inclusive=inclusive,
                                      name="weights_are_rescaled_copies"),), **kw)


CASES = [
    reparam_case("intrinsic-reparam-c2-float32-mlp-bn", 2.0, dtype="float32", bound=0.0,
                 inclusive=True, source=BITWISE),
    reparam_case("intrinsic-reparam-c2-float32-cnn-bn", 2.0, dtype="float32", bound=0.0,
                 inclusive=True, source=BITWISE, model=CNN, data=IMAGES),
    reparam_case("intrinsic-reparam-c3-float64-mlp-bn", 3.0, dtype="float64", bound=1e-12, source=C3),
    reparam_case("intrinsic-reparam-c3-float64-cnn-bn", 3.0, dtype="float64", bound=1e-12, source=C3,
                 model=CNN, data=IMAGES, matrix=True),
    reparam_case("intrinsic-reparam-neg-c3-float32-not-bitwise", 3.0, dtype="float32", bound=0.0,
                 inclusive=True, source=BITWISE, negative=True,
                 description="c = 3 is not a power of two: float32 rounding makes the copy inexact"),
    reparam_case("intrinsic-reparam-neg-nonsi-rescaled", 3.0, dtype="float64", bound=1e-12, source=NEG,
                 scale_other=True, negative=True,
                 description="the trainable classifier (not SI) rescaled and reparametrized too"),
]
