"""Wan, Zhu, Zhang & Sun (2020), "Spherical Motion Dynamics" (SMD), and Li, Lyu & Arora (2020),
"The Intrinsic Learning Rate": equilibria of scale-invariant weights under SGD + WD. CLAIMS.md §3–4.

Setting (all cases): BN MLP 32-128-128-10 (BN with affine, trainable classifier), torch SGD, batch
128, a 10-class Gaussian mixture with overlapping classes (separation 0.3, 4,096 points: the loss
stays ~0.8, so gradient noise never dies out), float64 (the CPU profile's default: these cases set
no dtype), 3 seeds. Sphere quantities are RMS/means over windows of 100 updates (harness.sphere). Tolerances are written next to each case with the
measurement they came from; "median over seeds" per layer, all layers must pass unless stated.
"""
from __future__ import annotations

from harness import sphere
from harness.checks import final_difference_below
from harness.schedules import Constant, Piecewise
from harness.spec import Arm, Case, Group

CLAIM_SMD = "wan-2020/spherical-motion-dynamics"
CLAIM_ILR = "li-lyu-arora-2020/intrinsic-lr-equilibrium"

MODEL = ("norm_mlp", {"in_dim": 32, "width": 128, "depth": 2, "classes": 10, "norm": "bn",
                      "eps": 1e-5, "affine": True})
DATA = ("gaussian_mixture", {"n": 4096, "shape": (32,), "classes": 10, "separation": 0.3, "batch_size": 128})
WINDOW = 100
SEEDS = (0, 1, 2)
MEASURE = (("angular", {"window": WINDOW}), ("loss", {"every": WINDOW}))

# Momentum setting: η 0.1, λ 5e-3, γ 0.9 → Δ* = 0.0229, τ = 50 updates; judged on updates
# 1001–2000 (20τ–40τ of burn-in; CLAIMS.md §3 asks for ≥ 8τ).
ETA, LAM, GAMMA = 0.1, 5e-3, 0.9
# Plain SGD setting: η 0.1, λ 2e-2, γ 0 → Δ* = 0.0633, τ = 125; judged on 1501–3000 (12τ–24τ).
ETA0, LAM0 = 0.1, 2e-2


def group(lr, wd, momentum, decoupled=False) -> Group:
    return Group(lr if callable(lr) else Constant(lr), wd, momentum, decoupled=decoupled)


def smd_case(case_id: str, arms: tuple[Arm, ...], steps: int, properties: tuple, *, claim=CLAIM_SMD,
             model=MODEL, data=DATA, negative=False, measurements=MEASURE, description="", **kw) -> Case:
    return Case(id=case_id, claim=claim, profile="cpu", model=model, data=data, arms=arms, steps=steps,
                seeds=SEEDS, measurements=measurements, properties=properties, negative=negative,
                description=description, smoke_steps=WINDOW, **kw)


def arm(name, lr, wd, momentum, other: Group | None = None, **kw) -> Arm:
    """One arm; non-SI parameters follow the same group unless `other` is given."""
    g = group(lr, wd, momentum, decoupled=kw.pop("decoupled", False))
    return Arm(name, g, other or g, **kw)


LATE_M = (1001, 2000)
LATE_0 = (1501, 3000)
TOL_ANGLE = ("±10%, the issue's criterion; measured per-layer medians 1.003/1.004 (γ 0.9), 1.011/0.922 "
             "(γ 0: the second layer is still 8% low at 24τ), seed spread ≤ 0.01; decoupled constant "
             "0.979/1.017 with seeds 0.91–1.03")
TOL_NORM = ("±10%; measured ‖w‖/(ηL/2λ(1−γ))^¼ = 0.954/0.950 (γ 0.9) and 0.997/1.043 (γ 0), seed "
            "spread ≤ 0.005: the 5% offset is systematic, not noise")

