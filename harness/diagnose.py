"""Which update rule does an optimizer follow? A deterministic diagnosis from a few short probes on
small float64 CPU tensors (a vector and a matrix) with chosen gradients, LR changes and weight decay.

Probes (fresh optimizer each; the LR changed only through param_groups[i]['lr']):
  schedule  5 steps, fixed gradients, the LR ×(1, 1, 0.25, 0.6, 0.1) of the constructor's.
  tangent   4 steps at λ = 0 and 10·θ0, each matrix row's gradient nearly orthogonal to the current
            row (radial part TANGENT_EPS of it, under SGDP's δ/√n = 0.05 per row, 0.029 per layer).
  single    1 step at θ0, and 1 step at 3·θ0 with the same gradient.
Deterministic forms (def12, decoupled, nesterov, dampening with τ fitted, lr_in_buffer,
wd_after_update, lr_read_once) are predicted on every probe's recorded inputs and compared with the
observed θ's; two property forms are judged by their property: trust_ratio (the single step is
parallel to d = g + λθ per tensor, with a ratio ≠ 1 that changes when θ is rescaled) and projected
(on the tangent probe the matrices' update has no component along θ, where def12 has one).
A form whose prediction cannot be told from def12's at the probe's hyperparameters (momentum 0: a
factory without `momentum`; λ = 0 when overridden) is reported not applicable.

Measured: 8–13 ms per diagnose() call (torch SGD for-loop and fused, timm and pytorch_optimizer
SGDW and SGDP, timm Lars, the hand-written forms of harness.forms; shared 2-core CPU, one thread).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from harness.optim import OptimizerSpecError, accepts, first_line

# Relative deviation of the observed trajectory from a form's prediction, below which it matches.
# Measured (float64): ≤ 4e-16 for torch SGD (for-loop, foreach, fused; nesterov, dampening 0.5),
# ReferenceSGD, harness.optim.SGDW, timm and pytorch_optimizer SGDW, every harness.forms form against
# its own; 1.4e-13 for timm Lars (trust_ratio's parallel residual: its step is ~1e-3 of θ). The
# nearest wrong form is ≥ 1e-4 away (dampening, held at τ ≥ TAU_MIN, on def12), every other ≥ 5e-3
# (tests/test_diagnose.py checks both bounds).
TOLERANCE = 1e-9
# Radial fraction of a projected update: SGDP divides θ by ‖θ_row‖ + eps (eps = 1e-8), which leaves
# ~2·eps/‖θ_row‖ of the radial part: measured 2.8e-10 for timm and pytorch_optimizer SGDP (9e-9 at
# TANGENT_SCALE 1); def12 ≥ 2.9e-3 (momentum 0; 0.17 at 0.9), every other form ≥ 5e-3.
PROJECTED_TOLERANCE = 1e-7
SEPARATION = 1e-6  # a form predicted within this of def12 cannot be told apart: not applicable
RATIO_MIN = 1e-6  # a trust ratio must differ from 1, and move with ‖θ‖, by more than this
TAU_MIN = 1e-4  # the dampening fit is held at τ ≥ this, so that def12 (τ = 0) does not match it
TANGENT_EPS = 3e-3
TANGENT_SCALE = 10.0  # θ on the tangent probe: SGDP's eps/‖θ_row‖ leaves less of the radial part
SCALE = 3.0  # θ's rescaling in the second single-step probe
LR_FACTORS = (1.0, 1.0, 0.25, 0.6, 0.1)
DEFAULTS = dict(lr=0.5, momentum=0.9, weight_decay=0.1)  # ηλ = 0.05: wd_after_update is 5% off decoupled

FORMS: dict[str, tuple[str, str]] = {  # key: (label, implication)
    "def12": ("Definition 1.2 (torch.optim.SGD: coupled WD, dampening 0)",
              "Definition 1.2: every claim of Li & Arora applies as stated"),
    "decoupled": ("decoupled weight decay (SGDW, Loshchilov & Hutter)",
                  "decoupled WD, a design choice: Thm 2.9 (WD ≡ exp-LR) does not apply; the SMD "
                  "equilibrium of Wan et al. follows the decoupled form"),
    "nesterov": ("Nesterov momentum, coupled WD: θ ← θ − η(d + γv)",
                 "Nesterov momentum, a design choice: the step is η(d + γv), not ηv, so the exact "
                 "WD ≡ exp-LR equivalence (Thm 2.9) does not apply and constants derived for "
                 "heavy-ball momentum change"),
    "dampening": ("dampened momentum: v = γv + (1 − τ)d after the first step",
                  "dampened momentum: Definition 1.2 at LR η(1 − τ) except the undamped first step, "
                  "so the exact equivalences (Thm 2.9) do not apply; a design choice when asked for "
                  "(dampening=τ), a bug when it comes from an EMA-style buffer (τ = γ)"),
    "lr_in_buffer": ("LR inside the momentum buffer: v = γv + ηd; θ ← θ − v",
                     "the LR is applied inside the momentum buffer (Sutskever et al.'s form), a design "
                     "choice: Definition 1.2 at a constant LR, but after an LR change the buffer keeps "
                     "the old LR, so the schedule claims (exp-LR ≡ WD, TEXP, step decay) do not apply"),
    "wd_after_update": ("weight decay after the step: θ ← (1 − ηλ)(θ − ηv)",
                        "decay applied to the weights after the update, a bug (order of operations): "
                        "decoupled WD plus an η²λv cross term, so Thm 2.9 does not apply and the SMD "
                        "equilibrium holds only to O(ηλ)"),
    "lr_read_once": ("LR read once at construction",
                     "the LR is read once at construction: every schedule (exp-LR, TEXP, step decay) "
                     "is silently ignored — a bug"),
    "trust_ratio": ("per-tensor trust ratio (LARS/LAMB-like)",
                    "per-tensor trust ratio: the update is scale-invariant in θ, so the WD ≡ exp-LR "
                    "equivalence and the intrinsic-LR equilibrium do not apply — a design choice"),
    "projected": ("projected update (SGDP, Heo et al. 2021)",
                  "projected update: the radial part of scale-invariant weights' update is removed, "
                  "which changes the norm dynamics that WD ≡ exp-LR and the intrinsic-LR equilibrium "
                  "rest on, so they do not apply — a design choice"),
    "unknown": ("none of the known forms",
                "none of the known forms: no claim can be assumed to apply until the update rule is "
                "understood"),
}
MOMENTUM_ONLY = ("nesterov", "dampening", "lr_in_buffer")


@dataclass
class FormMatch:
    form: str
    label: str
    deviation: float  # NaN: not applicable
    matched: bool
    note: str = ""


@dataclass
class Diagnosis:
    form: str
    label: str
    implication: str
    conforms: bool
    matches: list[FormMatch] = field(default_factory=list)
    error: str = ""


# ---- the deterministic forms, as functions of (θ, v, g, η): v = None before the first step ----

def _buf(v, x, momentum, scale=1.0):
    return x.clone() if v is None else momentum * v + scale * x


def _def12(th, v, g, lr, h):
    v = _buf(v, g + h.weight_decay * th, h.momentum)
    return th - lr * v, v


def _decoupled(th, v, g, lr, h):
    v = _buf(v, g, h.momentum)
    return th * (1 - lr * h.weight_decay) - lr * v, v


def _nesterov(th, v, g, lr, h):
    d = g + h.weight_decay * th
    v = _buf(v, d, h.momentum)
    return th - lr * (d + h.momentum * v), v


def _dampening(th, v, g, lr, h):
    v = _buf(v, g + h.weight_decay * th, h.momentum, 1 - h.tau)
    return th - lr * v, v


def _lr_in_buffer(th, v, g, lr, h):
    v = _buf(v, lr * (g + h.weight_decay * th), h.momentum)
    return th - v, v


def _wd_after_update(th, v, g, lr, h):
    v = _buf(v, g, h.momentum)
    return (1 - lr * h.weight_decay) * (th - lr * v), v


def _lr_read_once(th, v, g, lr, h):
    return _def12(th, v, g, h.lr0, h)


RULES = dict(def12=_def12, decoupled=_decoupled, nesterov=_nesterov, dampening=_dampening,
             lr_in_buffer=_lr_in_buffer, wd_after_update=_wd_after_update, lr_read_once=_lr_read_once)


@dataclass
class _Trajectory:
    """One probe's inputs and the observed θ after each step (lists over the parameter tensors)."""
    name: str
    lr0: float
    momentum: float
    weight_decay: float
    theta0: list
    lrs: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    thetas: list = field(default_factory=list)
    tau: float = 0.0


