"""Spherical motion dynamics (Wan et al. 2020) and the intrinsic LR (Li, Lyu & Arora 2020):
per-tensor measurements on the sphere, their theoretical equilibria, and properties over them.

Measured per tracked tensor w (a model's `sphere_names`, else its `si_names`), accumulated every
update and emitted once per window as tidy rows whose metric is `<quantity>:<parameter name>`:
  angular_rms   RMS over the window of Δ_t = ∠(w_{t−1}, w_t) = 2·asin(‖ŵ_t − ŵ_{t−1}‖/2) (float64;
                arccos of a cosine near 1 loses all precision, and the plain mean is biased low)
  unit_grad_sq  mean over the window of ‖∇_w L‖²·‖w‖² (the L of the equilibrium-norm formula)
  norm          ‖w‖ at the window's end
  eff_lr        η_t / ‖w‖² at the window's end
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from harness.spec import Case, Property, Verdict

QUANTITIES = ("angular_rms", "unit_grad_sq", "norm", "eff_lr")


def tracked_names(model) -> tuple[str, ...]:
    return tuple(getattr(model, "sphere_names", None) or model.si_names)


@torch.no_grad()
def angular(ctx, window: int = 100) -> list[tuple[str, str, float]]:
    rows = []
    for arm_name, arm in ctx.arms.items():
        named = dict(arm.model.named_parameters())
        lr = arm.spec.si.lr(ctx.t - 1)
        for pname in tracked_names(arm.model):
            p = named[pname]
            w = p.detach().double().reshape(-1)
            norm = float(w.norm())
            key = ("sphere", arm_name, pname)
            st = ctx.state.setdefault(key, {"prev_unit": None, "prev_norm": None, "sq": 0.0,
                                            "grad": 0.0, "n": 0})
            unit = w / norm
            if st["prev_unit"] is not None:
                chord = float((unit - st["prev_unit"]).norm())
                st["sq"] += (2 * math.asin(min(chord / 2, 1.0))) ** 2
                if p.grad is not None:  # the gradient of this update, taken at w_{t−1}
                    st["grad"] += float(p.grad.double().norm()) ** 2 * st["prev_norm"] ** 2
                st["n"] += 1
            st["prev_unit"], st["prev_norm"] = unit, norm
            if ctx.t % window == 0 and st["n"]:
                rows += [(arm_name, f"angular_rms:{pname}", math.sqrt(st["sq"] / st["n"])),
                         (arm_name, f"unit_grad_sq:{pname}", st["grad"] / st["n"]),
                         (arm_name, f"norm:{pname}", norm),
                         (arm_name, f"eff_lr:{pname}", lr / norm ** 2)]
                st["sq"], st["grad"], st["n"] = 0.0, 0.0, 0
        if ctx.t % window == 0:  # the theory at this window's LR, for plots
            g = arm.spec.si
            if g.weight_decay > 0:
                rows.append((arm_name, "angular_theory",
                             equilibrium_angle(lr, g.weight_decay, g.momentum, decoupled=g.decoupled)))
    return rows


MEASUREMENTS = {"angular": angular}


# ---- theory ---------------------------------------------------------------------------------

def equilibrium_angle(lr: float, wd: float, momentum: float = 0.0, decoupled: bool = False) -> float:
    """Δ* (Wan et al.): arccos(1 − ηλ) for SGD, sqrt(2ηλ/(1+γ)) with momentum (coupled WD);
    decoupled WD: sqrt(2ηλ(1−γ)/(1+γ)) (derived, CLAIMS.md §3)."""
    if decoupled:
        return math.sqrt(2 * lr * wd * (1 - momentum) / (1 + momentum))
    if momentum == 0:
        return math.acos(1 - lr * wd)
    return math.sqrt(2 * lr * wd / (1 + momentum))


def relaxation_time(lr: float, wd: float, momentum: float = 0.0) -> float:
    """τ of ‖w‖⁴ in updates: (1 − γ)/(4ηλ) (derived, CLAIMS.md §3)."""
    return (1 - momentum) / (4 * lr * wd)


# ---- tidy helpers ---------------------------------------------------------------------------

def per_layer(results: pd.DataFrame, quantity: str, steps: tuple[int, int | None]) -> pd.DataFrame:
    """Rows of `quantity:<layer>` in the step range, with a `layer` column."""
    sel = results[results.metric.str.startswith(quantity + ":")]
    lo, hi = steps
    sel = sel[(sel.step >= lo) & ((sel.step <= hi) if hi is not None else True)]
    return sel.assign(layer=sel.metric.str.split(":", n=1).str[1])


def window_mean(results, quantity, steps, arm) -> pd.DataFrame:
    """Mean over the windows in range, per (seed, layer), for one arm (RMS windows are averaged as
    mean squares, so the result is still an RMS)."""
    sel = per_layer(results, quantity, steps)
    sel = sel[sel.arm == arm]
    if quantity == "angular_rms":
        return sel.groupby(["seed", "layer"]).value.apply(lambda v: math.sqrt((v ** 2).mean()))
    return sel.groupby(["seed", "layer"]).value.mean()


def _summarize(per_layer_ratio: pd.Series, target: float, tol: float, expected: str, share: float) -> Verdict:
    """Median over seeds per layer; passed when at least `share` of layers are within tol of target."""
    if per_layer_ratio.empty or per_layer_ratio.isna().any():
        return Verdict(math.nan, expected, tol, False, detail="no measurements in range")
    med = per_layer_ratio.groupby("layer").median()
    err = (med - target).abs()
    inside = float((err < tol).mean())
    detail = "; ".join(f"{k}: {v:.3f}" for k, v in med.items()) + f"; {inside:.0%} of layers within"
    # measured: the largest deviation among the layers that the share allows us to judge
    k = max(1, math.ceil(share * len(err)))
    measured = float(err.sort_values().iloc[k - 1])
    return Verdict(measured, expected, tol, bool(measured < tol), detail=detail)


# ---- properties -----------------------------------------------------------------------------

def angle_matches(arm: str, theory: float, tol: float, steps: tuple[int, int | None], *, source: str,
                  share: float = 1.0, name: str = "angular_update_vs_theory",
                  layers: tuple[str, ...] | None = None) -> Property:
    """Per layer (all tracked, or `layers`), RMS angular update over the range / Δ* is within tol
    of 1 (median over seeds), for at least `share` of the layers."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        ratio = window_mean(results, "angular_rms", steps, arm) / theory
        if layers is not None:
            ratio = ratio[ratio.index.get_level_values("layer").isin(layers)]
        return _summarize(ratio, 1.0, tol, f"|RMS Δ / {theory:.4g} − 1| < {tol:g} ({share:.0%} of layers)", share)
    return Property(name, check, source)