CASES = [
    smd_case("smd-momentum-equilibrium", (arm("sgd", ETA, LAM, GAMMA),), 2000, (
        sphere.angle_matches("sgd", sphere.equilibrium_angle(ETA, LAM, GAMMA), 0.10, LATE_M, source=TOL_ANGLE),
        sphere.norm_matches("sgd", ETA, LAM, GAMMA, 0.10, LATE_M, source=TOL_NORM)),
        description="RMS angular update → sqrt(2ηλ/(1+γ)) per layer; ‖w‖⁴ → ηL/(2λ(1−γ))"),
    smd_case("smd-sgd-equilibrium", (arm("sgd", ETA0, LAM0, 0.0),), 3000, (
        sphere.angle_matches("sgd", sphere.equilibrium_angle(ETA0, LAM0, 0.0), 0.10, LATE_0, source=TOL_ANGLE),
        sphere.norm_matches("sgd", ETA0, LAM0, 0.0, 0.10, LATE_0, source=TOL_NORM)),
        description="plain SGD: RMS angular update → arccos(1 − ηλ)"),
    smd_case("smd-only-eta-lambda-matters", (arm("base", ETA, LAM, GAMMA), arm("half-lr", ETA / 2, 2 * LAM, GAMMA)),
             2000, (sphere.arms_ratio("angular_rms", "half-lr", "base", 1.0, 0.05, LATE_M, name="same_angle",
                                      source="±5%: measured medians 1.000/0.993, seeds 0.992–1.000"),),
             description="(η, λ) and (η/2, 2λ): the same Δ*"),
    smd_case("smd-decoupled-wd-constant", (arm("sgdw", ETA, LAM, GAMMA, decoupled=True),), 2000, (
        sphere.angle_matches("sgdw", sphere.equilibrium_angle(ETA, LAM, GAMMA, decoupled=True), 0.10,
                             LATE_M, source=TOL_ANGLE),),
        description="decoupled WD has its own constant sqrt(2ηλ(1−γ)/(1+γ))"),

    # Negative controls: each must fail.
    smd_case("smd-neg-no-weight-decay", (arm("sgd", ETA, 0.0, GAMMA),), 2000, (
        sphere.angle_matches("sgd", sphere.equilibrium_angle(ETA, LAM, GAMMA), 0.10, LATE_M, source=TOL_ANGLE),
        sphere.norm_matches("sgd", ETA, LAM, GAMMA, 0.10, LATE_M, source=TOL_NORM)),
        negative=True, description="λ = 0: no equilibrium; the norm grows and Δ decays (judged vs λ 5e-3)"),
    smd_case("smd-neg-unnormalized-layer", (arm("sgd", ETA, LAM, GAMMA),), 2000, (
        sphere.angle_matches("sgd", sphere.equilibrium_angle(ETA, LAM, GAMMA), 0.10, LATE_M, source=TOL_ANGLE,
                             layers=("features.3.weight",)),),
        model=(MODEL[0], {**MODEL[1], "unnormalized": (1,)}), negative=True,
        description="the last hidden layer feeds the classifier without BN: not SI, no SMD equilibrium. "
                    "(Dropping the FIRST layer's BN would not do: ReLU is positively homogeneous and the "
                    "next layer's BN absorbs the scale, so that weight stays SI: measured Δ/Δ* = 1.004.)"),
    smd_case("smd-neg-decoupled-judged-coupled", (arm("sgdw", ETA, LAM, GAMMA, decoupled=True),), 2000, (
        sphere.angle_matches("sgdw", sphere.equilibrium_angle(ETA, LAM, GAMMA), 0.10, LATE_M, source=TOL_ANGLE),),
        negative=True, description="decoupled WD judged with the coupled constant: off by sqrt(1−γ) ≈ 0.32"),
]


# ---- intrinsic LR: equal λ_e = ηλ/(1−γ) → the same equilibrium, whatever the start ----------
# Arms share γ 0.9 and λ_e = 5e-3. "different": another (η, λ) split and a 4× larger initial SI
# norm; "history": a 4× larger LR for the first 500 updates and a 4× smaller initial norm.
# The theory is about SI weights: the non-SI parameters (BN affine, classifier) keep (η, λ) in every
# arm, as in the exact reparametrization. (With them on each arm's own (η, λ), measured η/‖w‖²
# ratios were 1.39/2.20 and the loss 0.16 higher: the classifier's own dynamics differ.)
NON_SI = group(ETA, LAM, GAMMA)
LAM_E_ARMS = (arm("base", ETA, LAM, GAMMA),
              arm("different", ETA / 4, LAM * 4, GAMMA, other=NON_SI, init_scale=4.0),
              arm("history", Piecewise((0, 500), (4 * ETA, ETA)), LAM, GAMMA, other=NON_SI, init_scale=0.25))
