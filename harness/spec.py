"""Declarations: what a case is made of. Plain frozen data; nothing here trains or measures.

A Case names its components (model, data, measurements) by registry key and holds numbers.
It never sets the device, the optimizer implementation or the seeds' meaning: the harness
injects those (see harness.runner.RunEnv).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PROFILES = ("cpu", "gpu")
DTYPES = ("float64", "float32")
UNITS = ("step", "epoch")
# The function gap of the exact cases: every step on the training batch ('batch_gap', free: the
# training forward computed it) and every PROBE_EVERY steps, plus the last, on the fixed probe
# ('train_gap'). Measured (docs/benchmarks.md): one probe forward costs 1–4× a lock-step update, so
# probing every step would triple it; every 25th keeps measurements inside the 10% budget.
PROBE_EVERY = 25
FUNCTION_GAP = ("batch_gap", ("train_gap", {"every": PROBE_EVERY}))
FUNCTION_GAP_METRICS = ("batch_gap", "train_gap")


class CaseError(ValueError):
    """A malformed case declaration. The message names the case and the field."""


@dataclass(frozen=True)
class Group:
    """One optimizer parameter group: a learning-rate schedule and the coupled weight decay.

    `lr` is a schedule (a pure function step -> value, see harness.schedules).
    `decoupled=True` applies the decay as θ ← θ(1 − η_t λ) outside the optimizer (SGDW style)
    instead of passing it as `weight_decay` (coupled, Definition 1.2 of Li & Arora).
    `initial_buffer=True` seeds the momentum buffer from `lr.initial_buffer(θ0)` before step 1.
    """

    lr: Callable[[int], float]
    weight_decay: float = 0.0
    momentum: float = 0.0
    decoupled: bool = False
    initial_buffer: bool = False
    # Apply `lr.buffer_correction(k)` (ũ ← ũ + a θ̃ before update k) where the schedule gives one.
    buffer_correction: bool = False
    nesterov: bool = False  # torch.optim.SGD's per-group 'nesterov' (needs momentum > 0)


@dataclass(frozen=True)
class Arm:
    """One training configuration of a case. `si` drives the scale-invariant weights; `other`
    drives every other trainable parameter, or freezes them when None."""

    name: str
    si: Group
    other: Group | None = None
    # Size of a random perturbation of the initial SI weights, in units of the dtype's machine
    # epsilon relative to ‖θ0‖ (0: none). A "twin" of the reference arm perturbed by a few ulps
    # measures how fast roundoff is amplified by the dynamics (the roundoff floor).
    init_noise_ulps: float = 0.0
    # The SI weights start at init_scale × θ0 (the intrinsic-LR reparametrization); with
    # scale_other the remaining trainable parameters are rescaled too (a negative control).
    init_scale: float = 1.0
    scale_other: bool = False
    # This arm's batch is this many of the case's base batches (the first m of each step's draw).
    batch_multiplier: int = 1
    # Epoch-unit cases only: the batch size per epoch (a harness.batch_schedules.BatchSize);
    # None: the data source's batch size.
    batch_size: Callable[[int], int] | None = None
    # σ of the model's activation noise (models.ActivationNoise) per step or epoch; None: no noise.
    act_noise: Callable[[int], float] | None = None
    # Micro-batches per update (gradient accumulation): the arm's batch split in this many equal
    # parts, the gradients of their mean losses averaged (the accumulation claim; --stack
    # accumulate=k multiplies it).
    accumulate: int = 1


@dataclass(frozen=True)
class Property:
    """A named check over a case's tidy results; `check(results, case)` returns a Verdict.

    `source` says where the tolerance came from (a measurement, a paper); it is shown in reports.
    """

    name: str
    check: Callable[..., "Verdict"]
    source: str
    # Reason (with the measured numbers) why this one property does not reproduce at the case's
    # scale while the case's other properties do: its failure is expected, its passing is an xpass.
    xfail: str | None = None

    def expected_to_fail(self, reason: str) -> "Property":
        return dataclasses.replace(self, xfail=reason)


@dataclass(frozen=True)
class Verdict:
    measured: float
    expected: str  # human-readable relation, e.g. "< 1e-09"
    tolerance: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class Case:
    id: str
    claim: str
    profile: str
    model: tuple[str, Mapping[str, Any]]
    data: tuple[str, Mapping[str, Any]]
    arms: tuple[Arm, ...]
    steps: int
    properties: tuple[Property, ...]
    seeds: tuple[int, ...] = (0,)
    measurements: tuple = (*FUNCTION_GAP, "si_norm", "loss")
    # A negative control: the case passes when every property fails, as intended.
    negative: bool = False
    dtype: str | None = None  # None: the profile's default (cpu float64, gpu float32)
    slow: bool = False
    # Capabilities the system under test must have (e.g. "momentum_buffer_state").
    requires: tuple[str, ...] = ()
    # Steps used by `--smoke` (proves the code path; produces no verdict).
    smoke_steps: int = 3
    # Arms' results are compared against this arm (gaps, norm ratios).
    reference_arm: str | None = None
    description: str = ""
    xfail: str | None = None  # reason (with measured numbers) why the claim does not reproduce here
    # An exact case that enters the conformance matrix (harness.matrix): crossed with norms, dtypes
    # and optimizer implementations.
    matrix: bool = False
    # "step": `steps` updates in lock-step, schedules indexed by update. "epoch": `steps` epochs; every
    # arm walks the same example order each epoch in batches of its own size, schedules (LR, batch
    # size) are indexed by the 0-based epoch and measurements run at the end of each epoch.
    unit: str = "step"
    # An exact equivalence (a float64 roundoff-level bound, or bitwise equality), never chaotic: its
    # verdict and value class must be the same under every CPU's SIMD kernels. Marked `exact`; CI
    # runs these a second time under ATEN_CPU_CAPABILITY=default against the committed baseline.
    exact: bool = False

    @property
    def reference(self) -> str:
        return self.reference_arm or self.arms[0].name

    @property
    def markers(self) -> tuple[str, ...]:
        marks = [self.profile]
        if self.slow:
            marks.append("slow")
        if self.negative:
            marks.append("negative")
        if self.exact:
            marks.append("exact")
        return tuple(marks)

    def default_dtype(self) -> str:
        return self.dtype or ("float64" if self.profile == "cpu" else "float32")


def validate(case: Any) -> Case:
    """Reject a malformed case with a message naming the case and the field."""
    name = getattr(case, "id", None) or "<case without id>"

    def bad(fld: str, why: str) -> CaseError:
        return CaseError(f"case {name!r}: field {fld!r}: {why}")

    if not isinstance(case, Case):
        raise bad("*", f"expected a harness.spec.Case, got {type(case).__name__}")
    if not isinstance(case.id, str) or not case.id or any(c.isspace() for c in case.id):
        raise bad("id", "must be a non-empty string without whitespace")
    if not case.claim:
        raise bad("claim", "must name the claim (e.g. 'li-arora-2020/thm2.1')")
    if case.profile not in PROFILES:
        raise bad("profile", f"must be one of {PROFILES}, got {case.profile!r}")
    if case.dtype is not None and case.dtype not in DTYPES:
        raise bad("dtype", f"must be one of {DTYPES} or None, got {case.dtype!r}")
    for fld in ("model", "data"):
        value = getattr(case, fld)
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], Mapping)):
            raise bad(fld, "must be a (registry_name, {kwargs}) pair")
    if not isinstance(case.steps, int) or case.steps < 1:
        raise bad("steps", f"must be a positive int, got {case.steps!r}")
    if not isinstance(case.smoke_steps, int) or not 1 <= case.smoke_steps <= case.steps:
        raise bad("smoke_steps", f"must be an int in [1, steps], got {case.smoke_steps!r}")
    if not case.seeds or not all(isinstance(s, int) and s >= 0 for s in case.seeds):
        raise bad("seeds", f"must be a non-empty tuple of non-negative ints, got {case.seeds!r}")
    if not case.arms or not all(isinstance(a, Arm) for a in case.arms):
        raise bad("arms", "must be a non-empty tuple of Arm")
    names = [a.name for a in case.arms]
    if len(set(names)) != len(names):
        raise bad("arms", f"arm names must be unique, got {names}")
    if case.reference_arm is not None and case.reference_arm not in names:
        raise bad("reference_arm", f"{case.reference_arm!r} is not one of the arms {names}")
    for arm in case.arms:
        for label, group in (("si", arm.si), ("other", arm.other)):
            if group is None:
                if label == "si":
                    raise bad(f"arms[{arm.name}].si", "the scale-invariant group is required")
                continue
            if not callable(group.lr):
                raise bad(f"arms[{arm.name}].{label}.lr", "must be a schedule (callable step -> lr)")
            if not (group.weight_decay >= 0 and 0 <= group.momentum < 1):
                raise bad(f"arms[{arm.name}].{label}",
                          "needs weight_decay >= 0 and momentum in [0, 1)")
            if group.nesterov and group.momentum == 0:
                raise bad(f"arms[{arm.name}].{label}.nesterov", "Nesterov momentum needs momentum > 0")
            for flag, method in (("initial_buffer", "initial_buffer"),
                                 ("buffer_correction", "buffer_correction")):
                if getattr(group, flag) and not hasattr(group.lr, method):
                    raise bad(f"arms[{arm.name}].{label}.{flag}", f"the schedule provides no {method}()")
        if not (isinstance(arm.batch_multiplier, int) and arm.batch_multiplier >= 1):
            raise bad(f"arms[{arm.name}].batch_multiplier", f"must be an int >= 1, got {arm.batch_multiplier}")
        if not (isinstance(arm.accumulate, int) and arm.accumulate >= 1):
            raise bad(f"arms[{arm.name}].accumulate", f"must be an int >= 1, got {arm.accumulate!r}")
        if not arm.init_scale > 0:
            raise bad(f"arms[{arm.name}].init_scale", f"must be > 0, got {arm.init_scale}")
    if case.unit not in UNITS:
        raise bad("unit", f"must be one of {UNITS}, got {case.unit!r}")
    for arm in case.arms:
        if arm.batch_size is not None and case.unit != "epoch":
            raise bad(f"arms[{arm.name}].batch_size", "a batch-size schedule needs unit='epoch'")
        if arm.batch_size is not None and not callable(arm.batch_size):
            raise bad(f"arms[{arm.name}].batch_size", "must be a schedule (callable epoch -> int)")
        if case.unit == "epoch" and arm.batch_multiplier != 1:
            raise bad(f"arms[{arm.name}].batch_multiplier", "epoch-unit cases set batch_size instead")
    if not case.properties or not all(isinstance(p, Property) for p in case.properties):
        raise bad("properties", "must be a non-empty tuple of Property (a case must check something)")
    if case.negative and any(p.xfail for p in case.properties):
        raise bad("properties", "a negative control's properties must all fail: drop the one marked xfail")
    if not all(p.source for p in case.properties):
        raise bad("properties", "every property states where its tolerance came from (source)")
    prop_names = [p.name for p in case.properties]
    if len(set(prop_names)) < len(prop_names):
        twice = sorted({n for n in prop_names if prop_names.count(n) > 1})
        raise bad("properties", f"property names must be unique (verdicts and baselines are keyed by "
                                f"case and property), {', '.join(twice)} appear(s) twice: pass name=")
    return case