def _values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Fixed, irregular numbers of order 1 (a formula, not an RNG: the same on every torch)."""
    k = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64)
    return (torch.sin(k * (0.9 + 0.37 * seed)) + 0.5 * torch.cos(0.31 * k * k + seed)).reshape(shape)


SHAPES = ((5,), (3, 4))


def _theta0() -> list[torch.Tensor]:
    return [_values(SHAPES[0], 1) + 0.3, _values(SHAPES[1], 2) + 0.4]


def _fixed_grads(k: int, theta: list) -> list[torch.Tensor]:
    return [_values(t.shape, 10 + 2 * k + i) for i, t in enumerate(theta)]


def _tangent_grads(k: int, theta: list) -> list[torch.Tensor]:
    """Matrices: per row, the part of a fixed vector orthogonal to the current row, plus
    TANGENT_EPS of its norm along the row (SGDP projects; def12 keeps a radial component)."""
    grads = []
    for i, th in enumerate(theta):
        g = _values(th.shape, 30 + 2 * k + i)
        if th.dim() > 1:
            rows, unit = g.reshape(th.shape[0], -1), th.reshape(th.shape[0], -1)
            unit = unit / unit.norm(dim=1, keepdim=True)
            tangent = rows - (rows * unit).sum(1, keepdim=True) * unit
            g = (tangent + TANGENT_EPS * tangent.norm(dim=1, keepdim=True) * unit).reshape(th.shape)
        grads.append(g)
    return grads


def _first_line(exc: BaseException) -> str:
    first = first_line(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class _Prober:
    def __init__(self, factory: Callable, kwargs: dict, with_momentum: bool):
        self.factory, self.kwargs, self.with_momentum = factory, kwargs, with_momentum

    def build(self, params: list, lr: float, momentum: float, weight_decay: float):
        kw = dict(lr=lr, weight_decay=weight_decay, **self.kwargs)
        group = dict(params=params, lr=lr, weight_decay=weight_decay)  # per-group keys, as the cases pass them
        if self.with_momentum:
            kw["momentum"] = group["momentum"] = momentum
        return self.factory([group], **kw)

    def record(self, traj: _Trajectory, grad_fn: Callable, lr_factors: tuple[float, ...], opt=None,
               params=None) -> _Trajectory:
        if opt is None:
            params = [torch.nn.Parameter(t.clone()) for t in traj.theta0]
            opt = self.build(params, traj.lr0, traj.momentum, traj.weight_decay)
        current = [t.clone() for t in traj.theta0]
        for k, factor in enumerate(lr_factors):
            lr = traj.lr0 * factor
            for group in opt.param_groups:
                group["lr"] = lr
            grads = grad_fn(k, current)
            for p, g in zip(params, grads):
                p.grad = g.clone()  # a copy: some optimizers write into p.grad
            opt.step()
            current = [p.detach().clone() for p in params]
            traj.lrs.append(lr)
            traj.grads.append(grads)
            traj.thetas.append(current)
        return traj


def _predict(form: str, traj: _Trajectory) -> list[list[torch.Tensor]]:
    rule, theta, bufs, out = RULES[form], [t.clone() for t in traj.theta0], [None] * len(traj.theta0), []
    for lr, grads in zip(traj.lrs, traj.grads):
        for i, g in enumerate(grads):
            theta[i], bufs[i] = rule(theta[i], bufs[i], g, lr, traj)
        out.append([t.clone() for t in theta])
    return out


def _gap(a: list, b: list, theta0: list) -> float:
    """Max over tensors of max_t ‖a_t − b_t‖ / (the farthest either moved from θ0)."""
    worst = 0.0
    for i, th0 in enumerate(theta0):
        err = max(float((x[i] - y[i]).norm()) for x, y in zip(a, b))
        scale = max(max(float((x[i] - th0).norm()), float((y[i] - th0).norm())) for x, y in zip(a, b))
        if not (math.isfinite(err) and math.isfinite(scale)):
            return math.inf
        if err > 0:
            worst = max(worst, err / scale if scale > 0 else math.inf)
    return worst


def _fit_tau(trajs: list[_Trajectory]) -> float:
    """τ of v_t = γv_{t−1} + (1 − τ)d_t, least squares over the observed v_t = (θ_{t−1} − θ_t)/η_t."""
    num = den = 0.0
    for tr in trajs:
        prev, v_prev = tr.theta0, None
        for lr, grads, theta in zip(tr.lrs, tr.grads, tr.thetas):
            vs = [(p - t) / lr for p, t in zip(prev, theta)]
            if v_prev is not None:
                for v, vp, g, p in zip(vs, v_prev, grads, prev):
                    d = g + tr.weight_decay * p
                    num += float(((v - tr.momentum * vp) * d).sum())
                    den += float((d * d).sum())
            prev, v_prev = theta, vs
    tau = 1 - num / den if den > 0 else math.nan
    return min(max(tau, TAU_MIN), 1.0) if math.isfinite(tau) else math.nan


def _radial_fraction(theta0: list, thetas: list) -> float:
    """Max over matrices and steps of |⟨Δθ, θ̂⟩| / ‖Δθ‖ (θ before the step)."""
    worst = 0.0
    for i, th0 in enumerate(theta0):
        if th0.dim() < 2:
            continue
        prev = th0
        for theta in thetas:
            delta, unit = theta[i] - prev, prev / prev.norm()
            size = float(delta.norm())
            frac = abs(float((delta * unit).sum())) / size if size > 0 else math.inf
            worst = max(worst, frac) if math.isfinite(frac) else math.inf
            prev = theta[i]
    return worst


def _trust(single: _Trajectory, scaled: _Trajectory) -> tuple[float, str]:
    """Parallel residual of the one step to −η(g + λθ) per tensor, with its ratio at θ and SCALE·θ;
    a ratio of 1, or one that rescaling θ leaves alone, is no trust ratio: a full miss (1)."""
    residual, ratios = 0.0, []
    for tr in (single, scaled):
        row = []
        for th0, g, th1 in zip(tr.theta0, tr.grads[0], tr.thetas[0]):
            delta, u = th1 - th0, -tr.lrs[0] * (g + tr.weight_decay * th0)
            rho = float((delta * u).sum()) / float((u * u).sum())
            size = float(delta.norm())
            res = float((delta - rho * u).norm()) / size if size > 0 else math.inf
            residual = max(residual, res) if math.isfinite(res) else math.inf
            row.append(rho)
        ratios.append(row)
    not_one = max(abs(r - 1) for r in ratios[0] + ratios[1])
    moves = max((abs(b / a - 1) if a != 0 else math.inf) for a, b in zip(*ratios))
    is_trust = not_one > RATIO_MIN and moves > RATIO_MIN
    note = (f"per-tensor ratio {', '.join(f'{r:.3g}' for r in ratios[0])} at θ, "
            f"{', '.join(f'{r:.3g}' for r in ratios[1])} at {SCALE:g}·θ")
    if not is_trust:
        note += ": not a trust ratio (1, or unchanged by rescaling θ), counted as a full miss"
        residual = max(residual, 1.0)
    return residual, note


def diagnose(factory: Callable, spec: str, kwargs: dict | None = None, *, lr: float | None = None,
             momentum: float | None = None, weight_decay: float | None = None) -> Diagnosis:
    """Diagnose `factory`'s update rule (spec names it in messages; kwargs go to every construction;
    lr/momentum/weight_decay override the probes' own, DEFAULTS). Raises ValueError only when the
    optimizer cannot be constructed at all; anything raised while probing gives form 'unknown'."""
    kwargs = dict(kwargs or {})
    clash = sorted(set(kwargs) & {"lr", "momentum", "weight_decay"})
    if clash:
        raise OptimizerSpecError(f"diagnose {spec}: kwargs must not set {', '.join(clash)} (the probes set them)")
    with_momentum = accepts(factory, "momentum")
    h = dict(DEFAULTS, **{k: v for k, v in dict(lr=lr, momentum=momentum, weight_decay=weight_decay).items()
                          if v is not None})
    if not with_momentum:
        h["momentum"] = 0.0
    if not (h["lr"] > 0 and 0 <= h["momentum"] < 1 and h["weight_decay"] >= 0):
        raise OptimizerSpecError(f"diagnose {spec}: need lr > 0, momentum in [0, 1), weight_decay >= 0; got {h}")
    prober = _Prober(factory, kwargs, with_momentum)

    schedule = _Trajectory("schedule", h["lr"], h["momentum"], h["weight_decay"], _theta0())
    params = [torch.nn.Parameter(t.clone()) for t in schedule.theta0]
    try:
        opt = prober.build(params, schedule.lr0, schedule.momentum, schedule.weight_decay)
    except Exception as exc:
        extra = f" and {kwargs}" if kwargs else ""
        raise OptimizerSpecError(f"optimizer {spec} cannot be constructed with (params, lr=, "
                                 f"{'momentum=, ' if with_momentum else ''}weight_decay=){extra}: "
                                 f"{_first_line(exc)}") from exc
    if not (hasattr(opt, "param_groups") and hasattr(opt, "step")):
        raise OptimizerSpecError(f"optimizer {spec} returned {type(opt).__name__}, which has no param_groups/step")

    def probe(name, theta0, weight_decay=h["weight_decay"]):
        return _Trajectory(name, h["lr"], h["momentum"], weight_decay, theta0)

    try:
        trajs = [prober.record(schedule, _fixed_grads, LR_FACTORS, opt, params),
                 prober.record(probe("tangent", [TANGENT_SCALE * t for t in _theta0()], 0.0),
                               _tangent_grads, (1.0,) * 4),
                 prober.record(probe("single", _theta0()), _fixed_grads, (1.0,)),
                 prober.record(probe("single-scaled", [SCALE * t for t in _theta0()]), _fixed_grads, (1.0,))]
    except Exception as exc:
        label, _ = FORMS["unknown"]
        return Diagnosis("unknown", label, "the optimizer raised while being probed: its update rule is "
                         "unknown and no claim can be assumed to apply", False, [], _first_line(exc))
    return _judge(trajs, h, with_momentum)


def _judge(trajs: list[_Trajectory], h: dict, with_momentum: bool) -> Diagnosis:
    tau = _fit_tau(trajs[:2])
    for tr in trajs:
        tr.tau = tau
    predicted = {form: [_predict(form, tr) for tr in trajs] for form in RULES}

    def deviation(form: str) -> float:
        return max(_gap(p, tr.thetas, tr.theta0) for p, tr in zip(predicted[form], trajs))

    matches = []
    for form in RULES:
        label = FORMS[form][0]
        if form in MOMENTUM_ONLY and h["momentum"] == 0:
            why = "momentum 0" if with_momentum else "the factory takes no momentum"
            matches.append(FormMatch(form, label, math.nan, False, f"not applicable: needs momentum ({why})"))
            continue
        if form not in ("def12", "dampening"):
            sep = max(_gap(p, q, tr.theta0) for p, q, tr in zip(predicted[form], predicted["def12"], trajs))
            if sep < SEPARATION:
                matches.append(FormMatch(form, label, math.nan, False,
                                         f"not applicable: identical to def12 (to {sep:.1g}) at momentum "
                                         f"{h['momentum']:g}, weight_decay {h['weight_decay']:g}"))
                continue
        dev = deviation(form)
        note = f"fitted τ = {tau:.4g}" + (f" (held at its floor {TAU_MIN:g})" if tau == TAU_MIN else "") \
            if form == "dampening" else ""
        matches.append(FormMatch(form, label, dev, dev < TOLERANCE, note))

    trust_dev, trust_note = _trust(trajs[2], trajs[3])
    matches.append(FormMatch("trust_ratio", FORMS["trust_ratio"][0], trust_dev, trust_dev < TOLERANCE, trust_note))
    tangent = trajs[1]
    radial = _radial_fraction(tangent.theta0, tangent.thetas)
    def12_radial = _radial_fraction(tangent.theta0, predicted["def12"][1])
    matches.append(FormMatch("projected", FORMS["projected"][0], radial, radial < PROJECTED_TOLERANCE,
                             f"radial fraction of the matrices' update on gradients nearly orthogonal to θ "
                             f"(def12 would leave {def12_radial:.2g})"))

    matched = {m.form: m for m in matches if m.matched}
    if "def12" in matched:
        form = "def12"
    elif matched:  # the probes keep the forms ≥ 1e-4 apart, so at most one matches but for a fluke
        form = min(matched.values(), key=lambda m: m.deviation).form
    else:
        form = "unknown"
    label, implication = FORMS[form]
    if form == "dampening":
        implication = f"{implication} (fitted τ = {tau:.3g})"
    return Diagnosis(form, label, implication, form == "def12", matches)
