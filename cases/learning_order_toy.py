"""Li, Wei & Ma (NeurIPS 2019, arXiv 1907.04595), the two-pattern toy (CLAIMS.md §6; the
distribution, the net and the check live in harness/two_pattern.py). A small initial LR learns the
memorizable pattern x2 first and the generalizing pattern x1 late; a large initial LR learns x1 first,
ignores x2 until it is annealed, and is ahead on x1-only examples at a fixed budget. The gap is not
permanent (CLAIMS: it closes once both arms interpolate), so the budget is fixed and short.

Setting. d = 500, 1000 training examples (20% x1-only, 20% x2-only, 60% both), two-layer ReLU net
(m = 200, biases, PyTorch default init), logistic loss, batch 16, plain SGD, WD 1e-3 on every
parameter, float32. Large: LR 0.5 for 3000 steps, then 0.01; small: 0.01 throughout.
Constants CLAIMS does not give, chosen here and measured: c = 0.75 (x1's margin c/√d along w*),
s = 0.05 and the input ×20, so the x1 block has norm ≈ 1 and the x2 block up to 20.
- s: at s = 1 (both blocks ×20) the small LR learns x1 as early as x2 (no ordering: x1-only 0.95 at
  step 2000, seed 0); at s = 0.3 it is at 0.57, at s = 0.1 at 0.50, at s = 0.05 at 0.50.
- Large LR 0.5, not the 0.2 of CLAIMS' calibration: in this construction LR 0.2 learns x2 at once
  (x2-only 0.97–0.99 at step 1000, seeds 0–4), i.e. it is not "large" in the paper's sense, while 0.5
  keeps x2-only at chance until the anneal and then learns it (median over 10 seeds 0.50 at step 3000,
  0.74 at 4000, 0.95 at 5000). Both learn x1 earlier than the small LR.

Measured (this code, seeds 0–9, torch 2.14.1 CPU, 1 thread); P1–P5 are the properties below:
  seed                          0     1     2     3     4     5     6     7     8     9
  small x1-only @2000       0.502 0.478 0.584 0.496 0.517 0.538 0.518 0.494 0.505 0.595
  small x2-only @2000       0.988 0.984 0.990 0.987 1.000 0.993 0.984 0.991 0.988 0.990
  large x1-only @2000       0.704 0.678 0.708 0.629 0.657 0.636 0.682 0.664 0.684 0.674
  large x2-only @2000       0.497 0.512 0.514 0.494 0.510 0.498 0.512 0.488 0.488 0.518
  large x1-only @3500       0.712 0.676 0.706 0.662 0.670 0.684 0.690 0.692 0.698 0.682
  small x1-only @3500       0.502 0.595 0.604 0.572 0.518 0.600 0.573 0.494 0.505 0.608
  best linear rule, x2-only 0.726 0.730 0.732 0.760 0.736 0.746 0.752 0.765 0.739 0.758
  logistic regression       0.730 0.443 0.623 0.490 0.406 0.601 0.486 0.588 0.552 0.426
  P1 small x2 − x1 @2000    0.486 0.506 0.406 0.491 0.483 0.454 0.467 0.496 0.483 0.396
  P2 x1 large − small @2000 0.202 0.199 0.124 0.133 0.140 0.097 0.164 0.170 0.178 0.080
  P3 large x1 − x2 @2000    0.207 0.165 0.195 0.134 0.147 0.137 0.169 0.176 0.196 0.156
  P4 x1 large − small @3500 0.211 0.081 0.103 0.090 0.152 0.084 0.118 0.197 0.194 0.074
  P5 small x2 − linear      0.262 0.255 0.258 0.227 0.263 0.247 0.233 0.226 0.249 0.232
The x1-only gap of P4 shrinks with the budget (median over seeds 0–9: 0.138 at 3250, 0.110 at
3500, 0.097 at 4000, 0.088 at 5000, 0.079 at 6000; per-seed minimum 0.076, 0.074, 0.026, 0.007,
−0.000). The x2 pattern is not linearly separable, yet the best linear rule with a bias gets 0.73–0.77
of the x2-only examples right; plain logistic regression is erratic (0.41–0.73). "Near chance" is the
wrong test: P5 compares the net with the best linear rule.

Tolerances. Every property gates the median over the case's 5 seeds (0–4) of a per-seed difference of
accuracies; the bound is (median over seeds 0–9) − 3 × SE of a 5-seed median, SE = 1.25·sd/√5 with
the sd over seeds 0–9, rounded down to 0.01. An accuracy on 2000 test examples has a sampling SE of
≈ 0.01.

Negative controls (measured, seeds 0–9, median [min, max] of the property's per-seed value):
- no memorizable pattern (x2 ≡ 0): P1 −0.003 [−0.107, 0.035];
- linearly separable x2 (negatives at α(−z ± ζ)): P3 −0.336 [−0.354, −0.309], P5 0.001 [−0.001, 0.012];
  the best linear rule gets 0.986–1.000 of the x2-only examples;
- no generalizing signal (c = 0, x1 pure noise): P2 0.007 [−0.018, 0.031], P3 −0.012 [−0.232, 0.040],
  P4 0.008 [−0.025, 0.016].
Without x2 the large LR still learns x1 earlier than the small one and is ahead at the budget (x1-only
≈ 0.9 vs 0.5–0.6 at step 2000, because the x1 block is small): in this toy P2 and P4 are the generic
large-LR effect, not the memorization mechanism; only P1, P3 and P5 isolate the pattern.
"""
from __future__ import annotations