def norm_matches(arm: str, lr: float, wd: float, momentum: float, tol: float, steps, *, source: str,
                 share: float = 1.0) -> Property:
    """Per layer, ‖w‖ / (ηL/(2λ(1−γ)))^¼ is within tol of 1, L the window-mean unit-gradient²
    (compared as the norm itself, not its fourth power, so tol reads as a relative error of ‖w‖)."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        norm = window_mean(results, "norm", steps, arm)
        theory = (lr * window_mean(results, "unit_grad_sq", steps, arm) / (2 * wd * (1 - momentum))) ** 0.25
        return _summarize(norm / theory, 1.0, tol, f"|‖w‖ / (ηL/2λ(1−γ))^¼ − 1| < {tol:g}", share)
    return Property("equilibrium_norm_vs_theory", check, source)


def arms_ratio(quantity: str, arm: str, other: str, target: float, tol: float, steps, *, source: str,
               name: str, share: float = 1.0) -> Property:
    """Per layer, window-mean `quantity` of `arm` / that of `other` is within tol of `target`."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        ratio = window_mean(results, quantity, steps, arm) / window_mean(results, quantity, steps, other)
        return _summarize(ratio, target, tol, f"|{quantity}[{arm}]/{quantity}[{other}] − {target:.4g}| < {tol:g}",
                          share)
    return Property(name, check, source)


def time_to_equilibrium(results: pd.DataFrame, arm: str, *, late: tuple[int, int | None],
                        band: float = 0.25, quantity: str = "eff_lr") -> pd.Series:
    """Per seed: the first window end at which `quantity` (mean over layers) comes within `band`
    of its mean over the `late` range (first entry: "stays inside" would time the equilibrium's own
    fluctuations instead of the approach)."""
    sel = per_layer(results, quantity, (1, None))
    sel = sel[sel.arm == arm].groupby(["seed", "step"]).value.mean()
    times = {}
    for seed, series in sel.groupby(level="seed"):
        series = series.droplevel("seed")
        lo, hi = late
        target = series[(series.index >= lo) & ((series.index <= hi) if hi else True)].mean()
        inside = (series / target - 1).abs() < band
        times[seed] = float(inside.idxmax()) if inside.any() else math.nan
    return pd.Series(times)


def time_scales_as(base: str, lambda_e: dict[str, float], exponent: float, tol: float, *,
                   late: tuple[int, int | None], source: str, name: str) -> Property:
    """Time to equilibrium T ∝ λ_e^(−exponent): the constant is fitted on `base` (median over seeds)
    and reused for every other arm; measured = the worst |T / T_predicted − 1|."""
    def check(results: pd.DataFrame, case: Case) -> Verdict:
        t_base = time_to_equilibrium(results, base, late=late).median()
        const = t_base * lambda_e[base] ** exponent
        errs, parts = [], []
        for arm, lam_e in lambda_e.items():
            if arm == base:
                continue
            t = time_to_equilibrium(results, arm, late=late).median()
            pred = const / lam_e ** exponent
            errs.append(abs(t / pred - 1))
            parts.append(f"{arm}: T={t:.0f} vs {pred:.0f}")
        measured = max(errs) if errs and not any(math.isnan(e) for e in errs) else math.nan
        return Verdict(measured, f"|T / (C·λ_e^-{exponent:g}) − 1| < {tol:g}", tol, bool(measured < tol),
                       detail=f"{base}: T={t_base:.0f}; " + "; ".join(parts))
    return Property(name, check, source)
