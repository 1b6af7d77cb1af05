"""Li, Wei & Ma (NeurIPS 2019), learning order with a large initial LR, on patched CIFAR-10
(CLAIMS.md §6; the patch recipe is harness/patch.py, every constant a case parameter here).

A small LR memorizes the label-carrying patch within a few epochs; a large LR ignores it until the
LR is annealed, and then picks it up; activation noise before every ReLU (annealed with the large
LR's schedule) makes a small LR behave like the large one. Measured per epoch: clean test accuracy
('test_acc'), patch-only accuracy on blank images carrying the patch ('acc_patch_only', chance 0.1)
and accuracy on patched test images ('acc_mixed').

CPU profile (CLAIMS.md §6 calibration): a 4-conv BN CNN (widths 16/32/64/64, three max-pools, GAP,
linear), 10,000 training images, 2,000 clean test images, 1,000 patch-only images, no augmentation,
batch 128, SGD Nesterov 0.9, WD 5e-4, 20 epochs, annealing after epoch 10. The official ζ scale 0.1 is
never learned by a net this small; 0.2 is the working point (CLAIMS.md §6). Thresholds: see the
CALIBRATION block below.
"""
from __future__ import annotations

from harness.checks import final_advantage, seed_median_max, seed_median_rise
from harness.schedules import Constant, Piecewise
from harness.spec import Arm, Case, Group

CLAIM = "li-wei-ma-2019/learning-order-patched-cifar10"
EPOCHS, ANNEAL = 20, 10  # 1-based epochs 1..10 at the initial LR, 11..20 annealed
LARGE, SMALL, WD, SIGMA = 0.1, 0.004, 5e-4, 0.4
PATCH = {"zeta_scale": 0.2}  # the other PatchRecipe constants at the official values
MODEL = ("norm_cnn", {"widths": (16, 32, 64, 64), "pool": "max", "classes": 10, "eps": 1e-5, "act_noise": True})
MEASUREMENTS = ("test_acc", "eval_acc", "epoch_loss", "schedule")
BEFORE, AFTER = (1, ANNEAL), (ANNEAL + 1, None)


def data(patch: dict | None) -> tuple[str, dict]:
    return ("cifar10", {"batch_size": 128, "per_class": 1000, "test_per_class": 200, "augment": False,
                        "patch": patch, "smoke_per_class": 8})


def sgd(lr) -> Group:
    return Group(lr, WD, 0.9, nesterov=True)


def arm(name: str, lr, act_noise=None) -> Arm:
    return Arm(name, sgd(lr), sgd(lr), act_noise=act_noise)


LARGE_ARM = arm("large_lr", Piecewise((0, ANNEAL), (LARGE, SMALL)))  # ×0.04 at the anneal, as official
SMALL_ARM = arm("small_lr", Constant(SMALL))
NOISE_ARM = arm("small_lr_act_noise", Constant(SMALL), act_noise=Piecewise((0, ANNEAL), (SIGMA, SIGMA * 1e-5)))