# Judged on updates 4001–5000: the "history" arm relaxes slowly in η/‖w‖² of the second layer
# (history/base, median over seeds: 1.37 at update 1000, 1.14 at 2000, 1.10 at 2500, 1.06 at 3000),
# far slower than τ = 50 suggests, so 3,000 updates were not yet the equilibrium.
ILR_STEPS, ILR_LATE = 5000, (4001, 5000)
TOL_ILR = ("±10% per layer on η/‖w‖² and RMS Δ; loss (mean of the last 10 windows) within 0.05: "
           "measured per seed η/‖w‖² ratios 0.97–1.00 ('different') and 1.00–1.06 ('history'), RMS Δ "
           "0.998–1.002, loss differences 0.002–0.045 (3 seeds, updates 4001–5000)")


def equal_equilibrium(other: str) -> tuple:
    return (sphere.arms_ratio("eff_lr", other, "base", 1.0, 0.10, ILR_LATE, name=f"eff_lr_{other}", source=TOL_ILR),
            sphere.arms_ratio("angular_rms", other, "base", 1.0, 0.10, ILR_LATE, name=f"angle_{other}",
                              source=TOL_ILR))


CASES += [
    smd_case("ilr-equal-lambda-e-same-equilibrium", LAM_E_ARMS, ILR_STEPS,
             equal_equilibrium("different") + equal_equilibrium("history")
             + tuple(final_difference_below("loss", other, 0.05, last=10, source=TOL_ILR, name=f"final_loss_{other}")
                     for other in ("different", "history")),
             claim=CLAIM_ILR, description="equal λ_e from different (η, λ), initial norms and LR history"),
    smd_case("ilr-neg-ten-times-lambda-e", (arm("base", ETA, LAM, GAMMA),
                                            arm("tenfold", ETA, 10 * LAM, GAMMA, other=NON_SI)),
             3000, (sphere.arms_ratio("eff_lr", "tenfold", "base", 1.0, 0.10, (2001, 3000), name="eff_lr_tenfold",
                                      source=TOL_ILR),),
             claim=CLAIM_ILR, negative=True,
             description="λ_e × 10 is distinguishable: η/‖w‖² scales as sqrt(λ_e), i.e. ≈ 3.2×"),
]

# ---- transients and scaling (momentum setting) ------------------------------------------------
K_DROP = 4
DROP_AT = 1500
FINE = (("angular", {"window": 10}), ("loss", {"every": 100}))
TOL_DROP = ("±15%: the first 10 updates after the drop (momentum keeps the buffer) are a short, noisy "
            "window: medians 1.065/1.077, seeds 1.02–1.16; updates 2501–3000 (5kτ after the drop): "
            "medians 1.001/1.012, seeds 0.997–1.012")
TOL_SCALE = ("±10% on the norm ratio (measured medians 0.999/1.033, seeds 0.994–1.036) and on the angle "
             "ratio vs √4 = 2 (medians 1.987/1.983, seeds 1.981–1.991)")

CASES += [
    smd_case("smd-lr-drop-transient", (arm("drop", Piecewise((0, DROP_AT), (ETA, ETA / K_DROP)), LAM, GAMMA),),
             3000, (
                 sphere.angle_matches("drop", sphere.equilibrium_angle(ETA, LAM, GAMMA) / K_DROP, 0.15,
                                      (DROP_AT + 1, DROP_AT + 10), source=TOL_DROP, name="drops_to_delta_over_k"),
                 sphere.angle_matches("drop", sphere.equilibrium_angle(ETA / K_DROP, LAM, GAMMA), 0.15,
                                      (2501, 3000), source=TOL_DROP, name="relaxes_to_delta_over_sqrt_k")),
             measurements=FINE, description="η ÷ 4 at equilibrium: Δ falls to Δ*/4 at once, then relaxes to Δ*/2"),
    smd_case("smd-linear-scaling", (arm("base", ETA / 2, LAM, GAMMA),
                                    arm("scaled", 2 * ETA, LAM, GAMMA, batch_multiplier=4)), 2000, (
        sphere.arms_ratio("norm", "scaled", "base", 1.0, 0.10, LATE_M, name="norm_unchanged", source=TOL_SCALE),
        sphere.arms_ratio("angular_rms", "scaled", "base", 2.0, 0.20, LATE_M, name="angle_times_sqrt_k",
                          source=TOL_SCALE)),
        description="(B, η) → (4B, 4η): the same equilibrium norm, Δ* × 2"),
]

