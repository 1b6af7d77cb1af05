"""Smith, Kindermans, Ying & Le (ICLR 2018), "Don't decay the learning rate, increase the batch size"
(CLAIMS.md §5): dividing η by k and multiplying B by k anneal the SGD noise scale g ≈ ηN/(B(1 − γ))
alike, so the schedules give the same training curve per epoch and the same final accuracy while
the batch-growing ones need far fewer parameter updates.

CPU scale (CLAIMS.md §5 calibration): a 3-conv BN CNN (widths 16/32/64, ghost BN over 32), 10,000
CIFAR-10 training images (flips only), 2,000 test images, SGD momentum 0.9, WD 5e-4, 15 epochs,
noise ÷5 at epochs 6 and 11 (0-based). Every arm walks the same example order each epoch in batches of
its own size (Case.unit = "epoch"). Tolerances: see TOLERANCES below; every number comes from the
calibration run recorded there.
"""
from __future__ import annotations

from harness.batch_schedules import BatchSize, anneal_noise
from harness.checks import final_difference_below, max_difference_below, updates_follow_schedule
from harness.schedules import Constant, Piecewise
from harness.spec import Arm, Case, Group

CLAIM = "smith-2018/increase-batch-instead-of-decaying-lr"
N_TRAIN, EPOCHS, MILESTONES, FACTOR = 10_000, 15, (6, 11), 5
LR, B0, MOMENTUM, WD = 0.1, 32, 0.9, 5e-4
B_MAX = 800  # N/12.5: the paper caps B near N/10 (5,120 of 50,000)
AFTER_FIRST_STEP = (MILESTONES[0] + 1, None)  # epochs (1-based) after the first noise step
DATA = ("cifar10", {"batch_size": B0, "per_class": N_TRAIN // 10, "test_per_class": 200, "augment": "flip",
                    "smoke_per_class": 8})
MEASUREMENTS = ("epoch_loss", "test_acc", "schedule")


def cnn(ghost_batch: int | None = B0) -> tuple[str, dict]:
    return ("norm_cnn", {"widths": (16, 32, 64), "classes": 10, "eps": 1e-5, "ghost_batch": ghost_batch})


def arm(name: str, lr, batch: BatchSize, momentum: float = MOMENTUM) -> Arm:
    g = Group(lr, WD, momentum)
    return Arm(name, g, g, batch_size=batch)


def annealed(name: str, *, by: str, lr: float = LR, batch: int = B0, batch_max: int | None = B_MAX,
             momentum: float = MOMENTUM) -> Arm:
    return arm(name, *anneal_noise(lr, batch, MILESTONES, FACTOR, by=by, batch_max=batch_max), momentum=momentum)


DECAY = annealed("decay_lr", by="lr")
RAMP = annealed("increase_batch", by="batch")  # B 32 → 160 → 800
HYBRID = annealed("hybrid", by="batch", batch_max=B0 * FACTOR)  # B 32 → 160, then η ÷5 at B = 160
LARGE_LR = annealed("lr_x5_batch_x5", by="batch", lr=LR * FACTOR, batch=B0 * FACTOR)  # B ∝ η
# B ∝ 1/(1 − γ): γ 0.9 → 0.98 multiplies 1/(1 − γ) by 5, so B starts 5× larger.
MOMENTUM_98 = annealed("momentum_0.98_batch_x5", by="batch", batch=B0 * FACTOR, momentum=0.98)
# Negative controls.
RAMP_K2 = arm("increase_batch_x25", Constant(LR), BatchSize((0, MILESTONES[0]), (B0, B0 * FACTOR ** 2)))
NEVER = arm("never_anneal", Constant(LR), BatchSize((0,), (B0,)))

# --- Tolerances -----------------------------------------------------------------------------
# Calibration: every arm below in one run per model, seeds 0, 1, 2 (torch 2.14.1, CPU, 1 thread,
# float32). Per seed: the largest |epoch loss − decay_lr's| over epochs 7–15 (after the first noise
# step), and final test accuracy (mean of epochs 13–15) minus decay_lr's.
#   arm                      max |Δ loss| ep. 7–15      Δ final accuracy
#   increase_batch           0.029  0.027  0.028        −0.002  −0.001  +0.000
#   hybrid                   0.029  0.027  0.014        −0.003  −0.004  −0.002
#   lr_x5_batch_x5           0.113  0.130  0.097        −0.027  −0.013  −0.012
#   momentum_0.98_batch_x5   0.230  0.250  0.260        −0.076  −0.078  −0.070
#   increase_batch_x25       0.076  0.111  0.081        −0.022  −0.022  −0.016   (negative control)
#   never_anneal             0.206  0.213  0.195        −0.093  −0.089  −0.074   (negative control)
#   increase_batch_plain_bn  0.042  0.051  0.043        −0.016  −0.020  −0.010   (negative control,
#                                                                                 plain-BN model)
# decay_lr itself, across seeds: the epoch loss spreads by at most 0.018 (epochs 7–15: 0.018, 0.015,
# 0.006, 0.006, 0.012, 0.010, 0.003, 0.007, 0.010) and the final accuracy by 0.011 (0.590, 0.579, 0.579).
# 15 epochs take about 1 min per arm and seed on one core (less for the arms with large batches):
# 3–6 min per case under `pytest -m slow -n 2`.
CALIBRATION = "seeds 0–2, module comment: "
LOSS_BAND = 0.04  # ≈ 2 × decay_lr's largest seed-to-seed spread of the epoch loss after the first step
LOSS_SOURCE = (CALIBRATION + "band 0.04 ≈ 2× the decay arm's seed spread of the epoch loss (≤ 0.018); "
               "increase_batch measured 0.027–0.029, never_anneal 0.195–0.213")