# --- Calibration -----------------------------------------------------------------------------
# Measured (this code, seeds 0–2, torch 2.14.1 CPU, 1 thread, float32; chance = 0.10):
#   per seed                                   large_lr             small_lr             small_lr_act_noise
#   max patch-only acc, epochs 1–10            0.316 0.256 0.428    0.467 0.336 0.412    0.104 0.135 0.112
#   max patch-only acc, epochs 11–20           1.000 1.000 1.000    1.000 1.000 1.000    0.602 1.000 0.815
#   rise (after − before)                      0.684 0.744 0.572
#   clean test acc, mean of epochs 18–20       0.618 0.640 0.645    0.438 0.478 0.409    0.513 0.423 0.518
# Controls, max patch-only acc over epochs 1–10: no patch (small LR) 0.105 0.097 0.100; label-free,
# ζ = 0 (small LR) 0.105 0.104 0.097; ζ scale 1.0 (large LR) 1.000 from epoch 2 on, rise after
# annealing 0 (epochs 11–12).
# At this scale the small LR memorizes the patch only slowly (0.25–0.47 by epoch 10, 1.0 by epochs 11–17
# at the same LR) and the large LR picks up part of it before annealing (0.26–0.43): the large LR is not
# "near chance until annealing" here (CLAIMS.md §6's calibration, on a net whose details were not
# recorded, measured 0.10–0.11). The activation-noise arm is. The clean-accuracy gap is large and
# reliable, but CLAIMS.md §6 measured the same gap with no patch at all (66.3 vs 45.4): at this scale it
# is the generic large-LR effect, not the patch mechanism. The case takes 26 min on one core (3 arms ×
# 20 epochs × 3 seeds); each control 4–5 min.
SRC = "seeds 0–2, module comment: "
SMALL_LEARNS_PATCH_EARLY = seed_median_max(
    "acc_patch_only", SMALL_ARM.name, above=0.2, steps=BEFORE, name="small_lr_learns_patch_before_annealing",
    source=SRC + "small LR 0.336–0.467, the no-patch control 0.097–0.105; 0.2 = twice chance, between them")
LARGE_IGNORES_PATCH = seed_median_max(
    "acc_patch_only", LARGE_ARM.name, below=0.2, steps=BEFORE, name="large_lr_ignores_patch_before_annealing",
    source=SRC + "bound 0.2 = twice chance (declared before measuring); the ζ-scale-1.0 control reaches 1.0")
LARGE_IGNORES_PATCH_HERE = LARGE_IGNORES_PATCH.expected_to_fail(
    "at CPU scale the large LR reaches 0.256–0.428 patch-only accuracy before annealing (seeds 0–2), as "
    "much as the small LR (0.336–0.467); CLAIMS.md §6 measured 0.10–0.11 on its own small net")
LARGE_LEARNS_AFTER = seed_median_rise(
    "acc_patch_only", LARGE_ARM.name, split=ANNEAL, above=0.3, name="large_lr_learns_patch_after_annealing",
    source=SRC + "rise 0.572–0.744; bound 0.3 ≈ half the smallest")
NOISE_IGNORES_PATCH = seed_median_max(
    "acc_patch_only", NOISE_ARM.name, below=0.2, steps=BEFORE, name="act_noise_ignores_patch_before_annealing",
    source=SRC + "act-noise arm 0.104–0.135; bound 0.2 = twice chance")
CLEAN_GAP = final_advantage(
    "test_acc", LARGE_ARM.name, over=SMALL_ARM.name, above=0.08, last=3, name="large_lr_ends_with_better_clean_accuracy",
    source=SRC + "gap 0.162–0.236; bound 0.08 ≈ half the smallest. Not patch-specific at this scale: CLAIMS.md §6 "
                 "measured the same gap without a patch")


def patched_case(case_id: str, arms: tuple[Arm, ...], properties: tuple, *, patch: dict | None = PATCH,
                 negative: bool = False, epochs: int = EPOCHS, description: str = "") -> Case:
    return Case(id=case_id, claim=CLAIM, profile="cpu", dtype="float32", unit="epoch", model=MODEL,
                data=data(patch), arms=arms, steps=epochs, seeds=(0, 1, 2), measurements=MEASUREMENTS,
                properties=properties, negative=negative, slow=True, smoke_steps=1, description=description)