# ---- GPU profile ------------------------------------------------------------------------------
# ResNet-18 (post-activation: every conv feeds a BN, so every conv weight is SI) on CIFAR-10, SGD
# 0.1 / 0.9 / 5e-4, batch 128: Δ* = 0.0229 rad, τ = 500 updates ≈ 1.3 epochs. Constant LR for 15
# epochs (≈ 11τ of burn-in), judged on epochs 10–15; then η ÷ 10: Δ*/10 at once, relaxing to Δ*/√10
# over ≈ kτ = 5,000 updates, judged on epochs 35–40. The ±10% band and "most layers" (80%) are the
# issue's; the ±20% transient bands are PROVISIONAL until a GPU run measures the spread.
GPU_EPOCH = 50_000 // 128
GPU_DROP = 15 * GPU_EPOCH
GPU_SOURCE = "issue criterion ±10% for 80% of layers; transient bands provisional (no GPU lent yet)"
CASES += [
    Case(id="smd-gpu-resnet18-cifar10", claim=CLAIM_SMD, profile="gpu",
         model=("resnet18_cifar", {"classes": 10, "norm_affine": True}),
         data=("cifar10", {"batch_size": 128, "augment": True, "smoke_per_class": 2}),
         arms=(arm("sgd", Piecewise((0, GPU_DROP), (0.1, 0.01)), 5e-4, 0.9),),
         steps=40 * GPU_EPOCH, smoke_steps=2, seeds=(0,),
         measurements=(("angular", {"window": 50}), ("loss", {"every": 50}), ("test_acc", {"every": GPU_EPOCH})),
         properties=(
             sphere.angle_matches("sgd", sphere.equilibrium_angle(0.1, 5e-4, 0.9), 0.10,
                                  (10 * GPU_EPOCH, GPU_DROP), share=0.8, source=GPU_SOURCE),
             sphere.angle_matches("sgd", sphere.equilibrium_angle(0.1, 5e-4, 0.9) / 10, 0.20,
                                  (GPU_DROP + 1, GPU_DROP + 50), share=0.8, source=GPU_SOURCE,
                                  name="drops_to_delta_over_k"),
             sphere.angle_matches("sgd", sphere.equilibrium_angle(0.01, 5e-4, 0.9), 0.20,
                                  (35 * GPU_EPOCH, None), share=0.8, source=GPU_SOURCE,
                                  name="relaxes_to_delta_over_sqrt_k")),
         description="per-layer RMS angular update vs Δ* at constant LR, then the LR-drop transient; "
                     "about 4 min on one H100 (one arm, 40 epochs, strict float32; harness.device.estimated_minutes)"),
]

# ---- intrinsic LR: time to equilibrium ∝ 1/λ_e --------------------------------------------------
# Each arm starts 8× above ITS OWN equilibrium norm (‖w*‖ ∝ (η/λ)^¼ at equal L, so λ/2 starts at
# 8·2^¼ and 2λ at 8·2^-¼ of the default init), and T is the first update (windows of 20) at which
# η/‖w‖² comes within 25% of its final value. C is fitted on λ_e = 5e-3 and reused at λ_e/2 and
# 2λ_e. (With the same absolute init scale 8 for all arms the targets differ and T scaled only as
# λ_e^-0.6: measured 400 / 640 / 330 updates.) A negative control judges the same times with
# "T does not depend on λ_e".
TIME_ARMS = (arm("base", ETA, LAM, GAMMA, init_scale=8.0),
             arm("half", ETA, LAM / 2, GAMMA, init_scale=8.0 * 2 ** 0.25),
             arm("double", ETA, LAM * 2, GAMMA, init_scale=8.0 * 2 ** -0.25))
