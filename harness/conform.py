"""`python -m harness conform`: one optimizer's certificate on one screen.

Two halves: (1) the diagnosis of its update rule (harness.diagnose: deterministic probes on small
tensors, which of the known forms it follows, each with its measured deviation), and (2) per claim
family, whether the claim holds for it, from a quick set of the family's own cases (the positive
cases only; their negative controls test the harness, not the optimizer): holds / does not hold /
not applicable (why, e.g. no momentum) / not run (families too slow for the quick certificate; `--full`
runs them), with the worst margin to a bound. The diagnosis says *why* a family does not hold, and
whether that is a design choice (decoupled WD, a trust ratio) or a bug (an LR read once).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass

import pandas as pd

from harness.runner import RunEnv


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    cases: tuple[str, ...]
    quick: bool = True  # part of the default (under 30 s) certificate


FAMILIES = (
    Family("wd-exp-lr", "WD ≡ exp-LR (Li & Arora 2020, Thm 2.1 / 2.9)",
           ("wdexp-thm2.1-mlp-bn", "wdexp-thm2.9-mlp-bn", "wdexp-zerobuf-mlp-bn")),
    Family("texp", "TEXP / TEXP++ ≡ step decay, any schedule (Li & Arora 2020)",
           ("texp-step-decay-mlp-bn", "texppp-step-decay-mlp-bn", "texppp-cosine-mlp-bn")),
    Family("intrinsic-reparam", "intrinsic-LR reparametrization (Li, Lyu & Arora 2020)",
           ("intrinsic-reparam-c3-float64-mlp-bn", "intrinsic-reparam-c2-float32-mlp-bn")),
    Family("smd", "SMD angular-update equilibrium (Wan et al. 2020)", ("smd-momentum-equilibrium",)),
    Family("ilr-equilibrium", "intrinsic-LR equilibrium (Li, Lyu & Arora 2020)",
           ("ilr-equal-lambda-e-same-equilibrium",), quick=False),
    Family("toy", "BN + WD toy never converges (Li & Arora 2020)", ("toy-bn-wd-never-converges",)),
)


def _ratio(measured: float, tolerance: float, expected: str) -> float:
    """How far a value sits towards its bound: ≤ 1 inside (holds), > 1 past it. NaN: not a bound."""
    if not (math.isfinite(measured) and math.isfinite(tolerance)):
        return math.nan
    if "<" in expected:
        return measured / tolerance if tolerance > 0 else (0.0 if measured <= 0 else math.inf)
    if ">" in expected:
        return tolerance / measured if measured > 0 else math.inf
    return math.nan  # an equality or another relation: no margin to speak of


def worst_margin(verdicts: pd.DataFrame) -> dict | None:
    """The verdict closest to (or furthest past) its bound, as a dict; None when none has a bound."""
    best, best_ratio = None, -1.0
    for v in verdicts.itertuples():
        r = _ratio(float(v.measured), float(v.tolerance), str(v.expected))
        if not math.isnan(r) and r > best_ratio:
            best, best_ratio = v, r
    if best is None:
        return None
    return dict(case=best.case, property=best.property, measured=float(best.measured),
                tolerance=float(best.tolerance), expected=str(best.expected), ratio=best_ratio)


def _margin_text(m: dict | None) -> str:
    if not m:
        return ""
    r = m["ratio"]
    where = ("bitwise equal" if r == 0 else f"{1 / r:.2g}× inside" if r <= 1 else f"{r:.2g}× past the bound")
    return f"{m['property']} {m['measured']:.2g} vs {m['tolerance']:.2g} ({where})"


def judge_family(family: Family, outcomes: list) -> dict:
    statuses = [o.status for o in outcomes]
    verdicts = pd.concat([o.verdicts for o in outcomes if not o.verdicts.empty], ignore_index=True) \
        if any(not o.verdicts.empty for o in outcomes) else pd.DataFrame()
    judged = [o for o in outcomes if o.status not in ("skipped",)]
    skipped = [o for o in outcomes if o.status == "skipped"]
    bad = [o for o in outcomes if o.status in ("fail", "error", "xpass")]
    if bad:
        status = "does not hold"
        why = "; ".join(f"{o.case.id}: {o.message}" for o in bad)
    elif not judged:
        status, why = "not applicable", "; ".join(sorted({o.message for o in skipped}))
    else:
        status = "holds"
        why = (f"{len(judged)} of {len(outcomes)} cases; the others n/a: "
               + "; ".join(sorted({o.message for o in skipped}))) if skipped else ""
    return dict(family=family.key, title=family.title, status=status, why=why,
                cases={o.case.id: o.status for o in outcomes},
                worst=worst_margin(verdicts) if status != "not applicable" and not verdicts.empty else None)


def certify(optimizer: str, kwargs_json: str = "", *, full: bool = False) -> tuple[dict, list]:
    """The certificate (plain data) and every case Outcome it ran."""
    from harness import registry
    from harness.diagnose import diagnose
    from harness.optim import load_factory, parse_kwargs
    from harness.session import execute

    t0 = time.perf_counter()
    kwargs = parse_kwargs(kwargs_json)
    diag = diagnose(load_factory(optimizer), optimizer, kwargs)
    t_diag = time.perf_counter() - t0
    env = RunEnv(optimizer=optimizer, optimizer_kwargs=kwargs_json or "")
    families, outcomes = [], []
    for family in FAMILIES:
        if not (family.quick or full):
            families.append(dict(family=family.key, title=family.title, status="not run",
                                 why="about a minute on the CPU: `harness conform --full` runs it",
                                 cases={c: "not run" for c in family.cases}, worst=None))
            continue
        ran = [execute(registry.get(c), env) for c in family.cases]
        outcomes += ran
        families.append(judge_family(family, ran))
    holds_all = all(f["status"] in ("holds", "not applicable", "not run") for f in families)
    cert = dict(optimizer=optimizer, optimizer_kwargs=kwargs, diagnosis=dataclasses.asdict(diag),
                families=families, conforms=bool(diag.conforms and holds_all),
                seconds=dict(diagnosis=round(t_diag, 2), total=round(time.perf_counter() - t0, 2)))
    return cert, outcomes


def render_text(cert: dict) -> str:
    """The one-screen certificate."""
    d = cert["diagnosis"]
    kw = f" {cert['optimizer_kwargs']}" if cert["optimizer_kwargs"] else ""
    lines = [f"Certificate for {cert['optimizer']}{kw}", ""]
    own = next((m for m in d["matches"] if m["form"] == d["form"]), None)
    dev = f", max deviation {own['deviation']:.2g}" if own and math.isfinite(own["deviation"]) else ""
    lines.append(f"Update rule: {d['label']}{dev}")
    lines.append(f"  {d['implication']}")
    if d.get("error"):
        lines.append(f"  the optimizer raised while probed: {d['error']}")
    others = [m for m in d["matches"] if m["form"] != d["form"]]
    if others:
        lines.append("  deviation from the other forms: " + ", ".join(
            f"{m['form']} {m['deviation']:.2g}" if math.isfinite(m["deviation"]) else f"{m['form']} n/a"
            for m in others))
    width = max(len(f["title"]) for f in cert["families"])
    lines += ["", f"{'claim family':<{width}} {'verdict':<15} worst margin to a bound"]
    for f in cert["families"]:
        lines.append(f"{f['title']:<{width}} {f['status']:<15} {_margin_text(f['worst'])}".rstrip())
        if f["why"] and f["status"] != "holds":
            lines.append(f"    {_short(f['why'])}")
    verdict = "yes" if cert["conforms"] else "NO"
    lines += ["", f"Conforms to Definition 1.2 (torch SGD, coupled WD, dampening 0): {verdict}"
              f"   [{cert['seconds']['total']:.1f} s]"]
    return "\n".join(lines) + "\n"


def json_safe(obj):
    """NaN and ±inf (a form not applicable, a bound at 0) become null: the output stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _short(text: str, width: int = 160) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= width else text[:width - 1] + "…"