# Test accuracy per epoch, max |Δ| over epochs 7–15 per seed: increase_batch and hybrid 0.038 0.012
# 0.017, never_anneal 0.137 0.119 0.124, increase_batch_x25 0.027 0.040 0.024 (inside the band: its
# control breaks the loss curve and the final accuracy instead); decay_lr's own seed range per epoch
# is at most 0.021 (0.024 with plain BN).
EPOCH_ACC_BAND = 0.05  # ≈ 2 × decay_lr's largest per-epoch seed range of the test accuracy
EPOCH_ACC_SOURCE = (CALIBRATION + "band 0.05 ≈ 2× the decay arm's per-epoch seed range of the test accuracy "
                    "(≤ 0.024); increase_batch measured 0.012–0.038, never_anneal 0.119–0.137")
ACC_BAND = 0.011  # decay_lr's seed range of the final accuracy: "within the seed spread"
ACC_SOURCE = (CALIBRATION + "band 0.011 = the decay arm's seed range of the final accuracy; "
              "increase_batch measured ≤ 0.002, never_anneal ≥ 0.074")
NOT_AT_THIS_SCALE = (
    "does not reproduce at CPU scale: 15 epochs, 5 per noise level, and 480 updates in all (the paper: 200 "
    "epochs and about 6,300 / 2,160 updates); measured, seeds 0–2: {}. The case stays to be re-judged at "
    "GPU scale (batch-gpu-wrn16-4-cifar10)")


def loss_agrees(arm_name: str) -> object:
    return max_difference_below("epoch_loss", arm_name, LOSS_BAND, steps=AFTER_FIRST_STEP, source=LOSS_SOURCE)


def accuracy_curve_agrees(arm_name: str) -> object:
    return max_difference_below("test_acc", arm_name, EPOCH_ACC_BAND, steps=AFTER_FIRST_STEP, source=EPOCH_ACC_SOURCE)


def accuracy_agrees(arm_name: str) -> object:
    return final_difference_below("test_acc", arm_name, ACC_BAND, last=3, source=ACC_SOURCE)


def batch_case(case_id: str, arms: tuple[Arm, ...], properties: tuple, *, model=None, negative=False,
               description: str = "", xfail: str | None = None) -> Case:
    return Case(id=case_id, claim=CLAIM, profile="cpu", dtype="float32", unit="epoch", model=model or cnn(),
                data=DATA, arms=(DECAY, *arms), steps=EPOCHS, seeds=(0, 1, 2), measurements=MEASUREMENTS,
                # smoke: 3 epochs, so the dry run crosses epoch ends (checkpoints; tests/test_resume.py)
                properties=properties, negative=negative, slow=True, smoke_steps=3, reference_arm=DECAY.name,
                description=description, xfail=xfail)