from harness.checks import difference_above, final_advantage
from harness.schedules import Constant, Piecewise
from harness.spec import Arm, Case, Group

CLAIM = "li-wei-ma-2019/learning-order-toy"
D, WIDTH = 500, 200
LARGE, SMALL, ANNEAL, WD = 0.5, 0.01, 3000, 1e-3
EARLY, BUDGET = 2000, 3500  # the ordering checkpoint (before the anneal); the fixed budget
SEEDS = (0, 1, 2, 3, 4)
DATA = dict(d=D, n_train=1000, n_test=2000, c=0.75, s=0.05, scale=20.0, batch_size=16)
MODEL = ("two_layer_relu", {"in_dim": 2 * D, "width": WIDTH})
ONCE = 10**9  # `every` that fires only at the last step

# No parameter is scale-invariant: the `si` group is empty and `other` trains everything.
LARGE_ARM = Arm("large", Group(Constant(LARGE)), Group(Piecewise((0, ANNEAL), (LARGE, SMALL)), WD))
SMALL_ARM = Arm("small", Group(Constant(SMALL)), Group(Constant(SMALL), WD))

SRC = ("seeds 0–9 (module docstring); bound = median − 3·SE(5-seed median), SE = 1.25·sd/√5, "
       "rounded down")
SMALL_LEARNS_X2_FIRST = difference_above(
    ("small", "acc_x2_only", EARLY), ("small", "acc_x1_only", EARLY), 0.41, name="small_lr_learns_x2_first",
    source=f"P1 per seed 0.396–0.506, median 0.483, sd 0.038 → 0.419; {SRC}")
LARGE_LEARNS_X1_EARLIER = difference_above(
    ("large", "acc_x1_only", EARLY), ("small", "acc_x1_only", EARLY), 0.08, name="large_lr_learns_x1_earlier",
    source=f"P2 per seed 0.080–0.202, median 0.152, sd 0.041 → 0.083; {SRC}")
LARGE_LEARNS_X1_FIRST = difference_above(
    ("large", "acc_x1_only", EARLY), ("large", "acc_x2_only", EARLY), 0.12,
    name="large_lr_learns_x1_first_ignores_x2",
    source=f"P3 per seed 0.134–0.207, median 0.167, sd 0.025 → 0.125; {SRC}")
# At the case's last step, which is the budget (cases that carry it run exactly BUDGET steps).
FIXED_BUDGET_GAP = final_advantage(
    "acc_x1_only", "large", over="small", above=0.02, last=1, name="fixed_budget_x1_gap",
    source=f"P4 (step {BUDGET}) per seed 0.074–0.211, median 0.110, sd 0.053 → 0.021; {SRC}")
X2_NOT_LINEAR = difference_above(
    ("small", "acc_x2_only", EARLY), (None, "linear_acc_x2_only", None), 0.22,
    name="x2_beyond_best_linear_rule",
    source=f"P5 per seed 0.226–0.263 (net 0.98–1.00, best linear rule with bias 0.73–0.77), median 0.248, "
           f"sd 0.015 → 0.224; {SRC}")


def toy_case(case_id: str, properties, *, arms=(LARGE_ARM, SMALL_ARM), steps: int = BUDGET,
             linear: bool = True, negative: bool = False, description: str = "", **data) -> Case:
    measurements = [("eval_acc", {"every": 500}), ("loss", {"every": 500})]
    if linear:
        measurements.append(("linear_baseline", {"every": ONCE}))
    return Case(id=case_id, claim=CLAIM, profile="cpu", model=MODEL, data=("two_pattern", {**DATA, **data}),
                arms=arms, steps=steps, seeds=SEEDS, measurements=tuple(measurements),
                properties=tuple(properties), negative=negative, dtype="float32", smoke_steps=3,
                description=description)


CASES = [
    toy_case("lwm-toy-learning-order",
             (SMALL_LEARNS_X2_FIRST, LARGE_LEARNS_X1_EARLIER, LARGE_LEARNS_X1_FIRST, FIXED_BUDGET_GAP,
              X2_NOT_LINEAR),
             description="small LR: x2 before x1; large LR: x1 earlier, and before x2 (at chance until "
                         "the anneal); x1-only gap at a fixed budget; x2 beyond the best linear rule"),
    # Negative controls: every property listed must fail.
    toy_case("lwm-toy-neg-no-memorizable-pattern", (SMALL_LEARNS_X2_FIRST,), arms=(SMALL_ARM,), steps=EARLY,
             linear=False, negative=True, memorizable=False,
             description="x2 ≡ 0: nothing to learn first, no ordering"),
    toy_case("lwm-toy-neg-separable-x2", (LARGE_LEARNS_X1_FIRST, X2_NOT_LINEAR), steps=EARLY, negative=True,
             x2_separable=True,
             description="negatives at α(−z ± ζ): the best linear rule matches the net, and the large "
                         "LR learns x2 at once"),
    toy_case("lwm-toy-neg-no-generalizing-signal", (LARGE_LEARNS_X1_EARLIER, LARGE_LEARNS_X1_FIRST,
                                                    FIXED_BUDGET_GAP),
             linear=False, negative=True, c=0.0,
             description="c = 0: x1 is pure noise, no arm can learn it, no x1 gap"),
]