TIME_LAMBDA_E = {"base": ETA * LAM / (1 - GAMMA), "half": ETA * LAM / 2 / (1 - GAMMA),
                 "double": ETA * LAM * 2 / (1 - GAMMA)}
TIME_MEASURE = (("angular", {"window": 20}),)
TOL_TIME = ("±30%: window resolution 20 updates on T ≈ 200–900 and a seed spread of ≤ 10%; set before "
            "the measurement, which then missed it (see the case's xfail)")
CASES += [
    smd_case("ilr-time-to-equilibrium", TIME_ARMS, 3000,
             (sphere.time_scales_as("base", TIME_LAMBDA_E, 1.0, 0.30, late=(2501, 3000), source=TOL_TIME,
                                    name="time_scales_as_inverse_lambda_e"),),
             claim=CLAIM_ILR, measurements=TIME_MEASURE,
             xfail=("does not reproduce at this scale: T = 420 / 720 / 320 updates for λ_e, λ_e/2, 2λ_e "
                    "(seed 0…2 medians) against 420 / 840 / 210 predicted; λ_e/2 is within 15% but 2λ_e "
                    "is 52% slow: η/‖w‖² reaches 0.75–0.88 of its final value by update 300, then "
                    "plateaus (a second, slower relaxation that does not scale with 1/λ_e)"),
             description="time to equilibrium ∝ 1/λ_e, constant fitted once at λ_e = 5e-3"),
    smd_case("ilr-neg-time-independent-of-lambda-e", TIME_ARMS, 3000,
             (sphere.time_scales_as("base", TIME_LAMBDA_E, 0.0, 0.30, late=(2501, 3000), source=TOL_TIME,
                                    name="time_independent_of_lambda_e"),),
             claim=CLAIM_ILR, measurements=TIME_MEASURE, negative=True,
             description="the same runs judged by T ∝ λ_e⁰ must fail"),
]

# ---- intrinsic LR with momentum: λ_e = ηλ/(1−γ) (derived, CLAIMS.md §4) --------------------------
# γ 0.9 with ηλ = 5e-4 against plain SGD at ηλ = 5e-3 (equal ηλ/(1−γ)); non-SI parameters frozen in
# both (their own momentum would differ). Measured (3 seeds, updates 3001–4000): the momentum-aware
# effective LR η/((1−γ)‖w‖²) agrees (plain/momentum ratio of η/‖w‖²: 9.76 and 9.92, i.e.
# 1/(1−γ)); loss 1.10/1.23/1.16 vs 1.11/1.28/1.19 (paired differences 0.019–0.048). Plain SGD at the
# same ηλ = 5e-4 instead: η/‖w‖² ratio 1.8, loss lower by 0.16–0.18 (the negative control).
def frozen_arm(name, lr, wd, momentum) -> Arm:
    return Arm(name, group(lr, wd, momentum), None)


MOM_LATE = (3001, 4000)
TOL_MOM = ("η/‖w‖² ratio vs 1/(1−γ) = 10 within ±10% (measured 9.76, 9.92); loss within 0.08 (paired per-seed "
           "differences measured 0.019–0.048; the loss itself spreads 0.13 across seeds)")


def momentum_form_properties(other: str) -> tuple:
    return (sphere.arms_ratio("eff_lr", other, "momentum", 1 / (1 - GAMMA), 1.0, MOM_LATE,
                              name="momentum_aware_eff_lr", source=TOL_MOM),
            final_difference_below("loss", other, 0.08, last=10, source=TOL_MOM))


CASES += [
    smd_case("ilr-momentum-form", (frozen_arm("momentum", ETA, LAM, GAMMA),
                                   frozen_arm("plain", ETA, LAM * 10, 0.0)), 4000,
             momentum_form_properties("plain"), claim=CLAIM_ILR,
             description="γ 0.9 at ηλ 5e-4 ≡ plain SGD at ηλ 5e-3: equal ηλ/(1−γ)"),
    smd_case("ilr-neg-momentum-plain-form", (frozen_arm("momentum", ETA, LAM, GAMMA),
                                             frozen_arm("plain", ETA, LAM, 0.0)), 4000,
             momentum_form_properties("plain"), claim=CLAIM_ILR, negative=True,
             description="equal plain ηλ (ignoring 1/(1−γ)) must not give the same equilibrium"),
]