CASES = [
    batch_case("batch-cifar-increase-batch", (RAMP,),
               (loss_agrees(RAMP.name), accuracy_curve_agrees(RAMP.name), accuracy_agrees(RAMP.name),
                updates_follow_schedule(RAMP.name, N_TRAIN, source="exact: Σ_e ⌊N/B(e)⌋")),
               description="B 32 → 160 → 800 at η 0.1 vs η 0.1 → 0.02 → 0.004 at B 32"),
    batch_case("batch-cifar-hybrid", (HYBRID,),
               (loss_agrees(HYBRID.name), accuracy_curve_agrees(HYBRID.name), accuracy_agrees(HYBRID.name),
                updates_follow_schedule(HYBRID.name, N_TRAIN, source="exact: Σ_e ⌊N/B(e)⌋")),
               description="B 32 → 160 (capped), then η ÷5"),
    batch_case("batch-cifar-large-lr", (LARGE_LR,),
               (loss_agrees(LARGE_LR.name), accuracy_agrees(LARGE_LR.name),
                updates_follow_schedule(LARGE_LR.name, N_TRAIN, source="exact: Σ_e ⌊N/B(e)⌋")),
               description="B ∝ η: η 0.5 with B 160 → 800, then η ÷5 at the cap",
               xfail=NOT_AT_THIS_SCALE.format("max |Δ loss| 0.097–0.130 vs 0.04, Δ accuracy 0.012–0.027 vs 0.011")),
    batch_case("batch-cifar-momentum", (MOMENTUM_98,),
               (loss_agrees(MOMENTUM_98.name), accuracy_agrees(MOMENTUM_98.name),
                updates_follow_schedule(MOMENTUM_98.name, N_TRAIN, source="exact: Σ_e ⌊N/B(e)⌋")),
               description="B ∝ 1/(1 − γ): γ 0.98 with B 160 → 800, then η ÷5 at the cap",
               xfail=NOT_AT_THIS_SCALE.format("max |Δ loss| 0.23–0.26 vs 0.04, Δ accuracy 0.070–0.078 vs 0.011; "
                                              "the paper also loses a point with this variant (93.3% vs 94.3%)")),
    # Negative controls: the curve must not follow the decay arm's.
    batch_case("batch-cifar-neg-batch-x25", (RAMP_K2,), (loss_agrees(RAMP_K2.name), accuracy_agrees(RAMP_K2.name)),
               negative=True,
               description="B ×25 at the first step: the noise falls 5× too far"),
    batch_case("batch-cifar-neg-never-anneal", (NEVER,),
               (loss_agrees(NEVER.name), accuracy_curve_agrees(NEVER.name), accuracy_agrees(NEVER.name)),
               negative=True,
               description="η 0.1 and B 32 throughout"),
    # Gated on accuracy only: its loss curve also leaves the band, but only just (0.042–0.051 vs 0.04).
    batch_case("batch-cifar-neg-plain-bn", (annealed("increase_batch_plain_bn", by="batch"),),
               (accuracy_agrees("increase_batch_plain_bn"),), model=cnn(ghost_batch=None), negative=True,
               description="the batch-growing arm with plain BN: its BN noise falls with B (final accuracy "
                           "1.0–2.0 points below decay_lr)"),
]

# --- GPU profile ------------------------------------------------------------------------------
# The paper's CIFAR-10 setting (WRN-16-4, ghost BN 128, B_max 5,120, noise ÷5 three times) with its
# 200-epoch schedule (steps at 60, 120, 160) shortened 4× to 50 epochs (steps at 15, 30, 40);
# crop + flip augmentation, the full training and test sets.
GPU_EPOCHS, GPU_MILESTONES, GPU_B_MAX = 50, (15, 30, 40), 5120
GPU_PROVISIONAL = ("provisional, not yet measured on a GPU: the paper's curves overlap within about 1 point "
                   "of test accuracy and 0.05 of training loss; freeze from the first GPU run (3 seeds)")


def gpu_arm(name: str, *, by: str, lr: float = 0.1, batch: int = 128, momentum: float = 0.9) -> Arm:
    lr_s, batch_s = anneal_noise(lr, batch, GPU_MILESTONES, FACTOR, by=by, batch_max=GPU_B_MAX)
    g = Group(lr_s, WD, momentum)
    return Arm(name, g, g, batch_size=batch_s)


GPU_ARMS = (gpu_arm("original", by="lr"), gpu_arm("increasing_batch", by="batch"),
            gpu_arm("lr_0.5_batch_640", by="batch", lr=0.5, batch=640),
            gpu_arm("momentum_0.98_batch_3200", by="batch", batch=3200, momentum=0.98))
CASES.append(Case(
    id="batch-gpu-wrn16-4-cifar10", claim=CLAIM, profile="gpu", unit="epoch",
    model=("wrn16_4", {"ghost_batch": 128}),
    data=("cifar10", {"batch_size": 128, "augment": True, "smoke_per_class": 2}), arms=GPU_ARMS, steps=GPU_EPOCHS, smoke_steps=1,
    seeds=(0,), measurements=MEASUREMENTS, reference_arm="original",
    properties=tuple(p for a in GPU_ARMS[1:] for p in (
        max_difference_below("epoch_loss", a.name, 0.05, steps=(GPU_MILESTONES[0] + 1, None), source=GPU_PROVISIONAL,
                             name=f"epoch_loss_{a.name}"),
        final_difference_below("test_acc", a.name, 0.01, last=3, source=GPU_PROVISIONAL,
                               name=f"final_test_acc_{a.name}"),
        updates_follow_schedule(a.name, 50_000, source="exact: Σ_e ⌊N/B(e)⌋", name=f"updates_{a.name}"))),
    description="the paper's four CIFAR-10 schedules at 50 epochs; about 14 min on one H100 in strict float32, 4 with TF32 "
                "(harness.device.estimated_minutes)"))