CASES = [
    patched_case("order-patched-cifar", (LARGE_ARM, SMALL_ARM, NOISE_ARM),
                 (SMALL_LEARNS_PATCH_EARLY, LARGE_IGNORES_PATCH_HERE, LARGE_LEARNS_AFTER, NOISE_IGNORES_PATCH,
                  CLEAN_GAP),
                 description="large LR 0.1 → 0.004 vs small LR 0.004 vs small LR with activation noise"),
    # Negative controls. The first two stop at the anneal: their property looks only at epochs 1..ANNEAL.
    patched_case("order-patched-cifar-neg-no-patch", (SMALL_ARM,), (SMALL_LEARNS_PATCH_EARLY,),
                 patch={**PATCH, "patched_fraction": 0.0}, negative=True, epochs=ANNEAL,
                 description="no training image carries the patch: patch-only accuracy stays at chance"),
    patched_case("order-patched-cifar-neg-label-free", (SMALL_ARM,), (SMALL_LEARNS_PATCH_EARLY,),
                 patch={**PATCH, "zeta_scale": 0.0}, negative=True, epochs=ANNEAL,
                 description="ζ = 0: the patch carries no label, nothing to memorize"),
    # Runs two epochs past the anneal: the rise after annealing is the property this control breaks.
    patched_case("order-patched-cifar-neg-easy-patch", (LARGE_ARM,), (LARGE_IGNORES_PATCH, LARGE_LEARNS_AFTER),
                 patch={**PATCH, "zeta_scale": 1.0}, negative=True, epochs=ANNEAL + 2,
                 description="ζ scale 1.0: the patch is easy enough that the large LR learns it at once, "
                             "so there is nothing left to learn after annealing"),
]

# --- GPU profile ------------------------------------------------------------------------------
# The full official setting: WRN-16-10, the whole training set, batch 128, 60 epochs, annealing after
# epoch 30, the official ζ scale 0.1; three runs (large, small, small + activation noise). Thresholds are
# provisional and shaped so the first GPU run can freeze them: same properties as the CPU profile.
GPU_EPOCHS, GPU_ANNEAL = 60, 30
GPU_PROVISIONAL = ("provisional, not yet measured on a GPU: the paper reports the same qualitative "
                   "order; freeze at a fraction of the first GPU run's effect")
GPU_LARGE = arm("large_lr", Piecewise((0, GPU_ANNEAL), (LARGE, SMALL)))
GPU_NOISE = arm("small_lr_act_noise", Constant(SMALL), act_noise=Piecewise((0, GPU_ANNEAL), (SIGMA, SIGMA * 1e-5)))
CASES.append(Case(
    id="order-gpu-wrn16-10-patched-cifar10", claim=CLAIM, profile="gpu", unit="epoch",
    model=("wrn16_10", {"act_noise": True}),
    data=("cifar10", {"batch_size": 128, "augment": False, "patch": {}, "smoke_per_class": 2}),
    arms=(GPU_LARGE, SMALL_ARM, GPU_NOISE), steps=GPU_EPOCHS, smoke_steps=1, seeds=(0,),
    measurements=MEASUREMENTS,
    properties=(
        seed_median_max("acc_patch_only", SMALL_ARM.name, above=0.5, steps=(1, GPU_ANNEAL),
                        name="small_lr_learns_patch_before_annealing", source=GPU_PROVISIONAL),
        seed_median_max("acc_patch_only", GPU_LARGE.name, below=0.2, steps=(1, GPU_ANNEAL),
                        name="large_lr_ignores_patch_before_annealing", source=GPU_PROVISIONAL),
        seed_median_rise("acc_patch_only", GPU_LARGE.name, split=GPU_ANNEAL, above=0.2,
                         name="large_lr_learns_patch_after_annealing", source=GPU_PROVISIONAL),
        seed_median_max("acc_patch_only", GPU_NOISE.name, below=0.2, steps=(1, GPU_ANNEAL),
                        name="act_noise_ignores_patch_before_annealing", source=GPU_PROVISIONAL),
        final_advantage("test_acc", GPU_LARGE.name, over=SMALL_ARM.name, above=0.01, last=3,
                        name="large_lr_ends_with_better_clean_accuracy", source=GPU_PROVISIONAL)),
    description="the official setting: about 80 min on one H100 in strict float32, 25 with TF32 "
                "(harness.device.estimated_minutes)"))
