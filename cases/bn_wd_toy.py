"""Li & Arora (ICLR 2020) §2's toy (our construction, CLAIMS.md §2): full-batch gradient descent on 64
2-D points. BN alone converges, WD alone converges, BN + WD never does: GD + WD on a scale-invariant
loss has no fixed point θ* ≠ 0 (λθ* = −∇L(θ*) and ⟨∇L(θ*), θ*⟩ = 0 force θ* = 0; the analytic
check is tests/test_bn_wd_toy.py).

"Converges" = the update ‖θ_t − θ_{t−1}‖ dies out over the last 1,000 of 3,000 steps.
Measured (seeds 0–4, η = 0.5, S = 8 for BN; the plain logistic model uses S = 1, since at S = 8,
η = 0.5 is past its stability limit and GD oscillates):
  BN alone:          max update over steps 2001–3000 ≤ 2.4e-16;
  logistic + WD 0.01: 0.0 (converged exactly);
  BN + WD 0.01:      per-seed max 0.061, 0.57, 0.061, 0.088, 0.048 (seed 1 cycles with loss spikes,
                     the others in a steady rotation-like cycle at constant ‖w‖).
"""
from __future__ import annotations

from harness.checks import max_above, max_below
from harness.schedules import Constant
from harness.spec import Arm, Case, Group

CLAIM = "li-arora-2020/bn-plus-wd-toy-does-not-converge"
ETA, WD, STEPS = 0.5, 0.01, 3000
WINDOW = (2001, None)
BN_MODEL = ("toy_logit", {"bn": True, "scale": 8.0})
PLAIN_MODEL = ("toy_logit", {"bn": False, "scale": 1.0})

CONVERGES = max_below("update_norm", 1e-12, steps=WINDOW, name="converges",
                      source="measured ≤ 2.4e-16 (BN alone) and 0 (WD alone), seeds 0–4; "
                             "bound 1e-12 = far above roundoff, far below any real motion")
NEVER_CONVERGES = max_above("update_norm", 1e-3, steps=WINDOW, name="never_converges",
                            source="measured per-seed max ≥ 0.048 (BN + WD, seeds 0–4); bound 1e-3 = 48× below")


def toy_case(case_id: str, model, wd: float, prop, *, negative=False, description="") -> Case:
    g = Group(Constant(ETA), wd)
    return Case(id=case_id, claim=CLAIM, profile="cpu", model=model, data=("two_blobs", {"n": 64}),
                arms=(Arm("gd", g, g),), steps=STEPS, seeds=(0, 1, 2),
                measurements=("update_norm", "loss", "si_norm"), properties=(prop,),
                negative=negative, smoke_steps=3, description=description)


CASES = [
    toy_case("toy-bn-alone-converges", BN_MODEL, 0.0, CONVERGES),
    toy_case("toy-wd-alone-converges", PLAIN_MODEL, WD, CONVERGES),
    toy_case("toy-bn-wd-never-converges", BN_MODEL, WD, NEVER_CONVERGES),
    # Negative controls: each property must fail where the other one holds.
    toy_case("toy-neg-bn-alone-judged-never-converges", BN_MODEL, 0.0, NEVER_CONVERGES, negative=True),
    toy_case("toy-neg-wd-alone-judged-never-converges", PLAIN_MODEL, WD, NEVER_CONVERGES, negative=True),
    toy_case("toy-neg-bn-wd-judged-converges", BN_MODEL, WD, CONVERGES, negative=True),
]
